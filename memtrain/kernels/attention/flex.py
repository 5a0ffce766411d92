"""Prefix attention with compiled FlexAttention and a block mask.

FlexAttention skips every (query block, key block) tile that the block mask marks empty and evaluates the
``mask_mod`` only on partially visible tiles, so work is O(N * (P + W)) with a window and no N x N tensor exists.

The block mask is built here analytically from the structure of the mask (docs/attention.md) at tile granularity,
O((N / 128)^2) integers, instead of by ``create_block_mask``: that function either evaluates ``mask_mod`` on the
full N x N grid (``_compile=False``: an N^2 boolean tensor, 256 MB at N = 16k) or compiles that evaluation
(``_compile=True``: ~10 s per shape on CPU). ``tests/kernels/test_attention.py`` checks the tiles against
``create_block_mask`` on small shapes.

Limits (torch 2.13): on CPU, forward only (the backward raises NotImplementedError "does not support backward on
CPU", docs/distributed.md#what-runs-on-a-cpu) and float32 / float16 / bfloat16 only (no float64). On CUDA, forward and backward.
The first call for a new shape compiles (seconds); compiled code and block masks are cached.
"""
from __future__ import annotations

import functools

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    HAVE_FLEX = True
except ImportError:  # older torch: the backend is simply unavailable
    HAVE_FLEX = False

TILE = 128  # FlexAttention's default tile; the CPU and CUDA kernels both take it
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_mask_mod(num_prefix: int, window: int | None):
    """``mask_mod(b, h, q_idx, kv_idx)`` for docs/attention.md, evaluated by FlexAttention on partial tiles only."""
    P = num_prefix

    def mask_mod(b, h, q_idx, kv_idx):
        text = (kv_idx >= P) & (kv_idx <= q_idx)
        if window is not None:
            text = text & (q_idx - kv_idx < window)
        return (kv_idx < P) | text

    return mask_mod


def tile_masks(n: int, num_prefix: int, window: int | None, tile: int = TILE, device=None):
    """Which key tiles each query tile touches: ``(partial, full)`` booleans ``[nt, nt]``, nt = ceil(N / tile).

    Query tile rows [qs, qe], key tile columns [ks, ke]. Prefix columns (j < P) are visible to every row. Text
    columns [max(ks, P), ke] meet the union of the rows' windows [qs - W + 1, qe] iff they overlap it; they are
    all visible to all rows iff ke <= qs (causal for the first row) and qe - max(ks, P) < W (window for the last
    row). Tiles that run past N stay partial so that the kernel's mask_mod, not the tile, decides at the edge.
    """
    nt = -(-n // tile)
    start = torch.arange(nt, device=device) * tile
    end = torch.clamp(start + tile - 1, max=n - 1)
    qs, qe = start.view(-1, 1), end.view(-1, 1)
    ks, ke = start.view(1, -1), end.view(1, -1)
    jlo = torch.clamp(ks, min=num_prefix)  # first text column of the key tile
    has_text = jlo <= ke
    reach = qs - window + 1 if window is not None else torch.full_like(qs, -n)
    text_any = has_text & (jlo <= qe) & (ke >= reach)
    any_visible = (ks < num_prefix) | text_any
    text_full = (ke <= qs) & ((qe - jlo < window) if window is not None else torch.ones_like(text_any))
    full = any_visible & (~has_text | text_full)
    full = full & ((start + tile <= n).view(-1, 1)) & ((start + tile <= n).view(1, -1))
    return any_visible & ~full, full


def _to_indices(sel: torch.Tensor):
    # BlockMask wants, per query tile, a count and the selected key tiles first (in increasing order).
    num = sel.sum(-1, dtype=torch.int32)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


@functools.lru_cache(maxsize=32)
def block_mask(n: int, num_prefix: int, window: int | None, device: str) -> "BlockMask":
    """Cached :class:`BlockMask` for (N, P, W, device); batch and heads broadcast (same mask for all)."""
    partial, full = tile_masks(n, num_prefix, window, TILE, device=device)
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE,
        mask_mod=make_mask_mod(num_prefix, window), seq_lengths=(n, n),
    )


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # Uncompiled flex_attention runs a slow reference path; compile once. Default (automatic) dynamic shapes:
    # a second sequence length recompiles once with symbolic N instead of once per length.
    return torch.compile(flex_attention)


def supports(q: torch.Tensor, needs_grad: bool) -> bool:
    """Whether this backend can run the case: CUDA any float dtype; CPU forward only, no float64."""
    if not HAVE_FLEX:
        return False
    if q.device.type == "cpu":
        return not needs_grad and q.dtype in CPU_DTYPES
    return q.device.type == "cuda" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_prefix: int = 0, window: int | None = None
) -> torch.Tensor:
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]`` with FlexAttention (GQA native)."""
    if not HAVE_FLEX:
        raise RuntimeError("flex backend needs torch.nn.attention.flex_attention (torch >= 2.5)")
    n = q.shape[2]
    if window is not None and window >= n:
        window = None  # same mask; one cache entry instead of many
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        # flex refuses CPU inputs that require grad even under no_grad(); nothing is recorded anyway.
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = block_mask(n, num_prefix, window, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])
