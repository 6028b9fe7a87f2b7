"""Lightning glue, thin: the LightningModules, the constraint's callback (``constraint.WeightConstraint``),
the other callbacks (speed, rank agreement, checkpoints), the DDP strategy, the checkpoint record."""
