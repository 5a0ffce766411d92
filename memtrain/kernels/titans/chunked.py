"""Chunk-parallel torch forms of the Titans memory (docs/titans_kernels.md#the-memory-exactly, the TTT "dual form").

Semantics are exactly those of :mod:`memtrain.kernels.titans.reference`; autograd gives the backward. Only b x b
coefficient matrices, per-chunk [D, D] coefficient products and the chunk-boundary states are materialised; no
per-token weights ever exist.

Notation per chunk with local index i, j = 0..b-1 (all built by :func:`gate_coefficients`):
    Gamma[i,j] = prod_{j<l<=i} eta_l          Bt[i,m] = prod_{m<l<=i} (1 - alpha_l)       (0 above the diagonal)
    a_i = prod_{l<=i} eta_l,  beta_i = prod_{l<=i} (1 - alpha_l),  C = Bt Gamma,  c = Bt a
    Ctheta = C diag(theta),   u = Ctheta[b-1, :],   w = Gamma[b-1, :] * theta,   a_last = a_{b-1}

Chunk-relative "start states": W_init, S_init (the recurrence state before the chunk's first token) and W_grad (the
memory the chunk's gradients are taken at). They are equal except for a first chunk entered mid-way
(chunk_offset > 0), where W_grad is the anchor carried in the state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import _unpack_deep_state, _unpack_linear_state, activation, activation_grad

__all__ = ["gate_coefficients", "pad_to_chunks", "linear_memory_chunked", "deep_memory_chunked"]


def pad_to_chunks(q, k, v, theta, eta, alpha, chunk_size: int, chunk_offset: int):
    """Pad the time axis to whole chunks of an absolute grid and split it into [.., NC, b, ..].

    ``chunk_offset`` identity tokens go in front (the part of the first chunk consumed by earlier calls) and the
    tail is padded to a multiple of b. Padding tokens get q = k = v = 0, theta = 0, eta = 1, alpha = 0, so they
    read nothing, inject nothing and carry S unchanged; but M_t = (1 - alpha) M + S would still add S at a pad,
    so :func:`gate_coefficients` also needs ``valid`` to drop the pads' columns of the forgetting carry.
    Returns (q, k, v [B,H,NC,b,D]; theta, eta, alpha [B,H,NC,b]; valid [NC, b] bool, or None when nothing
    is padded; NC).
    """
    b, p = int(chunk_size), int(chunk_offset)
    B, H, T, _ = q.shape
    NC = math.ceil((p + T) / b)
    back = NC * b - p - T
    if p == 0 and back == 0:  # whole chunks: views, no padded copies, no pads to mask out (valid = None)
        return (*(x.reshape(B, H, NC, b, x.shape[-1]) for x in (q, k, v)),
                *(g.reshape(B, H, NC, b) for g in (theta, eta, alpha)), None, NC)

    def _split(x, value):
        if x.dim() == 4:
            x = F.pad(x, (0, 0, p, back), value=value)
            return x.reshape(B, H, NC, b, x.shape[-1])
        x = F.pad(x, (p, back), value=value)
        return x.reshape(B, H, NC, b)

    valid = torch.zeros(NC * b, dtype=torch.bool, device=q.device)
    valid[p:p + T] = True
    return (_split(q, 0.0), _split(k, 0.0), _split(v, 0.0), _split(theta, 0.0), _split(eta, 1.0),
            _split(alpha, 0.0), valid.reshape(NC, b), NC)


def _carry(gate: torch.Tensor):
    """Exact carry products of one gate within each chunk, built from cumulative logs.

    gate [.., b] in [0, 1]. Returns (M [.., b, b] with M[i,j] = prod_{j<l<=i} gate_l for j <= i else 0,
    P [.., b] with P_i = prod_{l<=i} gate_l). Products underflow, so they come from differences of cumulative
    logs. log(0) is guarded: zeros are replaced by 1 in the log and counted; an entry is 0 exactly when a zero lies
    in its range (zero counts differ). Gradients w.r.t. a gate that is exactly 0 do not see that gate's own factor
    (sigmoid gates are never exactly 0; the forward is exact).
    """
    zero = gate == 0
    b = gate.shape[-1]
    tril = torch.ones(b, b, dtype=torch.bool, device=gate.device).tril()
    if not gate.is_cuda and not bool(zero.any()):
        # No zero gate (sigmoid gates never are): the same products without the zero bookkeeping, fewer passes
        # over the [.., b, b] tensors. (On CUDA the general path avoids the host sync of .any().)
        logs = torch.log(gate).cumsum(-1)
        diff = (logs.unsqueeze(-1) - logs.unsqueeze(-2)).masked_fill(~tril, -math.inf)
        return torch.exp(diff), torch.exp(logs)
    logs = torch.log(torch.where(zero, torch.ones_like(gate), gate)).cumsum(-1)
    zeros = zero.to(torch.int32).cumsum(-1)
    keep = tril & (zeros.unsqueeze(-1) == zeros.unsqueeze(-2))
    # where before exp: above the diagonal the log difference is positive and could overflow to inf
    diff = logs.unsqueeze(-1) - logs.unsqueeze(-2)
    diff = torch.where(keep, diff, diff.new_full((), -math.inf))
    prefix = torch.where(zeros == 0, torch.exp(logs), torch.zeros_like(logs))
    return torch.exp(diff), prefix


def gate_coefficients(theta, eta, alpha, valid=None):
    """Per-chunk coefficient matrices of the dual form, all chunks in parallel.

    theta, eta, alpha [B,H,NC,b]; valid [NC,b] bool or None (padding tokens are False: their momentum is not added
    to the memory, i.e. their column of Bt is zero, which makes them exact identity steps). Returns (beta [..,b], c [..,b], Ctheta [..,b,b], u [..,b], w [..,b],
    a_last [B,H,NC]) as defined in the module docstring.
    """
    # one pass for both gates (half the small ops): carries of eta and of 1 - alpha stacked on a leading axis
    (Gamma, Bt), (a, beta) = (x.unbind(0) for x in _carry(torch.stack([eta, 1.0 - alpha])))
    if valid is not None:
        Bt = Bt * valid.to(Bt.dtype).unsqueeze(-2)
    C = Bt @ Gamma
    c = (Bt @ a.unsqueeze(-1)).squeeze(-1)
    Ctheta = C * theta.unsqueeze(-2)
    u = Ctheta[..., -1, :]
    w = Gamma[..., -1, :] * theta
    return beta, c, Ctheta, u, w, a[..., -1]


# ---------------------------------------------------------------------------------------------------- linear memory
def linear_memory_chunked(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0):
    """Chunk-parallel linear memory M(x) = W x.

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state None | (W, S) | (W, S, W_anchor), each [B,H,Dv,Dk].
    Returns y [B,H,T,Dv] and (W, S, W_anchor).

    All intra-chunk terms are computed for all chunks at once; only the boundary recurrence is sequential and
    it costs one [Dv,Dk] x [Dk,2Dk] matmul per chunk:
        W_end = beta_L W_init + c_L S_init - 2 W_grad K^T diag(u) K + 2 V^T diag(u) K
        S_end = a_L    S_init              - 2 W_grad K^T diag(w) K + 2 V^T diag(w) K
        Y     = (diag(beta) Q) W_init^T + (diag(c) Q) S_init^T - 2 (A K) W_grad^T + 2 A V,  A = Ctheta * (Q K^T)
    """
    b, p = int(chunk_size), int(chunk_offset)
    if not 0 <= p < b:
        raise ValueError(f"chunk_offset must be in [0, {b}), got {p}")
    W, S, Wa = _unpack_linear_state(state, q, v, p)
    B, H, T, Dk = q.shape
    if T == 0:
        return v.new_zeros(v.shape), (W, S, Wa)
    qc, kc, vc, th, et, al, valid, NC = pad_to_chunks(q, k, v, theta, eta, alpha, b, p)
    beta, c, Ctheta, u, w, a_last = gate_coefficients(th, et, al, valid)

    A = Ctheta * (qc @ kc.transpose(-1, -2))                               # [B,H,NC,b,b]
    KV = torch.cat([kc, vc], dim=-1)                                        # [B,H,NC,b,Dk+Dv]: one matmul each
    AK, AV = (A @ KV).split([Dk, KV.shape[-1] - Dk], dim=-1)                # for K and V (fewer, wider calls)
    # boundary-map coefficients for all chunks in parallel: P [.., Dk, 2Dk], U [.., Dv, 2Dk]
    KU = torch.cat([u.unsqueeze(-1) * kc, w.unsqueeze(-1) * kc], dim=-1)   # [B,H,NC,b,2Dk]
    P, U = (KV.transpose(-1, -2) @ KU).split([Dk, KV.shape[-1] - Dk], dim=-2)
    U = 2.0 * U
    beta_L, c_L = beta[..., -1, None, None], c[..., -1, None, None]
    a_L = a_last[..., None, None]

    W_inits, S_inits = [], []
    Wg = Wa if p else W
    # unbind once: indexing [:, :, n] inside the loop would make autograd build a full-size zero gradient per chunk
    per_chunk = zip(P.unbind(2), U.unbind(2), beta_L.unbind(2), c_L.unbind(2), a_L.unbind(2))
    for Pn, Un, bLn, cLn, aLn in per_chunk:   # the only sequential part: O(Dv Dk^2) per chunk
        W_inits.append(W)
        S_inits.append(S)
        last_anchor = Wg
        ZW, ZS = (Wg @ Pn - 0.5 * Un).split(Dk, dim=-1)
        W, S = bLn * W + cLn * S - 2.0 * ZW, aLn * S - 2.0 * ZS
        Wg = W
    WS = torch.cat([torch.stack(W_inits, dim=2), torch.stack(S_inits, dim=2)], dim=-1)  # [B,H,NC,Dv,2Dk]
    # Y = (beta Q - 2 AK) W^T + (c Q) S^T + 2 AV as one matmul over the stacked [W | S] (contraction 2Dk)
    Y = torch.cat([beta.unsqueeze(-1) * qc - 2.0 * AK, c.unsqueeze(-1) * qc], dim=-1) @ WS.transpose(-1, -2)
    Y = Y + 2.0 * AV
    if p:   # first chunk entered mid-way: its gradients were taken at the anchor, not at W_init
        corr = -2.0 * AK[:, :, :1] @ (Wa - W_inits[0]).unsqueeze(2).transpose(-1, -2)
        Y = torch.cat([Y[:, :, :1] + corr, Y[:, :, 1:]], dim=2)
    y = Y.reshape(B, H, NC * b, -1)[:, :, p:p + T]
    anchor = W if (p + T) % b == 0 else last_anchor
    return y, (W, S, anchor)


# ------------------------------------------------------------------------------------------------------ deep memory
def deep_memory_chunked(q, k, v, theta, eta, alpha, state, *, chunk_size, chunk_offset=0, act="gelu"):
    """Chunk-wise dual form of the deep MLP memory (layer by layer, TTT-MLP).

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state = (weights, momenta[, anchor]) with weights[l] and
    momenta[l] [B,H,d_l,d_{l-1}]. Returns y [B,H,T,Dv] and (weights, momenta, anchor weights).

    The map is not affine in the weights, so chunks run in order; inside a chunk everything is a matmul:
      1. forward the chunk's keys through the gradient weights Wg (pre-activations Z_l, layer inputs H_l) and
         backprop the loss by hand: Delta_L = 2 (out - V), Delta_{l-1} = (Delta_l Wg_l) * act'(Z_{l-1}),
         so token j's layer-l gradient is Delta_l[j]^T H_l[j] (never formed as a [D, D] tensor per token);
      2. read-out: layer l's pre-activation for query i under the weights of token i is
         beta_i R W_l^T + c_i R S_l^T - (Ctheta * (R H_l^T)) Delta_l       (R = the read path's layer input);
      3. boundary: W_l <- beta_L W_l + c_L S_l - Delta_l^T diag(u) H_l,  S_l <- a_L S_l - Delta_l^T diag(w) H_l.
    The gate coefficients of all chunks are built in parallel up front.
    """
    b, p = int(chunk_size), int(chunk_offset)
    if not 0 <= p < b:
        raise ValueError(f"chunk_offset must be in [0, {b}), got {p}")
    Ws, Ss, Wa = _unpack_deep_state(state, p)
    B, H, T, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape), (Ws, Ss, Wa)
    qc, kc, vc, th, et, al, valid, NC = pad_to_chunks(q, k, v, theta, eta, alpha, b, p)
    beta, c, Ctheta, u, w, a_last = gate_coefficients(th, et, al, valid)
    L = len(Ws)
    ys = []
    Wg = Wa if p else Ws
    # unbind once (see linear_memory_chunked): per-chunk views with a cheap backward
    per_chunk = zip(qc.unbind(2), kc.unbind(2), vc.unbind(2), beta.unsqueeze(-1).unbind(2), c.unsqueeze(-1).unbind(2),
                    Ctheta.unbind(2), u.unsqueeze(-1).unbind(2), w.unsqueeze(-1).unbind(2),
                    beta[..., -1, None, None].unbind(2), c[..., -1, None, None].unbind(2),
                    a_last[..., None, None].unbind(2))
    for Qn, Kn, Vn, bn, cn, Cn, un, wn, bL, cL, aL in per_chunk:
        # 1. gradients at the chunk's gradient weights, by hand
        inputs, pre = [Kn], []
        x = Kn
        for l, wg in enumerate(Wg):
            z = x @ wg.transpose(-1, -2)
            pre.append(z)
            x = activation(z, act) if l < L - 1 else z
            if l < L - 1:
                inputs.append(x)
        deltas = [None] * L
        d = 2.0 * (x - Vn)
        for l in reversed(range(L)):
            deltas[l] = d
            if l > 0:
                d = (d @ Wg[l]) * activation_grad(pre[l - 1], act)
        # 2. read-out with every token's own (never materialised) weights
        r = Qn
        for l in range(L):
            dout = Ws[l].shape[-2]   # one matmul against the stacked [W; S] (rows), then the per-token mix
            rw, rs = (r @ torch.cat([Ws[l], Ss[l]], dim=-2).transpose(-1, -2)).split(dout, dim=-1)
            z = bn * rw + cn * rs - (Cn * (r @ inputs[l].transpose(-1, -2))) @ deltas[l]
            r = activation(z, act) if l < L - 1 else z
        ys.append(r)
        # 3. chunk-boundary state
        last_anchor = Wg
        new_W, new_S = [], []
        for l in range(L):
            G = deltas[l].transpose(-1, -2) @ torch.cat([un * inputs[l], wn * inputs[l]], dim=-1)
            din = inputs[l].shape[-1]
            new_W.append(bL * Ws[l] + cL * Ss[l] - G[..., :din])
            new_S.append(aL * Ss[l] - G[..., din:])
        Ws, Ss = tuple(new_W), tuple(new_S)
        Wg = Ws
    y = torch.stack(ys, dim=2).reshape(B, H, NC * b, -1)[:, :, p:p + T]
    anchor = Ws if (p + T) % b == 0 else last_anchor
    return y, (Ws, Ss, tuple(anchor))
