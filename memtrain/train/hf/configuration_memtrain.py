"""Hugging Face configuration of an exported memtrain model (copied verbatim into every export).

Plain `transformers`: this file must not import anything from the memtrain project, because it runs
inside `AutoConfig.from_pretrained(DIR, trust_remote_code=True)` on machines without memtrain.

Field names follow the Llama conventions where the meaning is the same (`hidden_size`, `num_key_value_heads`,
`rope_theta`, ...). Attention layout: `layer_types[i]` is "sliding_attention" (window `sliding_window` text
tokens, including the query itself) or "full_attention"; those two names also make transformers' default
`DynamicCache(config=...)` keep only the last `sliding_window - 1` text keys of windowed layers.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Memory mechanisms the modeling files implement (memtrain's model.memory): the plain/meta-token decoder, the
# Recurrent Memory Transformer (memtrain_rmt.py) and the Titans variants (memtrain_titans.py).
TITANS_MEMORY = ("lmm", "mac", "mag", "mal")
SUPPORTED_MEMORY = ("none", "rmt", *TITANS_MEMORY)
# memory_config keys each kind needs (memtrain's [model.rmt] / [model.titans] sections, all of them exported)
_MEMORY_KEYS = {"rmt": ("segment_len", "num_memory", "bottleneck", "bottleneck_window", "positions"),
                "titans": ("segment_len", "chunk_size", "memory_depth", "memory_heads", "memory_head_dim",
                           "memory_expansion", "memory_act", "conv_size")}


class MemtrainConfig(PretrainedConfig):
    """Architecture of a memtrain decoder LM (meta tokens, GQA, RoPE, SwiGLU, global/windowed layers)."""

    model_type = "memtrain"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        num_meta_tokens: int = 0,
        sliding_window: int | None = None,
        layer_types: list[str] | None = None,
        memory: str = "none",
        memory_config: dict[str, Any] | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = 3,
        memtrain: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        # Learned tokens prepended to every sequence (no rotary position), visible to every query.
        self.num_meta_tokens = num_meta_tokens
        self.sliding_window = sliding_window
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * num_hidden_layers
        # Memory mechanism carried across segments (none, rmt, lmm, mac, mag, mal); its settings in memory_config.
        self.memory = memory
        self.memory_config = dict(memory_config or {})
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Provenance: the full resolved training config, the step and the source checkpoint (read by import_hf).
        self.memtrain = dict(memtrain or {})
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        # Some transformers versions keep tie_word_embeddings only as an init argument: make it an attribute.
        self.tie_word_embeddings = tie_word_embeddings
        self._check()

    def _check(self) -> None:
        """Reject configurations the modeling file cannot run, with a message naming the field."""
        if self.memory not in SUPPORTED_MEMORY:
            raise ValueError(f"memory={self.memory!r} is not supported by this modeling file "
                             f"(supported: {', '.join(SUPPORTED_MEMORY)})")
        need = _MEMORY_KEYS.get("titans" if self.memory in TITANS_MEMORY else self.memory, ())
        missing = [k for k in need if k not in self.memory_config]
        if missing:
            raise ValueError(f"memory={self.memory!r} needs memory_config keys {', '.join(missing)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for kind in self.layer_types:
            if kind not in ("full_attention", "sliding_attention"):
                raise ValueError(f"layer type {kind!r} is not full_attention or sliding_attention")
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise ValueError("sliding_attention layers need sliding_window >= 1")
