"""What autograd keeps of one block for one sequence: the estimate `memtrain plan` adds up (docs/planner.md).

Counted in elements per layer from the model's shapes, then x bytes by the planner. Shapes: B micro-batch, T text
tokens (data.seq_len / cp), P meta tokens, N = P + T positions through a block, D = d_model, F = ffn width, Hq/Hkv
attention heads of width Dh, tp the tensor-parallel size (head and FFN tensors are split, D-wide ones replicated
unless sequence parallelism splits them too: `sp` = tp then, else 1).

The coefficients are the tensors memtrain's blocks hand to autograd in fp32 on CPU (SDPA attention, the chunked
Titans kernel), counted once with `torch.autograd.graph.saved_tensors_hooks`; tests/unit/test_plan.py re-counts
them for every memory kind and fails when the code drifts from them by more than its tolerance. A memory kind
whose blocks keep more names a module like this one in its spec (`MemorySpec.plan`): `layer_elements`,
`state_bytes` and `STATE_LABEL` (memtrain/model/memory/titans/plan.py, rmt/plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from memtrain.model.config import ModelConfig

# elements kept per position (x D, heads, F as written) -- see docs/planner.md#activations
ATTN_D, ATTN_HQ, ATTN_HKV = 2, 6, 4         # attention norm; q/k/v, rotary copies, output of the attention
MLP_D, MLP_F = 3, 4                          # MLP norm + residual; gate, silu(gate), up, product
SEL_ATTN_D, SEL_MLP_D, SEL_MLP_F = 1, 2, 2   # selective: out projection; block input + down; gate and up outputs
STATE_LABEL = ""                              # the plain block carries no memory state


@dataclass(frozen=True)
class Shapes:
    """What the formulas read from the model config, the batch and the layout."""

    B: int
    T: int
    P: int
    D: int
    F: int
    Hq: int
    Hkv: int
    Dh: int
    tp: int
    sp: int = 1
    """What the residual stream's D-wide tensors are divided by: tp under sequence parallelism, else 1."""
    cuda: bool = False
    """Whether the run is on a CUDA device: kernels that pick their path by device keep different tensors."""

    @property
    def N(self) -> int:
        return self.P + self.T


def shapes(cfg: ModelConfig, batch: int, seq_len: int, tp: int, cp: int = 1,
           sequence_parallel: bool = False, cuda: bool = False) -> Shapes:
    return Shapes(B=batch, T=seq_len // cp, P=cfg.num_meta_tokens, D=cfg.d_model, F=cfg.ffn_width,
                  Hq=cfg.n_heads, Hkv=cfg.kv_heads, Dh=cfg.head_dim, tp=tp, sp=tp if sequence_parallel else 1,
                  cuda=cuda)


def attention(s: Shapes, n: int) -> float:
    return n * (ATTN_D * s.D / s.sp + (ATTN_HQ * s.Hq + ATTN_HKV * s.Hkv) * s.Dh / s.tp)


def mlp(s: Shapes, n: int) -> float:
    return n * (MLP_D * s.D / s.sp + MLP_F * s.F / s.tp)


def sel_attention(s: Shapes, n: int) -> float:
    # the out projection's output is kept whole: under sequence parallelism a full-length partial sum
    return n * ((s.Hq + 2 * s.Hkv) * s.Dh / s.tp + SEL_ATTN_D * s.D)


def _whole_down(s: Shapes, n: int) -> float:
    """Selective under sequence parallelism: of SEL_MLP_D's two D-wide tensors (block input, down projection output)
    the down projection's output is a full-length partial sum, not this rank's rows: add back what `/ sp` took."""
    return n * s.D * (1 - 1 / s.sp)


def plain(s: Shapes, n: int, mode: str) -> float:
    if mode == "full":
        return n * s.D / s.sp
    if mode == "selective":
        return sel_attention(s, n) + n * (SEL_MLP_D * s.D / s.sp + SEL_MLP_F * s.F / s.tp) + _whole_down(s, n)
    return attention(s, n) + mlp(s, n)


def head_elements(cfg: ModelConfig, s: Shapes) -> float:
    """The last stage's output head for one sequence: final norm (2 × T·D), logits, their masked copy and the fp32
    log-softmax of the loss (3 × T·V/tp; the loss always upcasts, docs/planner.md)."""
    return 2 * s.T * s.D / s.sp + 3 * s.T * cfg.padded_vocab_size / s.tp


def embed_elements(cfg: ModelConfig, s: Shapes) -> float:
    """The first stage's embedding output with the meta tokens prepended (kept by the first block's norm)."""
    return s.N * s.D / s.sp


def layer_elements(cfg: ModelConfig, s: Shapes, mode: str = "none") -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) the plain block keeps for one sequence (B = 1) under checkpoint
    `mode`: "none" everything, "full" only the block's input, "selective" the matmul outputs."""
    return plain(s, s.N, mode), 0.0


def state_bytes(cfg: ModelConfig, s: Shapes, layers: int, act_bytes: float) -> float:
    """Memory state a micro-batch carries through `layers` blocks (none for the plain block)."""
    return 0.0
