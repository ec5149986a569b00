"""What the supervisor and the worker must agree on: protocol, checkpoints, layout, config."""
