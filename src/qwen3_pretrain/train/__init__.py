"""The training loop, optimizer and LR schedule, metrics and logging."""
