"""Configuration of the Titans memory variants (`model.memory` = lmm, mac, mag or mal), section [model.titans].

The sliding window of MAG / MAL attention is the model's own `model.window` (0 = global causal attention) and the
persistent memory is the model's meta tokens (`model.num_meta_tokens`); see memtrain/model/memory/titans/model.py and docs/titans.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import ModelConfigError
from .stability import max_chunk_growth

if TYPE_CHECKING:  # only for the annotation: config.py imports this module
    from ...config import ModelConfig

MEMORY_BACKENDS = ("auto", "fused", "chunked", "triton", "reference")
MEMORY_ACTS = ("gelu", "silu")


@dataclass
class TitansConfig:
    segment_len: int = 128
    """MAC segment length L: attention runs within [persistent ‖ retrieved ‖ segment]."""

    chunk_size: int = 16
    """Tokens per memory chunk b: all gradients of a chunk use the chunk-start memory (docs/titans_kernels.md#the-memory-exactly)."""

    memory_depth: int = 1
    """Layers of the memory MLP: 1 is the linear memory (exact chunk-parallel form), >= 2 a deep MLP."""

    memory_heads: int = 4
    """Independent memory heads (split across tensor-parallel ranks)."""

    memory_head_dim: int = 0
    """Key/value width of one memory head; 0 means d_model / memory_heads."""

    memory_expansion: float = 2.0
    """Hidden width of the deep memory MLP as a multiple of the head width (memory_depth >= 2 only)."""

    memory_act: str = "gelu"
    """Activation between the layers of the deep memory MLP: gelu (exact) or silu."""

    conv_size: int = 4
    """Kernel width of the short depthwise causal convolution on the memory's q, k, v; 0 switches it off."""

    memory_backend: str = "auto"
    """Memory kernel backend (memtrain/kernels/titans): auto, fused (hand-written backward; auto's choice on CPU),
    chunked (autograd through the dual form), triton (linear memory; deep memory of depth 2-3) or reference."""

    theta_init: float = 0.001
    """Initial step size θ (theta_max·sigmoid of the gate projection's bias); in (0, theta_max). Small on purpose
    for chunk_size > 1: the loss is ‖M(k) − v‖² summed over the head width (no 1/Dh), and all gradients of a chunk
    are taken at the chunk-start memory, so with momentum η one chunk of b similar keys moves M by about
    2θ·b/(1 − η) times its error; much above 1 the memory overshoots and diverges (θ = 0.1 gave |M(q)| ~ 1e20 and
    NaN logits within 512 tokens of a fresh MAC model; 0.01 diverged at chunk 64). 0.001 stays bounded for chunk
    sizes 16 to 256, linear and deep memory (tests/unit/test_titans_model.py); the learned gate can still raise θ
    per token in training (docs/titans.md#stability). With chunk_size 1 no θ < 1 overshoots, and a large θ (the
    long-context preset's 0.1) lets one token write strongly."""

    eta_init: float = 0.9
    """Initial momentum η; in (0, eta_max)."""

    theta_max: float = 1.0
    """Upper bound of the step size: θ = theta_max·sigmoid(gates(x)), so θ < theta_max (and theta_init < theta_max).
    1 leaves θ unbounded in (0, 1). Together with eta_max it keeps the chunked update from overshooting: with b > 1 a
    learned θ or η can reach a region where the memory grows every chunk (docs/titans.md#stability). Bounds below 1
    are checked: the worst case over the box they allow must not grow (memtrain/model/memory/titans/stability.py)."""

    eta_max: float = 1.0
    """Upper bound of the momentum: η = eta_max·sigmoid(gates(x)); 1 leaves η unbounded in (0, 1). See theta_max."""

    alpha_init: float = 0.01
    """Initial forgetting α; in (0, 1)."""

    def head_dim(self, d_model: int) -> int:
        """Width of one memory head."""
        return self.memory_head_dim or d_model // self.memory_heads

    def validate(self, model_cfg: ModelConfig) -> None:
        """Check these values against the model section; raises ModelConfigError naming `model.titans.<key>`."""
        for name in ("segment_len", "chunk_size", "memory_depth", "memory_heads"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"model.titans.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("memory_head_dim", "conv_size"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"model.titans.{name} must be >= 0, got {getattr(self, name)}")
        if not self.memory_head_dim and model_cfg.d_model % self.memory_heads:
            raise ModelConfigError(
                f"model.titans.memory_heads={self.memory_heads} does not divide model.d_model={model_cfg.d_model} "
                f"(or set model.titans.memory_head_dim)")
        if not self.memory_expansion > 0:
            raise ModelConfigError(f"model.titans.memory_expansion must be > 0, got {self.memory_expansion}")
        if self.memory_act not in MEMORY_ACTS:
            raise ModelConfigError(
                f"model.titans.memory_act={self.memory_act!r} is not one of {', '.join(MEMORY_ACTS)}")
        if self.memory_backend not in MEMORY_BACKENDS:
            raise ModelConfigError(
                f"model.titans.memory_backend={self.memory_backend!r} is not one of {', '.join(MEMORY_BACKENDS)}")
        if self.memory_backend == "triton" and self.memory_depth > 3:
            raise ModelConfigError("model.titans.memory_backend='triton' has deep-memory kernels for depth 2 and 3 "
                                   f"only (model.titans.memory_depth={self.memory_depth}); use auto or fused")
        for name in ("theta_max", "eta_max"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ModelConfigError(f"model.titans.{name} must lie in (0, 1], got {getattr(self, name)}")
        for name, top in (("theta_init", self.theta_max), ("eta_init", self.eta_max), ("alpha_init", 1.0)):
            if not 0.0 < getattr(self, name) < top:
                bound = "1" if top == 1.0 else f"{name.replace('init', 'max')}={top}"
                raise ModelConfigError(f"model.titans.{name} must lie in (0, {bound}), got {getattr(self, name)}")
        if self.theta_max < 1.0 or self.eta_max < 1.0:  # bounds were chosen: they must do their job
            growth = max_chunk_growth(self.theta_max, self.eta_max, self.chunk_size)
            if growth > 1.0 + 1e-9:
                raise ModelConfigError(
                    f"model.titans.theta_max={self.theta_max} and eta_max={self.eta_max} let the memory grow by "
                    f"{growth:.3f}x per chunk of chunk_size={self.chunk_size} tokens (docs/titans.md#stability): "
                    f"lower them (e.g. theta_max=0.003 with eta_max=0.95 at chunk_size 16) or the chunk size")
