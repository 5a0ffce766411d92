"""Titans neural long-term memory: the specification in plain torch (docs/titans_kernels.md#the-memory-exactly).

Everything here is deliberately naive (a Python loop over tokens) so it can serve as the spec that every fast
path in this package is tested against. Any dtype; autograd works through all functions, including through the
initial state, which the model learns as a parameter.

Shapes (B batch, H memory heads, T tokens, Dk key width, Dv value width):
    q, k            [B, H, T, Dk]
    v               [B, H, T, Dv]
    theta, eta, alpha [B, H, T]      step size, momentum, forgetting; each in [0, 1]

Semantics, per token t, chunk size b, absolute chunk grid c = (chunk_offset + t) // b:
    g_t = grad_M ||M(k_t) - v_t||^2  at the memory M^(c) of the start of t's chunk (the "anchor")
    S_t = eta_t S_{t-1} - theta_t g_t
    M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = M_t(q_t)                   (read after the update)

Chained calls and the anchor: a call may start in the middle of a chunk (``chunk_offset`` = tokens of the current
chunk already processed). The gradients of the rest of that chunk are taken at the memory of the chunk's start,
so the state must carry it: state = (M, S, M_anchor). Every op returns that 3-tuple; a 2-tuple (M, S) is accepted
as input when chunk_offset == 0 (the anchor is then M itself). This is what makes docs/titans_kernels.md#the-memory-exactly property 2 (one pass ==
chained passes over pieces of any length) hold for b > 1.

Deep memory form (``deep_*``): a plain MLP per head, no residual,
    M(x) = W_L act(... act(W_2 act(W_1 x)))        W_l: [B, H, d_l, d_{l-1}], d_0 = Dk, d_L = Dv
We chose the plain form (as titans-pytorch's MemoryMLP) because it allows Dk != Dv and keeps every layer a pure
matmul, which is what the TTT-MLP dual form needs; a residual x + W2 act(W1 x) forces Dk == Dv and can be
recovered by the caller by initialising/combining differently. Each layer has its own momentum S_l; all layers
share the per-token gates.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "linear_memory_recurrent",
    "linear_memory_naive_chunks",
    "deep_memory_recurrent",
    "deep_memory_naive_chunks",
    "mlp_forward",
    "activation",
    "activation_grad",
]


# ----------------------------------------------------------------------------------------------------------- helpers
def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Hidden-layer nonlinearity of the deep memory ("gelu" = exact erf GELU, or "silu")."""
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """d act / dx written with differentiable torch ops (the chunked form needs second derivatives)."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"unknown activation {name!r}")


def mlp_forward(weights: Sequence[torch.Tensor], x: torch.Tensor, act: str) -> torch.Tensor:
    """Plain MLP memory. weights[l]: [B, H, d_l, d_{l-1}]; x: [B, H, N, d_0] -> [B, H, N, d_L]."""
    for l, w in enumerate(weights):
        x = x @ w.transpose(-1, -2)
        if l < len(weights) - 1:
            x = activation(x, act)
    return x


def _unpack_linear_state(state, q, v, chunk_offset):
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        W = q.new_zeros(B, H, Dv, Dk)
        return W, torch.zeros_like(W), W
    if len(state) == 2:
        if chunk_offset:
            raise ValueError("chunk_offset > 0 needs the anchor memory: pass state = (W, S, W_anchor)")
        return state[0], state[1], state[0]
    return state[0], state[1], state[2]


def _unpack_deep_state(state, chunk_offset):
    weights = tuple(state[0])
    momenta = tuple(state[1]) if state[1] is not None else tuple(torch.zeros_like(w) for w in weights)
    if len(state) == 2:
        if chunk_offset:
            raise ValueError("chunk_offset > 0 needs the anchor weights: pass state = (Ws, Ss, Ws_anchor)")
        return weights, momenta, weights
    return weights, momenta, tuple(state[2])


# ---------------------------------------------------------------------------------------------------- linear memory
def linear_memory_recurrent(q, k, v, theta, eta, alpha, state=None):
    """Per-token recurrence (chunk size 1) of the linear memory M(x) = W x, written out directly.

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state (W, S[, W_anchor]) each [B,H,Dv,Dk] (zeros if None).
    Returns y [B,H,T,Dv] and (W_T, S_T, W_T) (with b = 1 the next anchor is the current memory).
    """
    W, S, _ = _unpack_linear_state(state, q, v, 0)
    ys = []
    for t in range(q.shape[2]):
        kt, vt = k[:, :, t], v[:, :, t]
        err = (W @ kt.unsqueeze(-1)).squeeze(-1) - vt                      # [B,H,Dv]
        g = 2.0 * err.unsqueeze(-1) * kt.unsqueeze(-2)                      # 2 (W k - v) k^T
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * g
        W = (1.0 - alpha[:, :, t, None, None]) * W + S
        ys.append((W @ q[:, :, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=2) if ys else v.new_zeros(v.shape)
    return y, (W, S, W)


def linear_memory_naive_chunks(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0):
    """Naive chunk loop: token by token, but every gradient of a chunk is taken at the chunk-start memory.

    Shapes as in :func:`linear_memory_recurrent`. ``chunk_offset`` in [0, chunk_size): tokens of the current chunk
    already consumed by earlier calls (then state must hold the anchor). Returns y and (W, S, W_anchor) where
    W_anchor is the memory at the start of the chunk the next token falls into.
    """
    b = int(chunk_size)
    W, S, anchor = _unpack_linear_state(state, q, v, chunk_offset)
    ys = []
    for t in range(q.shape[2]):
        if (chunk_offset + t) % b == 0:
            anchor = W                                                      # new chunk: gradients at M^(c)
        kt, vt = k[:, :, t], v[:, :, t]
        err = (anchor @ kt.unsqueeze(-1)).squeeze(-1) - vt
        g = 2.0 * err.unsqueeze(-1) * kt.unsqueeze(-2)
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * g
        W = (1.0 - alpha[:, :, t, None, None]) * W + S
        ys.append((W @ q[:, :, t].unsqueeze(-1)).squeeze(-1))
    if (chunk_offset + q.shape[2]) % b == 0:
        anchor = W
    y = torch.stack(ys, dim=2) if ys else v.new_zeros(v.shape)
    return y, (W, S, anchor)


# ------------------------------------------------------------------------------------------------------ deep memory
def _per_token_grads(weights, kt, vt, act):
    """grad_W ||M_W(k) - v||^2 for every layer, by autograd (independent of the chunked form's hand backprop).

    kt [B,H,Dk], vt [B,H,Dv]. Heads and batch are independent, so the gradient of the sum is per (b, h).
    The partial derivative in W with k and v held fixed (torch.func.grad): when k itself depends on the same
    weights (MAC: the memory's keys come from attention over tokens retrieved with this memory), a plain
    autograd.grad(loss, W) would add the path through k. The result stays differentiable in W, k and v for the
    caller's backward (func transforms compose with ordinary autograd).
    """
    def loss(ws, k, v):
        return ((mlp_forward(ws, k.unsqueeze(2), act).squeeze(2) - v) ** 2).sum()

    return torch.func.grad(loss)(tuple(weights), kt, vt)


def deep_memory_recurrent(q, k, v, theta, eta, alpha, state, *, act="gelu"):
    """Per-token recurrence (chunk size 1) of the deep MLP memory.

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state = (weights, momenta[, anchor]) with weights[l] and
    momenta[l] [B,H,d_l,d_{l-1}] (momenta None -> zeros). Returns y [B,H,T,Dv] and (weights, momenta, weights).
    """
    Ws, Ss, _ = _unpack_deep_state(state, 0)
    ys = []
    for t in range(q.shape[2]):
        gs = _per_token_grads(Ws, k[:, :, t], v[:, :, t], act)
        th, et, al = (x[:, :, t, None, None] for x in (theta, eta, alpha))
        Ss = tuple(et * s - th * g for s, g in zip(Ss, gs))
        Ws = tuple((1.0 - al) * w + s for w, s in zip(Ws, Ss))
        ys.append(mlp_forward(Ws, q[:, :, t].unsqueeze(2), act).squeeze(2))
    y = torch.stack(ys, dim=2) if ys else v.new_zeros(v.shape)
    return y, (Ws, Ss, Ws)


def deep_memory_naive_chunks(q, k, v, theta, eta, alpha, state, *, chunk_size, chunk_offset=0, act="gelu"):
    """Naive chunk loop of the deep memory: gradients of a chunk at the chunk-start weights.

    Shapes as in :func:`deep_memory_recurrent`. Returns y and (weights, momenta, anchor weights).
    """
    b = int(chunk_size)
    Ws, Ss, anchor = _unpack_deep_state(state, chunk_offset)
    ys = []
    for t in range(q.shape[2]):
        if (chunk_offset + t) % b == 0:
            anchor = Ws
        gs = _per_token_grads(anchor, k[:, :, t], v[:, :, t], act)
        th, et, al = (x[:, :, t, None, None] for x in (theta, eta, alpha))
        Ss = tuple(et * s - th * g for s, g in zip(Ss, gs))
        Ws = tuple((1.0 - al) * w + s for w, s in zip(Ws, Ss))
        ys.append(mlp_forward(Ws, q[:, :, t].unsqueeze(2), act).squeeze(2))
    if (chunk_offset + q.shape[2]) % b == 0:
        anchor = Ws
    y = torch.stack(ys, dim=2) if ys else v.new_zeros(v.shape)
    return y, (Ws, Ss, anchor)
