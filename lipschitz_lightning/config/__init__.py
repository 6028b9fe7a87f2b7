"""The settings' layer, shared by every command and by training: composing ``conf/`` as Hydra will
(``compose``), every setting checked before anything is built (``settings``), a run's place on the
tradeoff plot read from its config (``tradeoff``). No torch at import."""
