"""Reference attention with prefix tokens: a dense mask and plain torch. This file is the spec.

Sequence = P prefix positions then T text positions, N = P + T (docs/attention.md). Key j is visible to query i iff

    j < P                                          (prefix keys: visible to every query)
    or  P <= j <= i  and  (W is None or i - j < W)  (causal text keys, optional sliding window W)

So prefix queries (i < P) see exactly the whole prefix (bidirectional) and no text; text queries see the whole
prefix plus a causal (windowed) band of text. Every query sees at least one key (itself, or the prefix), so no
softmax row is empty.

Everything here is O(N^2) in memory and work: use it for tests and short sequences only. It runs in whatever
dtype it is given (float64 included), which is what makes it a usable spec for 1e-10 comparisons.
"""
from __future__ import annotations

import math

import torch


def build_mask(n: int, num_prefix: int = 0, window: int | None = None, device=None) -> torch.Tensor:
    """Dense boolean visibility mask ``[N, N]``; ``mask[i, j]`` is True when query i may attend to key j."""
    i = torch.arange(n, device=device).unsqueeze(1)  # [N, 1] query positions
    j = torch.arange(n, device=device).unsqueeze(0)  # [1, N] key positions
    visible = (j >= num_prefix) & (j <= i)
    if window is not None:
        visible = visible & (i - j < window)
    return visible | (j < num_prefix)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: ``[B, Hkv, N, D]`` -> ``[B, Hkv * groups, N, D]``; query head h uses key/value head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, return_lse: bool = False
):
    """Plain softmax attention under an explicit boolean mask.

    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` (Hq a multiple of Hkv), mask broadcastable to ``[B, Hq, Nq, Nk]``.
    Returns out ``[B, Hq, Nq, D]`` and, with ``return_lse``, the natural-log log-sum-exp of the scaled scores
    ``[B, Hq, Nq]`` (``-inf`` for a row with no visible key, whose output is then 0). Differentiable by autograd.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Nq]
    # exp(s - lse) instead of softmax(): identical where a row has a visible key, and a fully masked row
    # (possible only for callers that pass their own masks) gives 0 rather than NaN.
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = probs @ v
    return (out, lse) if return_lse else out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_prefix: int = 0, window: int | None = None
) -> torch.Tensor:
    """The spec: q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]``, scale 1/sqrt(D), mask of
    :func:`build_mask`. Builds the N x N mask and scores: O(N^2) memory."""
    mask = build_mask(q.shape[2], num_prefix, window, device=q.device)
    return masked_attention(q, k, v, mask)
