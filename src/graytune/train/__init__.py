"""Training: tasks (what a batch and a loss are) and the trainer (how steps run, resume, stop)."""
