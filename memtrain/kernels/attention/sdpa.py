"""Prefix attention on ``torch.nn.functional.scaled_dot_product_attention`` without any N x N mask.

The mask of docs/attention.md (see ``reference.py``) splits into pieces that SDPA runs natively:

* prefix queries (i < P) see exactly the prefix keys, bidirectionally: one unmasked SDPA call of size P x P;
* text queries without a window (or with a window that covers all text, W >= T) see every key j <= i: that is
  plain top-left causal attention over the whole sequence, so one ``is_causal=True`` call over all N queries
  gives the right rows for i >= P (its first P rows are wrong for the prefix and are replaced by the call above;
  they cost P/N of the work);
* text queries with a window W < T: block by block. Queries come in blocks of b; block c (text positions
  c*b .. c*b+b-1) needs the P prefix keys plus the text keys c*b-W+1 .. c*b+b-1, a band of W+b-1 keys. All
  bands are gathered at once with ``unfold`` (a strided view, then one copy when the prefix is concatenated),
  and one batched SDPA call runs over the blocks with a small boolean mask [nb, b, P+W+b-1] that cuts the band
  to the per-query window. Work and memory are O(T * (P + W + b)), linear in N.

Everything is differentiable by autograd, on any device: this is the CPU training path (FlexAttention has no
backward on CPU). Runs in float64 too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Block of queries per band. Per query the work is P + W + b - 1 keys, so smaller b wastes less, but every block
# repeats the P prefix keys and the W-1 keys of band overlap, and many tiny SDPA problems run slower on CPU.
# 128 measured best of {64, 128, 256} at W=256, P=32 on CPU (benchmarks/attention.py).
DEFAULT_BLOCK = 128


def _sdpa(q, k, v, **kw):
    # enable_gqa lets SDPA broadcast the key/value heads itself instead of us materialising repeated copies.
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[-3] != k.shape[-3], **kw)


def band_mask(num_blocks: int, block: int, window: int, num_prefix: int, device=None) -> torch.Tensor:
    """Boolean mask ``[nb, 1, b, P + W + b - 1]`` for the blocked windowed path.

    Row r of block c is text query t = c*b + r; band column m is text key s = c*b - (W-1) + m. It may see s iff
    t - W < s <= t (i.e. r <= m <= r + W - 1) and s >= 0 (the left zero padding of the first blocks is hidden).
    Prefix columns are always visible. Size is linear in N (nb*b ~ T).
    """
    r = torch.arange(block, device=device).view(1, block, 1)
    m = torch.arange(window - 1 + block, device=device).view(1, 1, -1)
    c = torch.arange(num_blocks, device=device).view(-1, 1, 1)
    band = (m >= r) & (m <= r + window - 1) & (m >= window - 1 - c * block)  # [nb, b, W+b-1]
    prefix = torch.ones(num_blocks, block, num_prefix, dtype=torch.bool, device=device)
    return torch.cat([prefix, band], dim=-1).unsqueeze(1)


def windowed_text_attention(
    q_text: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int, window: int, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Text queries under a sliding window, block by block.

    q_text ``[B, Hq, T, D]`` (text positions only), k/v ``[B, Hkv, N, D]`` (whole sequence, N = P + T), window
    W >= 1. Returns ``[B, Hq, T, D]``. Peak extra memory ~ (T/b) * (P + W + b - 1) * D per key/value head, plus
    the [nb, b, P+W+b-1] mask.

    Layout of the one batched SDPA call: batch = B*nb (blocks), heads = H, mask [B*nb, 1, b, L]. (Putting the
    blocks on the heads axis instead, so the mask broadcasts over the batch, measured 4x slower in the CPU kernel.)
    """
    B, Hq, T, D = q_text.shape
    Hkv, P = k.shape[1], num_prefix
    b = max(1, min(block, T))
    nb = -(-T // b)
    pad_q = nb * b - T
    band = window - 1 + b

    # Queries: [B, Hq, nb*b, D] -> [B*nb, Hq, b, D]; the padded rows at the end are computed and dropped.
    qp = F.pad(q_text, (0, 0, 0, pad_q)) if pad_q else q_text
    qb = qp.reshape(B, Hq, nb, b, D).transpose(1, 2).reshape(B * nb, Hq, b, D)

    def bands(x):
        # Text keys padded with W-1 zeros in front (hidden by the mask) and pad_q at the end (seen only by the
        # dropped padded queries), then overlapping windows of W+b-1 keys at stride b: [B, Hkv, nb, D, W+b-1].
        xt = F.pad(x[:, :, P:], (0, 0, window - 1, pad_q))
        xb = xt.unfold(2, band, b).permute(0, 2, 1, 4, 3)  # [B, nb, Hkv, W+b-1, D], still a view
        if P:
            xp = x[:, :, :P].unsqueeze(1).expand(B, nb, Hkv, P, D)
            xb = torch.cat([xp, xb], dim=3)  # the one materialising copy: [B, nb, Hkv, P+W+b-1, D]
        return xb.reshape(B * nb, Hkv, P + band, D)

    mask = band_mask(nb, b, window, P, device=q_text.device)
    if B > 1:  # the batch is flattened as (B, nb): repeat the per-block mask B times (bool, linear in N)
        mask = mask.unsqueeze(0).expand(B, *mask.shape).reshape(B * nb, *mask.shape[1:])
    out = _sdpa(qb, bands(k), bands(v), attn_mask=mask)  # [B*nb, Hq, b, D]
    out = out.view(B, nb, Hq, b, D).transpose(1, 2).reshape(B, Hq, nb * b, D)
    return out[:, :, :T]


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int = 0,
    window: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]``; the mask of docs/attention.md without N x N."""
    P = num_prefix
    T = q.shape[2] - P
    parts = []
    if P:
        # Prefix rows: bidirectional over the prefix, no text.
        parts.append(_sdpa(q[:, :, :P], k[:, :, :P], v[:, :, :P]))
    if T:
        if window is None or window >= T:
            # No effective window: rows i >= P of plain causal attention are exactly the text rows.
            parts.append(_sdpa(q, k, v, is_causal=True)[:, :, P:])
        else:
            parts.append(windowed_text_attention(q[:, :, P:], k, v, P, window, block))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
