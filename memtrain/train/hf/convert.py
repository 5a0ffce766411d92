"""Native <-> Hugging Face: parameter names, tensor layouts and the config, for every memory kind.

Native (memtrain/model/transformer.py, full TP = 1 tensors)        Hugging Face (memtrain/train/hf/modeling_memtrain.py)
  embed.tokens.weight [Vp, D]                             model.embed_tokens.weight [V, D]   (padding rows cut)
  embed.meta [P, D]                                       model.meta_tokens [P, D]
  blocks.i.attn_norm.weight                               model.layers.i.input_layernorm.weight
  blocks.i.attn.qkv.weight [Hkv*(G+2)*Dh, D]              model.layers.i.self_attn.{q,k,v}_proj.weight
  blocks.i.attn.out.weight                                model.layers.i.self_attn.o_proj.weight
  blocks.i.mlp_norm.weight                                model.layers.i.post_attention_layernorm.weight
  blocks.i.mlp.{gate,up,down}.weight                      model.layers.i.mlp.{gate,up,down}_proj.weight
  head.norm.weight                                        model.norm.weight
  head.proj.weight [Vp, D] (untied only)                  lm_head.weight [V, D] (untied only)
  RMT: memory_init, read_slots, write_slots [M, D]         model.memory_init, model.read_slots, model.write_slots
       memory_norm.weight                                  model.memory_norm.weight
  Titans: blocks.i.mem_norm.weight                         model.layers.i.memory_norm.weight
          blocks.i.memory.* (query, kv, gates, conv_q,     model.layers.i.memory.* (same names and layouts:
          conv_kv, init_weights.l, out), gate_norm_y/m     head-major, as memtrain's TitansMemory), gate_norm_y/m

The fused QKV rows are grouped per key/value head: [G query heads, key, value] for head 0, then head 1, ...
(memtrain/model/layers.py). Query head h = g*G + i reads key/value head g, which is the order `repeat_interleave`
(HF's `repeat_kv`) assumes, so q/k/v are cut out by a view, with no reordering of heads.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch

from . import ExportError

from memtrain.model.memory import load_plugins, memory_kinds, memory_spec


def exportable_kinds() -> list[str]:
    """Registered memory kinds whose spec names a Hugging Face template (`MemorySpec.hf_memory`)."""
    return [k for k in memory_kinds() if memory_spec(k).exported_as() is not None]


def build_config(tree: dict[str, Any], where: str):
    """The trainer's `Config` from a resolved config tree; ExportError naming `where` when it does not fit."""
    from memtrain.train.config import Config
    from memtrain.train.configtree import ConfigError, build
    try:
        cfg = build(Config, json.loads(json.dumps(tree)))  # a deep copy: build may keep references
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise ExportError(f"the config of {where} does not fit this memtrain version: {e}") from None
    try:
        load_plugins(cfg.plugins)  # modules that register the run's own memory kinds
        cfg.model.validate()
    except (ConfigError, ValueError) as e:
        raise ExportError(f"the config of {where} is invalid: {e}") from None
    if memory_spec(cfg.model.memory).exported_as() is None:
        raise ExportError(f"{where} has model.memory={cfg.model.memory!r}, which has no Hugging Face template; "
                          f"export supports {', '.join(exportable_kinds())}")
    if cfg.model.vocab_size <= 0:
        raise ExportError(f"the config of {where} has model.vocab_size={cfg.model.vocab_size}")
    return cfg


def native_shapes(m) -> dict[str, tuple[int, ...]]:
    """Full (TP = 1) shapes of every native parameter of the model with config `m`: embedding, blocks (the plain
    block, or the memory kind's `block_shapes`), head, then the kind's own `top_shapes`."""
    D, Vp, F = m.d_model, m.padded_vocab_size, m.ffn_width
    spec = memory_spec(m.memory)
    qkv = m.kv_heads * (m.n_heads // m.kv_heads + 2) * m.head_dim
    plain = {"attn_norm.weight": (D,), "attn.qkv.weight": (qkv, D), "attn.out.weight": (D, m.n_heads * m.head_dim),
             "mlp_norm.weight": (D,), "mlp.gate.weight": (F, D), "mlp.up.weight": (F, D), "mlp.down.weight": (D, F)}
    shapes: dict[str, tuple[int, ...]] = {"embed.tokens.weight": (Vp, D)}
    if m.num_meta_tokens:
        shapes["embed.meta"] = (m.num_meta_tokens, D)
    for i in range(m.n_layers):
        p = f"blocks.{i}."
        shapes.update(spec.block_shapes(m, p) if spec.block_shapes else {p + k: v for k, v in plain.items()})
    shapes["head.norm.weight"] = (D,)
    if not m.tie_embeddings:
        shapes["head.proj.weight"] = (Vp, D)
    shapes.update(spec.top_shapes(m))
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


# native block suffix -> HF layer suffix (everything under memory. and gate_norm_* keeps its name)
_BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn.out.weight": "self_attn.o_proj.weight",
                "mlp_norm.weight": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.gate_proj.weight",
                "mlp.up.weight": "mlp.up_proj.weight", "mlp.down.weight": "mlp.down_proj.weight",
                "mem_norm.weight": "memory_norm.weight"}
_TOP_NAMES = {"embed.tokens.weight": "model.embed_tokens.weight", "embed.meta": "model.meta_tokens",
              "head.norm.weight": "model.norm.weight", "head.proj.weight": "lm_head.weight",
              "memory_init": "model.memory_init", "read_slots": "model.read_slots",
              "write_slots": "model.write_slots", "memory_norm.weight": "model.memory_norm.weight"}
_VOCAB_ROWS = ("embed.tokens.weight", "head.proj.weight")


def hf_name(native: str) -> str:
    """HF name of a native parameter other than the fused QKV (which becomes q/k/v_proj)."""
    if native in _TOP_NAMES:
        return _TOP_NAMES[native]
    _, i, rest = native.split(".", 2)
    return f"model.layers.{i}.{_BLOCK_NAMES.get(rest, rest)}"


def native_to_hf(state: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """Full native state dict -> HF state dict (vocab padding trimmed, QKV split), in native_shapes order."""
    V, D, Dh, Hkv = m.vocab_size, m.d_model, m.head_dim, m.kv_heads
    G = m.n_heads // Hkv
    out = {}
    for name in native_shapes(m):
        t = state[name]
        if name.endswith("attn.qkv.weight"):
            h = hf_name(name.replace("attn.qkv.weight", "attn.out.weight")).replace("o_proj.weight", "")
            qkv = t.view(Hkv, G + 2, Dh, D)
            out.update({h + "q_proj.weight": qkv[:, :G].reshape(Hkv * G * Dh, D),
                        h + "k_proj.weight": qkv[:, G].reshape(Hkv * Dh, D),
                        h + "v_proj.weight": qkv[:, G + 1].reshape(Hkv * Dh, D)})
        else:
            out[hf_name(name)] = t[:V] if name in _VOCAB_ROWS else t
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

    out = {}
    for name in native_shapes(m):
        if name.endswith("attn.qkv.weight"):
            h = hf_name(name.replace("attn.qkv.weight", "attn.out.weight")).replace("o_proj.weight", "")
            q = take(h + "q_proj.weight").reshape(Hkv, G, Dh, D)
            k = take(h + "k_proj.weight").reshape(Hkv, 1, Dh, D)
            v = take(h + "v_proj.weight").reshape(Hkv, 1, Dh, D)
            out[name] = torch.cat([q, k, v], dim=1).reshape(-1, D)
        elif name in _VOCAB_ROWS:
            out[name] = pad_vocab(take(hf_name(name)), hf_name(name))
        else:
            out[name] = take(hf_name(name))
    return {k: v.contiguous() for k, v in out.items()}


def memory_config(m) -> dict[str, Any]:
    """memory_config of config.json: the memory kind's own settings section ([model.rmt], [model.titans]) as
    trained, {} for a kind without one."""
    settings = memory_spec(m.memory).settings_of(m)
    return asdict(settings) if settings is not None else {}


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
        "memory": memory_spec(m.memory).exported_as(),  # the exported modeling code's name for it
        "memory_config": memory_config(m),
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
                "tie_word_embeddings", "memory", "memory_config"):
        if conf.get(key) != want[key]:
            raise ExportError(f"{where}: config.json has {key}={conf.get(key)!r} but its memtrain config implies "
                              f"{want[key]!r}")
