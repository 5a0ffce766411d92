"""Stability of the chunked memory update: does the memory stay bounded for gates up to given bounds?

Within a chunk of b tokens every gradient is taken at the chunk-start memory (the anchor), while the momentum keeps
moving the memory token by token (memtrain/kernels/titans/reference.py). In the worst case, b tokens with the same
unit key k, the error e = M(k) − v along k follows a linear map per chunk:

    token t of the chunk:  s ← η s − 2θ e_anchor,   e ← (1 − α) e + s          (the loss ‖M(k) − v‖² gives the 2)

The chunk's map [e_anchor, s] -> [e, s] is a 2×2 matrix whose spectral radius ρ is the memory's growth per chunk.
At b = 1 every gate in (0, 1) gives ρ < 1 (the determinant is η); for b > 1 the momentum turns
the frozen gradient into overshoot: ρ > 1 already at θ = 0.001 with η = 0.99 for b = 16, and the memory then grows
by ρ every chunk (|M(q)| ~ 1e20 after a few hundred tokens). Bounding θ and η (θ = θ_max·σ(.), η = η_max·σ(.),
model.titans.theta_max / eta_max) keeps every constant gate inside a region where ρ <= 1. Constant gates are a
model of the learned, per-token ones, not a proof for them; docs/titans.md#stability shows the map and the measured
divergence it predicts.
"""
from __future__ import annotations

import cmath

__all__ = ["chunk_map", "chunk_growth", "max_chunk_growth"]


def chunk_map(theta: float, eta: float, chunk_size: int, alpha: float = 0.0) -> tuple[tuple[float, float], ...]:
    """The 2×2 matrix ((a, b), (c, d)) taking [e, s] at a chunk's start to [e, s] at its end, for constant gates and
    chunk_size identical unit keys (e = M(k) − v, s = S·k; an exact model of the kernel in that case)."""
    columns = []
    for e, s in ((1.0, 0.0), (0.0, 1.0)):
        anchor = e
        for _ in range(chunk_size):
            s = eta * s - 2.0 * theta * anchor
            e = (1.0 - alpha) * e + s
        columns.append((e, s))
    (a, c), (b, d) = columns
    return (a, b), (c, d)


def chunk_growth(theta: float, eta: float, chunk_size: int, alpha: float = 0.0) -> float:
    """Spectral radius of `chunk_map`: the memory's growth per chunk in the worst case (> 1: it diverges)."""
    (a, b), (c, d) = chunk_map(theta, eta, chunk_size, alpha)
    root, mean = cmath.sqrt(((a - d) / 2) ** 2 + b * c), (a + d) / 2
    return max(abs(mean + root), abs(mean - root))


def max_chunk_growth(theta_max: float, eta_max: float, chunk_size: int, grid: int = 16) -> float:
    """Largest `chunk_growth` over constant gates θ in (0, θ_max], η in [0, η_max] and α = 0 (a grid; the growth is
    not monotone in θ). Tends to 1 as θ -> 0 (the memory stops moving): <= 1 means nothing grows."""
    return max(chunk_growth(theta_max * i / grid, eta_max * j / grid, chunk_size)
               for i in range(1, grid + 1) for j in range(grid + 1))
