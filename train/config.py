"""The trainer's config tree: one dataclass per section, loaded from TOML with `--set` overrides.

    [model] [data] [parallel] [optim] [schedule] [checkpoint] [logging]  + top-level run settings

Each component receives only its own section. `load_config` checks keys and types (configtree) and the
values that involve several sections (`Config.validate`); every failure is a ConfigError naming the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from data.config import DataConfig
from launch.config import ParallelConfig
from model.config import ModelConfig
from model.errors import ModelConfigError

from .configtree import ConfigError, apply_override, build


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to norms, biases or meta tokens)."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.95
    """AdamW second-moment decay."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    steps: int = 1000
    """Optimizer steps to train."""

    warmup_steps: int = 100
    """Linear warm-up steps from 0 to the peak learning rate."""

    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rate."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every N steps (0: only at the end of training)."""

    keep: int = 3
    """Keep the newest K checkpoints and delete older ones."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Write tensorboard scalars every N steps."""

    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on rank 0."""


@dataclass
class Config:
    seed: int = 0
    """Seed of model initialisation and every random choice of the run."""

    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (model/config.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data stream (data/config.py)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout (launch/config.py)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule and run length."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress bar and tensorboard."""

    def validate(self) -> None:
        """Check values within and across sections (the world size is checked by launch)."""
        try:
            self.model.validate()
        except ModelConfigError as e:
            raise ConfigError(str(e)) from None
        m, d, p = self.model, self.data, self.parallel
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        for key, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                           ("parallel.tp", p.tp), ("schedule.steps", self.schedule.steps),
                           ("logging.every", self.logging.every), ("checkpoint.keep", self.checkpoint.keep)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if p.dp < 0:
            raise ConfigError(f"parallel.dp must be >= 0 (0 = the rest of the world size), got {p.dp}")
        if p.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend={p.backend!r} must be auto, gloo or nccl")
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}")
        if m.window > d.seq_len:
            raise ConfigError(f"model.window={m.window} is larger than the sequence (data.seq_len={d.seq_len})")
        if m.n_heads % p.tp or m.kv_heads % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads} "
                              f"and model.n_kv_heads={m.kv_heads}")
        if m.vocab_size and m.padded_vocab_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} must divide the padded vocabulary {m.padded_vocab_size} "
                              f"(set model.vocab_pad_multiple to a multiple of {p.tp})")
        if not 0 <= self.schedule.warmup_steps <= self.schedule.steps:
            raise ConfigError(f"schedule.warmup_steps={self.schedule.warmup_steps} must lie in "
                              f"[0, schedule.steps={self.schedule.steps}]")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.schedule.min_lr_ratio} must lie in [0, 1]")
        if self.optim.lr <= 0 or self.optim.grad_clip < 0 or self.checkpoint.every < 0:
            raise ConfigError("optim.lr must be positive; optim.grad_clip and checkpoint.every must be >= 0")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (or the defaults when `path` is None) plus `--set` overrides, validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (the files shipped are in configs/)")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for text in overrides:
        apply_override(tree, text)
    cfg = build(Config, tree)
    cfg.validate()
    return cfg
