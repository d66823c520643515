"""Training: the LightningModule, optimizer and schedule, parallelism applied after build, the
global batch, loggers, checkpoints that survive interruption, sweep jobs, config checks."""
