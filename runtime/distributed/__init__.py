"""Tensor and pipeline parallelism: the rank group, its environment and its executors."""
