"""The shared training machinery: set-up, loop, checkpoints, logging."""
