"""The MLX training process: one fine-tuning attempt, resumable from a checkpoint."""
