"""Experiments that train several model variants and compare them (`python -m memtrain.train.experiment NAME ...`).

- `long_context`: every memory variant against the sliding-window baseline on needle and bAbI tasks at up to 64×
  the training length, plus throughput and memory per length (long_context.py; docs/results.md).
- `lm_quality`: every variant trained on the same tokens of a corpus, held-out perplexity at several lengths and
  by position (lm_quality.py).
"""
