"""What a Titans block (LMM, MAC, MAG, MAL) keeps for the backward: `memtrain plan`'s estimate (docs/planner.md).

Same conventions as memtrain/model/activations.py; Hm memory heads of width Dm, b the memory chunk. The kernel pads
the stream to whole chunks and keeps one memory state (and momentum) per chunk in fp32.
"""
from __future__ import annotations

import dataclasses
import math

from memtrain.model.activations import SEL_MLP_D, SEL_MLP_F, Shapes, attention, mlp, sel_attention
from memtrain.model.config import ModelConfig

MEM_TOKEN, MEM_TOKEN_D = 23, 4               # per padded token x Hm*Dm (heads), x D (norm, output)
MEM_STATE, MEM_INTRA = 8, 9                  # fp32: per chunk x one state per head; x b^2 per head
MAC_SEGMENT = 6                              # MAC: per text position x D (segment attention over [p | h | x], gate)
STATE_LABEL = "Titans memory state"


def memory_state_elements(cfg: ModelConfig) -> int:
    """Elements of one memory head's weights (linear: Dm²; deep: every layer of the memory MLP)."""
    t = cfg.titans
    dm = t.head_dim(cfg.d_model)
    hidden = max(1, int(round(t.memory_expansion * dm)))
    dims = [dm] + [hidden] * (t.memory_depth - 1) + [dm]
    return sum(dims[i] * dims[i + 1] for i in range(t.memory_depth))


def _memory(cfg: ModelConfig, s: Shapes, n: int) -> tuple[float, float]:
    """Titans memory over a stream of n tokens: (elements in the activation dtype, fp32 elements). The kernel pads
    the stream to whole chunks and keeps one memory state (and momentum) per chunk in fp32."""
    if n <= 0:
        return 0.0, 0.0
    t = cfg.titans
    b, hm, dm = t.chunk_size, t.memory_heads / s.tp, t.head_dim(cfg.d_model)
    chunks = math.ceil(n / b)
    tokens = chunks * b * (MEM_TOKEN * hm * dm + MEM_TOKEN_D * s.D)
    fp32 = MEM_STATE * chunks * hm * memory_state_elements(cfg) + MEM_INTRA * chunks * b * b * hm
    return tokens, fp32


def layer_elements(cfg: ModelConfig, s: Shapes, mode: str = "none") -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) one Titans block keeps for one sequence (B = 1) under `mode`."""
    kind = cfg.memory
    if mode == "full":
        return s.N * s.D / s.sp, 0.0
    if kind == "mac":
        mem = _memory(cfg, s, s.T)
    else:  # the memory runs over the meta positions (from M_0) and the text as two streams
        meta, text = _memory(cfg, s, s.P), _memory(cfg, s, s.T)
        mem = (meta[0] + text[0], meta[1] + text[1])
    # MAC runs its attention replicated under sequence parallelism (its segment loop needs whole outputs)
    attn = 0.0 if kind == "lmm" else attention(dataclasses.replace(s, sp=1) if kind == "mac" else s, s.N)
    extra = MAC_SEGMENT * s.T * s.D if kind == "mac" else 0.0
    if mode == "selective":  # matmul outputs: attention and MLP as the plain block, the memory's projections
        t = cfg.titans
        sel = (0.0 if kind == "lmm" else sel_attention(s, s.N)) + s.N * (SEL_MLP_D * s.D + SEL_MLP_F * s.F / s.tp)
        projections = s.N * (3 * t.memory_heads * t.head_dim(s.D) / s.tp + s.D)
        return sel + projections, mem[1]  # the kernel's per-chunk states are matmul outputs too
    return attn + mlp(s, s.N) + mem[0] + extra, mem[1]


def state_bytes(cfg: ModelConfig, s: Shapes, layers: int, act_bytes: float) -> float:
    """(M, momentum, anchor) per head per layer, fp32."""
    return 3 * 4.0 * s.B * (cfg.titans.memory_heads / s.tp) * memory_state_elements(cfg) * layers
