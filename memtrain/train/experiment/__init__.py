"""Experiments that train several model variants and compare them (`python -m memtrain.train.experiment NAME ...`).

- `long_context`: every memory variant against the sliding-window baseline on needle and bAbI tasks at up to 64×
  the training length, plus throughput and memory per length (long_context.py; docs/results.md).
"""
