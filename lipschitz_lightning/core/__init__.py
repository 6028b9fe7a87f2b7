"""The ground floor: the maths of the method in pure torch, no Lightning, no Hydra. Linear algebra
(``linalg``), the constraint maps (``constraints``), a constraint for a whole model
(``projection.Projection``), the certified bounds (``bounds``), the loss over a large vocabulary
(``losses``), the sharded step across DDP ranks (``sharding``), the weights' roles (``roles``) and
what a setting admits (``types``)."""
