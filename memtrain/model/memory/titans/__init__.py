"""Titans neural long-term memory (docs/titans.md): `model.memory` = lmm | mac | mag | mal, one spec each below.

model.py (the blocks and the decoder), memory.py (the memory layer over memtrain/kernels/titans), config.py
([model.titans]). The four kinds share settings and differ in how a block combines memory and attention.
"""
from __future__ import annotations

from dataclasses import replace

from ...errors import ModelConfigError
from ..spec import MemorySpec
from .config import TitansConfig

KINDS = ("lmm", "mac", "mag", "mal")


def memory_flops_per_token(cfg) -> float:
    """Training FLOPs of the memory's own update and read-out per text token (all layers and heads): per head
    8·Σ|W_l| (forward of the key, backward to the weight gradient, read-out of the query) plus 4·b·Dh for the
    chunk-parallel coefficient matmuls (QKᵀ and the carry over the chunk of b), × 3 for training."""
    t = cfg.titans
    dh = t.head_dim(cfg.d_model)
    dims = _layer_dims(t, dh)
    weights = sum(a * b for a, b in zip(dims, dims[1:]))
    per_head = 8 * weights + 4 * t.chunk_size * dh
    return 3.0 * cfg.n_layers * t.memory_heads * per_head


def _layer_dims(t: TitansConfig, dh: int) -> list[int]:
    """Widths through the memory MLP: [Dh, hidden, ..., Dh] (depth 1: [Dh, Dh], the linear memory)."""
    hidden = max(1, int(round(t.memory_expansion * dh)))
    return [dh] + [hidden] * (t.memory_depth - 1) + [dh]


def _memory_shapes(cfg, p: str) -> dict[str, tuple[int, ...]]:
    """Native shapes of one memory layer (memory.py: TitansMemory) under prefix `p`."""
    t, D = cfg.titans, cfg.d_model
    H, Dh, K = t.memory_heads, t.head_dim(D), t.conv_size
    shapes = {p + "query.weight": (H * Dh, D), p + "kv.weight": (2 * H * Dh, D), p + "gates.weight": (3 * H, D),
              p + "gates.bias": (3 * H,)}
    if K:
        shapes.update({p + "conv_q": (H * Dh, K), p + "conv_kv": (2 * H * Dh, K)})
    dims = _layer_dims(t, Dh)
    shapes.update({f"{p}init_weights.{l}": (H, dims[l + 1], dims[l]) for l in range(t.memory_depth)})
    shapes[p + "out.weight"] = (D, H * Dh)
    return shapes


def _block_shapes(kind: str):
    """Native parameter shapes of one block of `kind` (model.py: TitansBlock builds exactly these)."""
    def shapes(cfg, p: str) -> dict[str, tuple[int, ...]]:
        D, F = cfg.d_model, cfg.ffn_width
        qkv = cfg.kv_heads * (cfg.n_heads // cfg.kv_heads + 2) * cfg.head_dim
        out: dict[str, tuple[int, ...]] = {}
        if kind != "mag":  # MAG feeds the memory the attention branch's normalised input
            out[p + "mem_norm.weight"] = (D,)
        if kind != "lmm":
            out.update({p + "attn_norm.weight": (D,), p + "attn.qkv.weight": (qkv, D),
                        p + "attn.out.weight": (D, cfg.n_heads * cfg.head_dim)})
        out.update(_memory_shapes(cfg, p + "memory."))
        if kind == "mag":
            out.update({p + "gate_norm_y.weight": (D,), p + "gate_norm_m.weight": (D,)})
        out.update({p + "mlp_norm.weight": (D,), p + "mlp.gate.weight": (F, D), p + "mlp.up.weight": (F, D),
                    p + "mlp.down.weight": (D, F)})
        return out
    return shapes


def _check_mac(cfg) -> None:
    cfg.titans.validate(cfg)
    if cfg.titans.segment_len > cfg.max_seq_len:
        raise ModelConfigError(f"model.titans.segment_len={cfg.titans.segment_len} is longer than "
                               f"model.max_seq_len={cfg.max_seq_len}")


def _conv_halo(cfg) -> tuple[int, str] | None:
    """The next CP rank's short conv reads the last K - 1 inputs of this rank's slice."""
    K = cfg.titans.conv_size
    return (K - 1, "model.titans.conv_size - 1 (the conv's halo)") if K > 1 else None


def _describe(cfg) -> str:
    t = cfg.titans
    return (f"Titans {cfg.memory.upper()}: a neural long-term memory in every block ("
            f"{'linear' if t.memory_depth == 1 else f'MLP depth {t.memory_depth}'}, {t.memory_heads} heads, "
            f"chunk {t.chunk_size}{f', segments of {t.segment_len}' if cfg.memory == 'mac' else ''}), updated at "
            f"test time; `generate()` carries the memory state in its cache")


def _divergence_hint(cfg: ModelConfig) -> str | None:
    """The chunked memory can grow without bound once training raises θ or η (docs/titans.md#stability)."""
    t = cfg.titans
    if t.chunk_size == 1 or (t.theta_max < 1.0 or t.eta_max < 1.0):
        return None
    return ("the Titans memory may have diverged (unbounded gates with chunk_size > 1): bound them, e.g. "
            "--set model.titans.theta_max=0.003 --set model.titans.eta_max=0.95 for chunk_size 16 "
            "(docs/titans.md#stability)")


_COMMON = MemorySpec(
    name="lmm",
    summary="Titans LMM: the neural memory alone (no attention), memory MLP updated at test time",
    model="memtrain.model.memory.titans.model:TitansDecoderLM",
    settings="titans",
    check=lambda cfg: cfg.titans.validate(cfg),
    divergence_hint=_divergence_hint,
    stateful=True,
    attention_keys=lambda cfg, layer, seq_len: 0,
    memory_flops_per_token=memory_flops_per_token,
    plan="memtrain.model.memory.titans.plan",
    # the memory runs over the whole sequence inside each block: only hidden states cross pipeline stages
    pipeline="stages",
    cp_sequential=lambda cfg: cfg.titans.memory_depth > 1,  # deep memory: state handed rank to rank
    cp_min_slice=_conv_halo,
    block_shapes=_block_shapes("lmm"),
    inspect=frozenset({"gates"}),
    describe=_describe,
)

_MAPS = frozenset({"gates", "attention"})  # memtrain inspect draws the attention of the kinds that attend
SPECS = (
    _COMMON,
    replace(_COMMON, name="mac", inspect=_MAPS, block_shapes=_block_shapes("mac"), check=_check_mac,
            summary="Titans MAC: memory as context, attention over [persistent ‖ retrieved ‖ segment] per segment",
            segment=lambda cfg: (cfg.titans.segment_len, "model.titans.segment_len"),
            attention_keys=lambda cfg, layer, seq_len: cfg.num_meta_tokens + 2 * min(cfg.titans.segment_len, seq_len),
            cp_sequential=lambda cfg: True, cp_min_slice=lambda cfg: None),
    replace(_COMMON, name="mag", inspect=_MAPS,
            block_shapes=_block_shapes("mag"), attention_keys=MemorySpec.attention_keys,
            summary="Titans MAG: memory as a gate on sliding-window attention with the meta-token prefix"),
    replace(_COMMON, name="mal", inspect=_MAPS,
            block_shapes=_block_shapes("mal"), attention_keys=MemorySpec.attention_keys,
            summary="Titans MAL: memory as a layer before sliding-window attention"),
)
assert tuple(s.name for s in SPECS) == KINDS

__all__ = ["KINDS", "SPECS", "TitansConfig", "memory_flops_per_token"]
