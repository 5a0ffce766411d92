"""memtrain: distributed pretraining of memory-augmented language models.

One import namespace holds the five parts (docs/architecture.md): `memtrain.model` (single-device PyTorch),
`memtrain.kernels` (attention with prefix tokens, Titans memory), `memtrain.data` (tokenizer, shards, stream,
tasks), `memtrain.train` (config, trainer, engines, checkpoints, export) and `memtrain.launch` (process groups,
parallel layout, DeepSpeed config, the shell launchers). The `memtrain` command (`memtrain/cli.py`) runs them.
"""
__version__ = "0.1.0"
