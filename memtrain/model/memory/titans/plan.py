"""What a Titans block (LMM, MAC, MAG, MAL) keeps for the backward: `memtrain plan`'s estimate (docs/planner.md).

Same conventions as memtrain/model/activations.py; Hm memory heads of width Dm, b the memory chunk. The kernel pads
the stream to whole chunks and keeps one memory state (and momentum) per chunk in fp32.
"""
from __future__ import annotations

import dataclasses
import math

from memtrain.model.activations import SEL_MLP_D, SEL_MLP_F, Shapes, attention, mlp, sel_attention
from memtrain.model.config import ModelConfig

# What the memory kernel keeps for the backward, by its path (memtrain/kernels/titans): (per padded token x Hm*Dm
# (heads), per padded token x D (norm, output), fp32 states per chunk per head, fp32 b^2 per chunk per head).
# "chunked" is autograd through the chunked form (CUDA's linear memory); "fused" the chunk loop with a hand-written
# backward (CPU's choice; its inputs, gate coefficients and two states per chunk). Both fitted to what autograd keeps
# on CPU (tests/unit/test_plan.py); the Triton kernels are assumed to keep what "fused" keeps (not measured).
KEPT = {"chunked": (23, 4, 8, 9), "fused": (13, 4, 2, 4)}
MAC_SEGMENT = 6                              # MAC: per text position x D (segment attention over [p | h | x], gate)
STATE_LABEL = "Titans memory state"


def memory_state_elements(cfg: ModelConfig) -> int:
    """Elements of one memory head's weights (linear: Dm²; deep: every layer of the memory MLP)."""
    t = cfg.titans
    dm = t.head_dim(cfg.d_model)
    hidden = max(1, int(round(t.memory_expansion * dm)))
    dims = [dm] + [hidden] * (t.memory_depth - 1) + [dm]
    return sum(dims[i] * dims[i + 1] for i in range(t.memory_depth))


def kernel_path(cfg: ModelConfig, cuda: bool) -> str:
    """The `KEPT` entry of the kernel `memory_backend` runs (the choice of "auto": memtrain/kernels/titans)."""
    backend = cfg.titans.memory_backend
    if backend == "auto":
        backend = "chunked" if cuda and cfg.titans.memory_depth == 1 else "fused"
    return "chunked" if backend in ("chunked", "reference") else "fused"


def _memory(cfg: ModelConfig, s: Shapes, n: int) -> tuple[float, float]:
    """Titans memory over a stream of n tokens: (elements in the activation dtype, fp32 elements). The kernel pads
    the stream to whole chunks and keeps memory states (and momenta) per chunk in fp32."""
    if n <= 0:
        return 0.0, 0.0
    t = cfg.titans
    b, hm, dm = t.chunk_size, t.memory_heads / s.tp, t.head_dim(cfg.d_model)
    chunks = math.ceil(n / b)
    token, token_d, state, intra = KEPT[kernel_path(cfg, s.cuda)]
    tokens = chunks * b * (token * hm * dm + token_d * s.D)
    fp32 = state * chunks * hm * memory_state_elements(cfg) + intra * chunks * b * b * hm
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
