"""Configuration of the decoder language model.

One dataclass; the trainer's config tree holds it under `model`. Field docstrings (the string literal
after each field) are the documentation and are checked by a test. Values that depend on other sections
(tensor-parallel size, training length) are checked by the trainer's config, not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ModelConfigError
from .memory.rmt.config import RMTConfig
from .memory.titans.config import TitansConfig


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size of the tokenizer; 0 takes it from the prepared dataset's manifest."""

    vocab_pad_multiple: int = 64
    """Embedding and output rows are padded to a multiple of this (fast matmuls, divisible by TP size)."""

    d_model: int = 256
    """Width of the residual stream."""

    n_layers: int = 4
    """Number of decoder blocks."""

    n_heads: int = 4
    """Query heads per attention layer; must divide `d_model`."""

    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention); must divide `n_heads`; 0 means `n_heads` (plain MHA)."""

    ffn_hidden: int = 0
    """Hidden width of the SwiGLU MLP; 0 means 8/3·d_model rounded up to a multiple of 64."""

    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""

    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""

    max_seq_len: int = 4096
    """Longest text sequence (meta tokens not counted) the model accepts in one call."""

    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""

    window: int = 0
    """Sliding-window size of windowed attention layers in tokens; 0 makes every layer global."""

    global_layers: list[int] = field(default_factory=list)
    """Layers that use global attention although `window` > 0 (Hymba mixes a few); negative counts from the end."""

    num_meta_tokens: int = 0
    """Learned meta tokens prepended to every sequence, visible to every query (Hymba); 0 is the plain baseline."""

    attention_backend: str = "auto"
    """Attention kernel: auto, reference, sdpa, flex or flash (see memtrain/kernels/attention)."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled by 1/sqrt(2·n_layers)."""

    memory: str = "none"
    """Memory mechanism, a registered kind (memtrain/model/memory): none, rmt (Recurrent Memory Transformer), or
    Titans lmm, mac, mag, mal."""

    rmt: RMTConfig = field(default_factory=RMTConfig)
    """Recurrent Memory Transformer settings, used when memory = "rmt"."""

    titans: TitansConfig = field(default_factory=TitansConfig)
    """Titans neural long-term memory settings, used when memory is lmm, mac, mag or mal."""

    # ---- derived quantities -------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.vocab_pad_multiple)
        return m * math.ceil(self.vocab_size / m)

    def layer_window(self, layer: int) -> int | None:
        """Attention window of `layer` (None = global causal)."""
        if self.window <= 0:
            return None
        globals_ = {g % self.n_layers for g in self.global_layers}
        return None if layer in globals_ else self.window

    def validate(self) -> None:
        """Check the values that only depend on this section; raises ModelConfigError naming the key."""
        positive = ("d_model", "n_layers", "n_heads", "max_seq_len", "vocab_pad_multiple")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "n_kv_heads", "ffn_hidden", "window", "num_meta_tokens"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ModelConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if self.n_heads % self.kv_heads:
            raise ModelConfigError(
                f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ModelConfigError(
                f"head dim d_model/n_heads={self.head_dim} must be even for rotary embeddings")
        for g in self.global_layers:
            if not -self.n_layers <= g < self.n_layers:
                raise ModelConfigError(
                    f"model.global_layers entry {g} is outside [-{self.n_layers}, {self.n_layers})")
        if self.window > self.max_seq_len:
            raise ModelConfigError(
                f"model.window={self.window} is larger than model.max_seq_len={self.max_seq_len}")
        backends = ("auto", "reference", "sdpa", "flex", "flash")
        if self.attention_backend not in backends:
            raise ModelConfigError(
                f"model.attention_backend={self.attention_backend!r} is not one of {', '.join(backends)}")
        from .memory import memory_spec
        memory_spec(self.memory).check(self)  # the kind's own settings ([model.rmt], [model.titans], ...)
        if self.init_std <= 0:
            raise ModelConfigError(f"model.init_std must be positive, got {self.init_std}")
