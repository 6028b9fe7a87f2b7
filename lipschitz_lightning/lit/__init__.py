"""Lightning glue, thin: the LightningModules, the callbacks (the constraint's, the monitor, rank
agreement, checkpoints), the DDP strategy, the checkpoint record."""
