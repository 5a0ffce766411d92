"""Building blocks of an exported memtrain model (copied verbatim into every export; plain torch, no project
import): RMSNorm, rotary tables, SwiGLU, grouped-query attention projections and dense masked attention.

Numerics follow memtrain's memtrain/model/layers.py op for op: RMSNorm in fp32, rotary angles in fp64 then fp32 tables
(rotate-half layout; meta, memory and retrieved tokens carry no rotation), softmax scale 1/sqrt(Dh), query head
h reads key/value head h // G (the order of memtrain's fused QKV groups and of HF's `repeat_kv`).
Shapes: B batch, N positions, D model width, Hq / Hkv query / key-value heads, Dh head width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_memtrain import MemtrainConfig


class MemtrainRMSNorm(nn.Module):
    """x / rms(x) * g computed in (at least) fp32, cast back to the input dtype (as memtrain's RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # at least fp32; fp64 stays fp64 (as native)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[*positions.shape, Dh]` (fp64, cast where applied) for integer positions, like the native tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., Dh/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotary_table(num_prefix: int, num_text: int, num_suffix: int, head_dim: int, theta: float, offset: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[num_prefix + num_text + num_suffix, Dh]`: identity rows (cos 1, sin 0) around the text rows,
    whose positions count from `offset` (memtrain's `rotary_tables`)."""
    cos, sin = rotary_cos_sin(torch.arange(offset, offset + num_text, device=device), head_dim, theta)
    ones, zeros = cos.new_ones(1, head_dim), cos.new_zeros(1, head_dim)
    cos = torch.cat([ones.expand(num_prefix, -1), cos, ones.expand(num_suffix, -1)])
    sin = torch.cat([zeros.expand(num_prefix, -1), sin, zeros.expand(num_suffix, -1)])
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, T, Dh]` (rotate-half convention) in fp32 (fp64 for fp64), result in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention, q `[B, Hq, Nq, Dh]`, k/v `[B, Hkv, Nk, Dh]`, boolean mask broadcastable to
    `[B, Hq, Nq, Nk]` (None = all visible; every row must have a visible key) -> `[B, Hq, Nq, Dh]`."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # explicit repeat: works with every torch version's SDPA
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MemtrainMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MemtrainConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MemtrainAttentionProjections(nn.Module):
    """q/k/v/o projections of grouped-query attention; the attention patterns live in the callers."""

    def __init__(self, config: MemtrainConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        """x `[B, N, D]` -> q `[B, Hq, N, Dh]`, k, v `[B, Hkv, N, Dh]` (rotary applied when tables are given)."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o `[B, Hq, N, Dh]` -> `[B, N, D]`."""
        B, _, N, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(masked_attention(q, k, v, mask))

    def forward_masked(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor):
        """Self-attention over x `[B, N, D]` under a boolean mask `[N, N]` (RMT segments)."""
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, mask)
