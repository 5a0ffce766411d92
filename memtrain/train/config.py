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
from memtrain.model.memory import load_plugins, memory_spec

from .configtree import ConfigError, apply_override, build, read_composed



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
    """Linear warm-up steps from 0 to the peak learning rate; more than schedule.steps warms up over all of them
    (with a note at start), so a short run needs no second override."""

    warmup_fraction: float = 0.0
    """Warm-up as a fraction of schedule.steps (e.g. 0.05, scales with the run); when > 0 it replaces
    warmup_steps."""

    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rate."""

    def warmup(self) -> int:
        """Warm-up steps in effect: the fraction of the steps, else warmup_steps clamped to the steps."""
        if self.warmup_fraction > 0:
            return min(self.steps, round(self.warmup_fraction * self.steps))
        return min(self.warmup_steps, self.steps)

    def notes(self) -> list[str]:
        """What the schedule changed from what was asked, for the start banner."""
        if self.warmup_fraction <= 0 and self.warmup_steps > self.steps:
            return [f"schedule.warmup_steps={self.warmup_steps} is more than schedule.steps={self.steps}: warming up "
                    f"over all {self.steps} steps (schedule.warmup_fraction scales warm-up with the run)"]
        return []


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

    wandb: bool = False
    """Also log the scalars to Weights & Biases (needs `pip install 'memtrain[wandb]'`); tensorboard always."""

    wandb_project: str = "memtrain"
    """W&B project of the run (the run is named after the run directory)."""

    wandb_mode: str = "online"
    """online, or offline (no network: files under RUN_DIR/wandb, uploaded later with `wandb sync`)."""


@dataclass
class Config:
    seed: int = 0
    """Seed of model initialisation and every random choice of the run."""

    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""

    precision: str = "auto"
    """fp32, bf16, fp16 (CUDA; with loss scaling), or auto: bf16 on a CUDA device that supports it, fp32 on a
    CPU. Every engine: the torch engine runs the forward under autocast (weights and optimizer in fp32),
    DeepSpeed keeps bf16/fp16 weights with fp32 master copies. The memory kernels keep their state in fp32."""

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

    def check_device(self) -> None:
        """What this machine's device can run: CUDA present, bf16/fp16 supported, flash-attn installed. Called by
        the trainer before anything is built or written (a config file itself may target another machine)."""
        import torch
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available: set device='cpu' or 'auto'")
        if device == "cpu" and self.precision == "fp16":
            raise ConfigError("precision='fp16' needs a CUDA device (CPUs train in fp32 or bf16): set "
                              "precision='auto' or 'bf16'")
        if device == "cpu" and self.precision == "bf16" and not cpu_supports_bf16():
            raise ConfigError("precision='bf16' on a CPU without bf16 instructions (AVX-512 BF16 or AMX) would only "
                              "emulate it: set precision='auto' (fp32 here)")
        if device == "cuda" and self.precision in ("bf16",) and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16' is not supported by this GPU: set precision='fp16' or 'auto'")
        if self.model.attention_backend == "flash":
            import importlib.util
            if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
                raise ConfigError(f"model.attention_backend='flash' needs a CUDA device with flash-attn installed "
                                  f"(this run: {device}{'' if device != 'cuda' else ', no flash_attn'}); set "
                                  f"model.attention_backend='auto', which picks flash where it can run")
        if self.precision == "fp16" and memory_spec(self.model.memory).own_backward(self.model):
            raise ConfigError("precision='fp16' needs loss scaling, which a memory kind's own backward (memory "
                              "replay) does not apply: use precision='bf16' or 'fp32'")

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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if p.engine not in ("auto", "torch", "deepspeed"):
            raise ConfigError(f"parallel.engine={p.engine!r} must be auto, torch or deepspeed")
        if not 0 <= p.zero_stage <= 3:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
        if p.zero_stage and p.engine == "torch":
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} needs parallel.engine='deepspeed' (or 'auto')")
        if p.activation_checkpoint_interval < 0:
            raise ConfigError("parallel.activation_checkpoint_interval must be >= 0")
        if p.activation_checkpoint not in ("none", "full", "selective"):
            raise ConfigError(f"parallel.activation_checkpoint={p.activation_checkpoint!r} must be none, full or "
                              f"selective")
        if self.optim.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.optim.grad_accum}")
        if p.dp < 0:
            raise ConfigError(f"parallel.dp must be >= 0 (0 = the rest of the world size), got {p.dp}")
        if self.precision == "fp16" and (p.pp > 1 or (p.tp > 1 and p.engine == "torch")):
            raise ConfigError("precision='fp16' needs one loss scale agreed by every rank: the pipeline engines and "
                              "the torch engine under tensor parallelism have none; use precision='bf16' (or "
                              "parallel.engine='deepspeed' with tensor parallelism)")
        if self.logging.wandb_mode not in ("online", "offline"):
            raise ConfigError(f"logging.wandb_mode={self.logging.wandb_mode!r} must be online or offline")
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
        if self.schedule.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.schedule.warmup_steps}")
        if not 0.0 <= self.schedule.warmup_fraction < 1.0:
            raise ConfigError(f"schedule.warmup_fraction={self.schedule.warmup_fraction} must lie in [0, 1), e.g. 0.05")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.schedule.min_lr_ratio} must lie in [0, 1]")
        _check_optim(self.optim)
        for key, value in (("checkpoint.every", self.checkpoint.every), ("logging.eval_every", self.logging.eval_every)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0 disables it), got {value}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device_type: str) -> str:
    """What `precision` means on a device of `device_type`: fp32, bf16 or fp16 (see Config.precision)."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def cpu_supports_bf16() -> bool:
    """bf16 matmuls in hardware (AVX-512 BF16 or AMX); without them autocast to bf16 only emulates it, slowly."""
    import torch
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


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
    # a config may name another as its base (`base = "demo.toml"`) and override some of its values
    tree = {} if path is None else read_composed(path, what="config file", where="configs/")
    for text in overrides:
        apply_override(tree, text)
    cfg = build(Config, tree)
    cfg.validate()
    return cfg
