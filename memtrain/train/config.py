"""The trainer's config tree: one dataclass per section, loaded from TOML with `--set` overrides.

    [model] [data] [parallel] [optim] [schedule] [checkpoint] [logging]  + top-level run settings

Each component receives only its own section. `load_config` checks keys and types (configtree) and the
values that involve several sections (`Config.validate`); every failure is a ConfigError naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memtrain.data.config import DataConfig
from memtrain.launch.config import LayoutError, ParallelConfig, check_layout
from memtrain.model.config import ModelConfig
from memtrain.model.errors import ModelConfigError
from memtrain.model.memory import load_plugins

from .configtree import ConfigError, apply_override, build, read_toml



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

    grad_accum: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""


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

    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0 uses the datasheet number of known GPUs, else a measured matmul rate."""

    eval_every: int = 0
    """Evaluate on the held-out (val) stream every N steps and at the end; 0 disables evaluation."""

    eval_batches: int = 8
    """Batches of the val stream per evaluation (the same batches every time)."""


@dataclass
class Config:
    seed: int = 0
    """Seed of model initialisation and every random choice of the run."""

    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""

    precision: str = "auto"
    """fp32, bf16 (DeepSpeed engine), or auto: bf16 where the device supports it, fp32 otherwise."""

    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the config is checked, e.g. one that registers a memory kind of its own
    (`register_memory`, docs/architecture.md); saved with the run, so resume and export import them too."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (memtrain/model/config.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data stream (memtrain/data/config.py)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout (memtrain/launch/config.py)."""

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
            load_plugins(self.plugins)
        except ModelConfigError as e:
            raise ConfigError(str(e).replace("model.plugins", "plugins")) from None
        try:
            self.model.validate()
        except ModelConfigError as e:
            raise ConfigError(str(e)) from None
        m, d, p = self.model, self.data, self.parallel
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        for key, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                           ("parallel.tp", p.tp), ("schedule.steps", self.schedule.steps),
                           ("logging.every", self.logging.every), ("checkpoint.keep", self.checkpoint.keep),
                           ("logging.eval_batches", self.logging.eval_batches),
                           ("parallel.timeout_s", p.timeout_s), ("parallel.pp", p.pp), ("parallel.cp", p.cp)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r} must be auto, fp32 or bf16")
        if p.engine not in ("auto", "torch", "deepspeed"):
            raise ConfigError(f"parallel.engine={p.engine!r} must be auto, torch or deepspeed")
        if not 0 <= p.zero_stage <= 3:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
        if p.zero_stage and p.engine == "torch":
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} needs parallel.engine='deepspeed' (or 'auto')")
        if p.activation_checkpoint_interval < 0:
            raise ConfigError("parallel.activation_checkpoint_interval must be >= 0")
        if self.optim.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.optim.grad_accum}")
        if p.dp < 0:
            raise ConfigError(f"parallel.dp must be >= 0 (0 = the rest of the world size), got {p.dp}")
        if p.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend={p.backend!r} must be auto, gloo or nccl")
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}")
        if m.window > d.seq_len:
            raise ConfigError(f"model.window={m.window} is larger than the sequence (data.seq_len={d.seq_len})")
        try:
            check_layout(m, p, d.seq_len)  # model × layout × length, every memory kind (memtrain/launch/config.py)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.schedule.warmup_steps <= self.schedule.steps:
            raise ConfigError(f"schedule.warmup_steps={self.schedule.warmup_steps} must lie in "
                              f"[0, schedule.steps={self.schedule.steps}]")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.schedule.min_lr_ratio} must lie in [0, 1]")
        _check_optim(self.optim)
        for key, value in (("checkpoint.every", self.checkpoint.every), ("logging.eval_every", self.logging.eval_every)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0 disables it), got {value}")


def _check_optim(o: OptimConfig) -> None:
    """AdamW's ranges, one key per message. Written as `lo <= x < hi` tests so NaN fails too (`nan <= 0` is False)."""
    inf = float("inf")
    checks = (("optim.lr", o.lr, 0.0 < o.lr < inf, "must be a finite number > 0, e.g. 3e-4"),
              ("optim.weight_decay", o.weight_decay, 0.0 <= o.weight_decay < inf, "must be a finite number >= 0, e.g. 0.1"),
              ("optim.beta1", o.beta1, 0.0 <= o.beta1 < 1.0, "must lie in [0, 1), e.g. 0.9"),
              ("optim.beta2", o.beta2, 0.0 <= o.beta2 < 1.0, "must lie in [0, 1), e.g. 0.95"),
              ("optim.eps", o.eps, 0.0 <= o.eps < inf, "must be a finite number >= 0, e.g. 1e-8"),
              ("optim.grad_clip", o.grad_clip, 0.0 <= o.grad_clip, "must be >= 0 (0 disables clipping), e.g. 1.0"))
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{key}={value} {rule}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (or the defaults when `path` is None) plus `--set` overrides, validated."""
    tree = {} if path is None else read_toml(path, what="config file", where="configs/")
    for text in overrides:
        apply_override(tree, text)
    cfg = build(Config, tree)
    cfg.validate()
    return cfg
