"""Building blocks of the decoder: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention.

Shapes: B batch, N = P + T positions (P meta tokens then T text tokens), D model width,
Hq / Hkv query / key-value heads on this tensor-parallel rank, Dh head width.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .factory import LayerFactory, RegionOps


class RMSNorm(nn.Module):
    """x / rms(x) · g, computed in fp32 (the mean of squares loses digits in bf16).

    `region`: given for a norm of the residual stream, which under sequence parallelism sees only this rank's rows
    (its gain's gradient is then summed over the TP ranks); None for a norm of a replicated tensor."""

    def __init__(self, dim: int, eps: float, region: RegionOps | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # fp64 stays fp64: exact fp64 tests (gradients too)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.region is None else self.region.sum_grad(self.weight)
        return (xf * weight.to(xf.dtype)).to(x.dtype)


def rotary_tables(
    num_prefix: int, num_text: int, head_dim: int, theta: float, device: torch.device, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[N, Dh]` for N = num_prefix + num_text positions.

    Meta tokens carry no position (identity rows: cos 1, sin 0), so they look the same from every
    query; text positions count from `offset` (non-zero when a long sequence is fed in pieces).
    Cheap enough (O(N·Dh)) to rebuild every call, which keeps blocks free of position state.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    pos = torch.arange(offset, offset + num_text, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: [T, Dh]
    cos = torch.cat([angles.new_ones(num_prefix, head_dim), angles.cos()])
    sin = torch.cat([angles.new_zeros(num_prefix, head_dim), angles.sin()])
    # fp64 tables: apply_rotary casts them to its compute dtype, so fp64 models stay exact
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, N, Dh]` by the tables `[N, Dh]` (rotate-half convention).

    Computed in fp32 for bf16/fp16 inputs (rotation errors grow with position) and in fp64 for fp64.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)); gate and up are separate column layers so TP splits both alike.

    A sequence-parallel region (memtrain/model/factory.py): the caller passes x through `region.enter` and the
    output (a partial sum under sequence parallelism) through `region.exit`."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.gate = factory.column(cfg.d_model, cfg.ffn_width, std=cfg.init_std, sequence_parallel=True)
        self.up = factory.column(cfg.d_model, cfg.ffn_width, std=cfg.init_std, sequence_parallel=True)
        self.down = factory.row(cfg.ffn_width, cfg.d_model, std=out_std, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Grouped-query self-attention with meta-token prefix and optional sliding window.

    The fused QKV projection is laid out group by group — for each KV head: its G = Hq/Hkv query heads,
    then its key, then its value — so that splitting the output features into TP contiguous slices hands
    every rank whole groups (the layout megatron-core uses). Needs Hkv divisible by the TP size.

    `sequence_parallel`: the caller runs it as a sequence-parallel region (input through `region.enter`, output
    through `region.exit`, memtrain/model/factory.py); False where its output is needed whole inside the block.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, layer: int, *, sequence_parallel: bool = True):
        super().__init__()
        tp = factory.tp_size
        self.head_dim = cfg.head_dim
        self.group = cfg.n_heads // cfg.kv_heads
        self.local_kv_heads = cfg.kv_heads // tp
        self.num_prefix = cfg.num_meta_tokens
        self.window = cfg.layer_window(layer)
        self.rope_theta = cfg.rope_theta
        self.backend = cfg.attention_backend
        self.sequence = factory.sequence  # single-device, or context parallel (memtrain/launch/context_parallel.py)
        qkv_out = cfg.kv_heads * (self.group + 2) * cfg.head_dim
        self.qkv = factory.column(cfg.d_model, qkv_out, std=cfg.init_std, sequence_parallel=sequence_parallel)
        self.out = factory.row(cfg.n_heads * cfg.head_dim, cfg.d_model, sequence_parallel=sequence_parallel,
                               std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(
        self,
        x: torch.Tensor,
        pos_offset: int | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x `[B, N, D]` -> `[B, N, D]`, N = P + T.

        Layouts other than [meta; text] (the RMT's [meta; read memory; text; write memory]) pass their own
        `rotary` tables (cos, sin) `[N, Dh]` and/or `attend(q [B, Hq, N, Dh], k, v [B, Hkv, N, Dh])` returning
        `[B, Hq, N, Dh]` in place of the prefix/window kernel call; both default to this layer's own behaviour.
        `pos_offset` is the global position of the first text token (a later piece, or a context-parallel slice);
        None: the start of this rank's slice of a fresh sequence (0 without context parallelism).
        """
        B, N, _ = x.shape
        G, Dh = self.group, self.head_dim
        qkv = self.qkv(x).view(B, N, self.local_kv_heads, G + 2, Dh)
        q = qkv[:, :, :, :G].reshape(B, N, self.local_kv_heads * G, Dh).transpose(1, 2)  # [B, Hq, N, Dh]
        k = qkv[:, :, :, G].transpose(1, 2)  # [B, Hkv, N, Dh]
        v = qkv[:, :, :, G + 1].transpose(1, 2)
        if rotary is None:
            if pos_offset is None:  # a pipeline stage calls blocks with h only
                pos_offset = self.sequence.text_offset(N - self.num_prefix)
            rotary = rotary_tables(self.num_prefix, N - self.num_prefix, Dh, self.rope_theta, x.device, pos_offset)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attend is None:  # through the sequence ops: under context parallelism keys come from other ranks too
            o = self.sequence.attention(q, k, v, num_prefix=self.num_prefix, window=self.window,
                                        backend=self.backend)
        else:
            o = attend(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then + mlp(norm(h)). `[B, N, D]` -> `[B, N, D]`.

    Under sequence parallelism h is this rank's rows `[B, N / tp, D]` (memtrain/model/factory.py, `RegionOps`):
    norms and residual adds run on them, attention and the MLP on the whole sequence between `enter` and `exit`."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, layer: int):
        super().__init__()
        self.region = factory.region
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, factory.region)
        self.attn = Attention(cfg, factory, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, factory.region)
        self.mlp = SwiGLU(cfg, factory)

    def forward(self, h: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """`attn_kwargs` (rotary, attend) go to `Attention.forward`; none are needed for the plain model."""
        region = self.region
        h = h + region.exit(self.attn(region.enter(self.attn_norm(h)), **attn_kwargs))
        return h + region.exit(self.mlp(region.enter(self.mlp_norm(h))))
