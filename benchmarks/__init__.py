"""Benchmarks of mlx-overnight against plain mlx_lm: `python benchmarks/run.py`."""
