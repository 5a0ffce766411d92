"""Native <-> Hugging Face: parameter names, tensor layouts and the config, for memory = "none".

Native (model/transformer.py, full TP = 1 tensors)        Hugging Face (train/hf/modeling_memtrain.py)
  embed.tokens.weight [Vp, D]                             model.embed_tokens.weight [V, D]   (padding rows cut)
  embed.meta [P, D]                                       model.meta_tokens [P, D]
  blocks.i.attn_norm.weight                               model.layers.i.input_layernorm.weight
  blocks.i.attn.qkv.weight [Hkv*(G+2)*Dh, D]              model.layers.i.self_attn.{q,k,v}_proj.weight
  blocks.i.attn.out.weight                                model.layers.i.self_attn.o_proj.weight
  blocks.i.mlp_norm.weight                                model.layers.i.post_attention_layernorm.weight
  blocks.i.mlp.{gate,up,down}.weight                      model.layers.i.mlp.{gate,up,down}_proj.weight
  head.norm.weight                                        model.norm.weight
  head.proj.weight [Vp, D] (untied only)                  lm_head.weight [V, D] (untied only)

The fused QKV rows are grouped per key/value head: [G query heads, key, value] for head 0, then head 1, ...
(model/layers.py). Query head h = g*G + i reads key/value head g, which is the order `repeat_interleave`
(HF's `repeat_kv`) assumes, so q/k/v are cut out by a view, with no reordering of heads.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch

from . import ExportError

SUPPORTED_MEMORY = ("none",)


def build_config(tree: dict[str, Any], where: str):
    """The trainer's `Config` from a resolved config tree; ExportError naming `where` when it does not fit."""
    from train.config import Config
    from train.configtree import ConfigError, build
    try:
        cfg = build(Config, json.loads(json.dumps(tree)))  # a deep copy: build may keep references
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise ExportError(f"the config of {where} does not fit this memtrain version: {e}") from None
    if cfg.model.memory not in SUPPORTED_MEMORY:
        raise ExportError(f"{where} has model.memory={cfg.model.memory!r}; export supports only "
                          f"{', '.join(SUPPORTED_MEMORY)} so far (RMT and Titans come with their modeling code)")
    try:
        cfg.model.validate()
    except (ConfigError, ValueError) as e:
        raise ExportError(f"the config of {where} is invalid: {e}") from None
    if cfg.model.vocab_size <= 0:
        raise ExportError(f"the config of {where} has model.vocab_size={cfg.model.vocab_size}")
    return cfg


def native_shapes(m) -> dict[str, tuple[int, ...]]:
    """Full (TP = 1) shapes of every native parameter of a memory = "none" DecoderLM with config `m`."""
    D, Vp, F = m.d_model, m.padded_vocab_size, m.ffn_width
    qkv = m.kv_heads * (m.n_heads // m.kv_heads + 2) * m.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.tokens.weight": (Vp, D)}
    if m.num_meta_tokens:
        shapes["embed.meta"] = (m.num_meta_tokens, D)
    for i in range(m.n_layers):
        p = f"blocks.{i}."
        shapes.update({p + "attn_norm.weight": (D,), p + "attn.qkv.weight": (qkv, D),
                       p + "attn.out.weight": (D, m.n_heads * m.head_dim), p + "mlp_norm.weight": (D,),
                       p + "mlp.gate.weight": (F, D), p + "mlp.up.weight": (F, D), p + "mlp.down.weight": (D, F)})
    shapes["head.norm.weight"] = (D,)
    if not m.tie_embeddings:
        shapes["head.proj.weight"] = (Vp, D)
    return shapes


def check_native(state: dict[str, torch.Tensor], m, where: str) -> None:
    """The tensors must be exactly those the config describes (else: a checkpoint from another config)."""
    want = native_shapes(m)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ExportError(f"{where} does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ExportError(f"{where} does not match its config: {name} has shape {tuple(state[name].shape)}, "
                              f"the config implies {shape}")


def native_to_hf(state: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """Full native state dict -> HF state dict (vocab padding trimmed, QKV split)."""
    V, D, Dh, Hkv = m.vocab_size, m.d_model, m.head_dim, m.kv_heads
    G = m.n_heads // Hkv
    out = {"model.embed_tokens.weight": state["embed.tokens.weight"][:V]}
    if m.num_meta_tokens:
        out["model.meta_tokens"] = state["embed.meta"]
    for i in range(m.n_layers):
        n, h = f"blocks.{i}.", f"model.layers.{i}."
        qkv = state[n + "attn.qkv.weight"].view(Hkv, G + 2, Dh, D)
        out.update({
            h + "input_layernorm.weight": state[n + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": qkv[:, :G].reshape(Hkv * G * Dh, D),
            h + "self_attn.k_proj.weight": qkv[:, G].reshape(Hkv * Dh, D),
            h + "self_attn.v_proj.weight": qkv[:, G + 1].reshape(Hkv * Dh, D),
            h + "self_attn.o_proj.weight": state[n + "attn.out.weight"],
            h + "post_attention_layernorm.weight": state[n + "mlp_norm.weight"],
            h + "mlp.gate_proj.weight": state[n + "mlp.gate.weight"],
            h + "mlp.up_proj.weight": state[n + "mlp.up.weight"],
            h + "mlp.down_proj.weight": state[n + "mlp.down.weight"],
        })
    out["model.norm.weight"] = state["head.norm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["head.proj.weight"][:V]
    # contiguous copies: safetensors stores whole buffers, and views of the fused matrix would share one
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_to_native(hf: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """HF state dict -> full native state dict (inverse of `native_to_hf`; vocab padding rows are zeros)."""
    V, Vp, D, Dh, Hkv = m.vocab_size, m.padded_vocab_size, m.d_model, m.head_dim, m.kv_heads
    G = m.n_heads // Hkv

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ExportError(f"the Hugging Face weights have no tensor {name}")
        return hf[name]

    def pad_vocab(w: torch.Tensor, name: str) -> torch.Tensor:
        if tuple(w.shape) != (V, D):
            raise ExportError(f"{name} has shape {tuple(w.shape)}, the config implies {(V, D)}")
        return torch.cat([w, w.new_zeros(Vp - V, D)]) if Vp > V else w

    out = {"embed.tokens.weight": pad_vocab(take("model.embed_tokens.weight"), "model.embed_tokens.weight")}
    if m.num_meta_tokens:
        out["embed.meta"] = take("model.meta_tokens")
    for i in range(m.n_layers):
        n, h = f"blocks.{i}.", f"model.layers.{i}."
        q = take(h + "self_attn.q_proj.weight").reshape(Hkv, G, Dh, D)
        k = take(h + "self_attn.k_proj.weight").reshape(Hkv, 1, Dh, D)
        v = take(h + "self_attn.v_proj.weight").reshape(Hkv, 1, Dh, D)
        out.update({
            n + "attn_norm.weight": take(h + "input_layernorm.weight"),
            n + "attn.qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, D),
            n + "attn.out.weight": take(h + "self_attn.o_proj.weight"),
            n + "mlp_norm.weight": take(h + "post_attention_layernorm.weight"),
            n + "mlp.gate.weight": take(h + "mlp.gate_proj.weight"),
            n + "mlp.up.weight": take(h + "mlp.up_proj.weight"),
            n + "mlp.down.weight": take(h + "mlp.down_proj.weight"),
        })
    out["head.norm.weight"] = take("model.norm.weight")
    if not m.tie_embeddings:
        out["head.proj.weight"] = pad_vocab(take("lm_head.weight"), "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg, *, step: int, source: str, dtype: str, special_ids: dict[str, int]) -> dict[str, Any]:
    """config.json of the export: HF fields for the modeling code plus the full memtrain config (provenance)."""
    import transformers
    m = cfg.model
    layer_types = ["sliding_attention" if m.layer_window(i) else "full_attention" for i in range(m.n_layers)]
    return {
        "architectures": ["MemtrainForCausalLM"],
        "model_type": "memtrain",
        "auto_map": {
            "AutoConfig": "configuration_memtrain.MemtrainConfig",
            "AutoModel": "modeling_memtrain.MemtrainModel",
            "AutoModelForCausalLM": "modeling_memtrain.MemtrainForCausalLM",
        },
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_width,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "max_position_embeddings": m.max_seq_len,
        "num_meta_tokens": m.num_meta_tokens,
        "sliding_window": m.window or None,
        "layer_types": layer_types,
        "memory": m.memory,
        "memory_config": asdict(m.rmt) if m.memory == "rmt" else {},
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        **special_ids,
        "dtype": dtype,
        "torch_dtype": dtype,
        "transformers_version": transformers.__version__,
        "memtrain": {"format": "memtrain-hf-export-v1", "checkpoint_format": "memtrain-checkpoint-v1",
                     "step": step, "source": source, "config": asdict(cfg)},
    }


def check_hf_config(conf: dict[str, Any], cfg, where: str) -> None:
    """The HF fields of an export must agree with the memtrain config it carries (catches hand edits)."""
    want = hf_config(cfg, step=0, source="", dtype="", special_ids={})
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_meta_tokens", "sliding_window", "layer_types",
                "tie_word_embeddings", "memory"):
        if conf.get(key) != want[key]:
            raise ExportError(f"{where}: config.json has {key}={conf.get(key)!r} but its memtrain config implies "
                              f"{want[key]!r}")
