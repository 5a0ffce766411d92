"""Deep (MLP) memory: the chunk loop of the dual form as one autograd Function with a hand-written backward.

Same math as :func:`memtrain.kernels.titans.chunked.deep_memory_chunked` (docs/titans_kernels.md#the-memory-exactly, TTT-MLP dual form), which the
tests compare it with (and both with the spec in :mod:`.reference`), in fp64 to rounding. Why it exists: at the
chunk sizes the models use (16-64) a chunk's matmuls are small ([B·H, b, d]) while the memory state is large
(d_l × d_{l+1} per head and layer), so the loop is bound by passes over state-sized tensors and by per-op
overhead. Autograd through the dual form records ~250 ops per chunk and replays them, zero-filling and summing
state-sized gradient buffers; here the forward runs without a graph, writes each chunk's end state straight into
one buffer `[NC + 1, G, d_{l+1}, d_l]` per layer and keeps the chunk's chunk-sized intermediates (`[G, b, d]` and
`[G, b, b]`: no state-sized tensor besides the boundary states); the backward walks the chunks in reverse and
applies the chain rule written out below, accumulating state gradients in place (`baddbmm_`, `addcmul_`) and
taking the scalar-gate gradients as flat dot products (`vecdot`). (Recomputing the intermediates in the backward
instead would save their memory at ~1/3 more kernel time: measured 1.55× vs 1.29× over the chunked form at b = 16.)
The forward contains a hand-written gradient, so its backward needs the activation's second derivative. The
gate-coefficient matrices are built outside (:func:`.chunked.gate_coefficients`, autograd), so gradients reach
θ, η, α through them.

One chunk, G = B·H matrices, layers l = 0..L-1 with weights W_l `[G, d_{l+1}, d_l]`:
    keys     x_0 = K, z_l = x_l Wg_lᵀ, x_{l+1} = act(z_l), out = z_{L-1}
    errors   d_{L-1} = 2 (out − V),  d_{l-1} = (d_l Wg_l) ⊙ act'(z_{l-1})
    read-out r_0 = Q, ρ_l = β ⊙ r_l W_lᵀ + c ⊙ r_l S_lᵀ − (Cθ ⊙ r_l x_lᵀ) d_l, r_{l+1} = act(ρ_l), y = ρ_{L-1}
    boundary W_l ← β_L W_l + c_L S_l − d_lᵀ (u ⊙ x_l),  S_l ← a_L S_l − d_lᵀ (w ⊙ x_l)
Wg (the weights the chunk's gradients are taken at) is the chunk-start W, except for a first chunk entered
mid-way, where it is the anchor carried in the state. With one layer (no activation: z_0 is the output) this is
the linear memory, which :func:`linear_memory_fused` runs through the same loop.
"""
from __future__ import annotations

import torch

from .chunked import gate_coefficients, pad_to_chunks
from .reference import _unpack_deep_state, _unpack_linear_state, activation, activation_grad

__all__ = ["deep_memory_fused", "linear_memory_fused"]


def _activation_grad2(x: torch.Tensor, name: str) -> torch.Tensor:
    """Second derivative of the activation (the backward of the hand-written error recursion needs it)."""
    if name == "gelu":  # gelu'' = φ(x) (2 − x²)
        return torch.exp(-0.5 * x * x) * 0.3989422804014327 * (2.0 - x * x)
    if name == "silu":  # silu'' = s (1 − s) (2 + x (1 − 2 s)), s = σ(x)
        s = torch.sigmoid(x)
        return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
    raise ValueError(f"unknown activation {name!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius product of `[G, m, n]` tensors -> `[G, 1, 1]` (one pass, no temporary; a [1 × mn]
    by [mn × 1] bmm is 10× slower on CPU)."""
    G = a.shape[0]
    return torch.linalg.vecdot(a.reshape(G, -1), b.reshape(G, -1)).view(G, 1, 1)


def _keys(K, V, Wg, act):
    """Keys through the gradient weights and the hand-written backprop of ‖M(k) − v‖²:
    (xs = layer inputs, zs = pre-activations, ss = act'(zs) of the hidden layers, ds = errors)."""
    L = len(Wg)
    xs, zs, ss, x = [K], [], [], K
    for l in range(L):
        z = x @ Wg[l].mT
        zs.append(z)
        x = z
        if l < L - 1:
            x = activation(z, act)
            xs.append(x)
            ss.append(activation_grad(z, act))
    ds = [None] * L
    d = 2.0 * (x - V)
    for l in reversed(range(L)):
        ds[l] = d
        if l > 0:
            d = (d @ Wg[l]) * ss[l - 1]
    return xs, zs, ss, ds


def _readout(Q, bn, cn, Cn, Ws, Ss, xs, ds, act):
    """Read-out with every token's own (never formed) weights: y and (rs, rws, rss, Ms, zrs) for the backward."""
    L = len(Ws)
    rs, rws, rss, Ms, zrs, r = [Q], [], [], [], [], Q
    for l in range(L):
        rw, rsv, M = r @ Ws[l].mT, r @ Ss[l].mT, r @ xs[l].mT     # M [G, b, b]
        z = torch.baddbmm(bn * rw + cn * rsv, Cn * M, ds[l], alpha=-1.0)
        rws.append(rw), rss.append(rsv), Ms.append(M), zrs.append(z)
        r = z
        if l < L - 1:
            r = activation(z, act)
            rs.append(r)
    return r, (rs, rws, rss, Ms, zrs)


def _boundary_into(out_W, out_S, bL, cL, aL, un, wn, Ws, Ss, xs, ds):
    """End-of-chunk state written into the buffers out_W[l], out_S[l] (no state-sized temporaries)."""
    for l in range(len(Ws)):
        dT = ds[l].mT
        torch.mul(Ws[l], bL, out=out_W[l])
        out_W[l].addcmul_(Ss[l], cL).baddbmm_(dT, un * xs[l], alpha=-1.0)
        torch.mul(Ss[l], aL, out=out_S[l])
        out_S[l].baddbmm_(dT, wn * xs[l], alpha=-1.0)


def _chunk_backward(gy, gWn, gSn, bn, cn, Cn, un, wn, bL, cL, aL, Ws, Ss, Wg, keys, read, act, share_wg):
    """Gradients of one chunk. gy `[G, b, d_L]`; gWn, gSn: per layer, gradients of the chunk's end state.
    With `share_wg` (Wg is the chunk-start W itself) the Wg gradients are added into gW. Returns (gQ, gK, gV,
    g_bn, g_cn, g_Cn, g_un, g_wn, g_bL, g_cL, g_aL, gW, gS, gWg)."""
    xs, zs, ss, ds = keys
    rs, rws, rss, Ms, zrs = read
    L = len(Ws)
    g_x, g_d, gW, gS = [None] * L, [None] * L, [None] * L, [None] * L
    g_un = g_wn = g_bn = g_cn = g_Cn = g_bL = g_cL = g_aL = 0.0
    # boundary: W' = bL W + cL S − dᵀ(u x), S' = aL S − dᵀ(w x)
    for l in range(L):
        gW[l] = gWn[l] * bL
        gS[l] = (gSn[l] * aL).addcmul_(gWn[l], cL)
        g_bL = g_bL + _dot(gWn[l], Ws[l])
        g_cL = g_cL + _dot(gWn[l], Ss[l])
        g_aL = g_aL + _dot(gSn[l], Ss[l])
        dW, dS = ds[l] @ gWn[l], ds[l] @ gSn[l]                        # [G, b, d_l]
        g_un = g_un - (dW * xs[l]).sum(-1, keepdim=True)
        g_wn = g_wn - (dS * xs[l]).sum(-1, keepdim=True)
        g_x[l] = -(un * dW + wn * dS)
        g_d[l] = torch.baddbmm(-((un * xs[l]) @ gWn[l].mT), wn * xs[l], gSn[l].mT, alpha=-1.0)
    gWg = gW if share_wg else [None] * L
    # read-out, top layer down: ρ_l = β r W_lᵀ + c r S_lᵀ − (Cθ ⊙ r x_lᵀ) d_l
    gz = gy
    for l in reversed(range(L)):
        r = rs[l]
        g_bn = g_bn + (gz * rws[l]).sum(-1, keepdim=True)
        g_cn = g_cn + (gz * rss[l]).sum(-1, keepdim=True)
        bgz, cgz = bn * gz, cn * gz
        gW[l].baddbmm_(bgz.mT, r)
        gS[l].baddbmm_(cgz.mT, r)
        gA = -(gz @ ds[l].mT)                                          # [G, b, b]
        g_d[l].baddbmm_((Cn * Ms[l]).mT, gz, alpha=-1.0)
        g_Cn = g_Cn + gA * Ms[l]
        E = gA * Cn
        g_r = (bgz @ Ws[l]).baddbmm_(cgz, Ss[l]).baddbmm_(E, xs[l])
        g_x[l].baddbmm_(E.mT, r)
        if l > 0:
            gz = g_r * activation_grad(zrs[l - 1], act)
    gQ = g_r
    # errors, bottom layer up: d_{l-1} = (d_l Wg_l) ⊙ act'(z_{l-1})
    g_zk = [None] * L
    for l in range(1, L):
        gp = g_d[l - 1] * ss[l - 1]
        g_zk[l - 1] = g_d[l - 1] * (ds[l] @ Wg[l]) * _activation_grad2(zs[l - 1], act)
        g_d[l].baddbmm_(gp, Wg[l].mT)
        gWg[l] = ds[l].mT @ gp if gWg[l] is None else gWg[l].baddbmm_(ds[l].mT, gp)
    # d_{L-1} = 2 (out − V) with out = z_{L-1}; then the keys' forward, top layer down: z_l = x_l Wg_lᵀ
    g_zk[L - 1] = 2.0 * g_d[L - 1]
    gV = -g_zk[L - 1]
    for l in reversed(range(L)):
        gWg[l] = g_zk[l].mT @ xs[l] if gWg[l] is None else gWg[l].baddbmm_(g_zk[l].mT, xs[l])
        g_x[l].baddbmm_(g_zk[l], Wg[l])
        if l > 0:
            g_zk[l - 1].addcmul_(g_x[l], ss[l - 1])
    return gQ, g_x[0], gV, g_bn, g_cn, g_Cn, g_un, g_wn, g_bL, g_cL, g_aL, gW, gS, gWg


def _coefficients(n, beta, c, Ctheta, u, w, a_last):
    """Chunk n's gate coefficients in the shapes the chunk functions use (bn, cn, Cn, un, wn, bL, cL, aL)."""
    return (beta[:, n, :, None], c[:, n, :, None], Ctheta[:, n], u[:, n, :, None], w[:, n, :, None],
            beta[:, n, -1, None, None], c[:, n, -1, None, None], a_last[:, n, None, None])


class _DeepChunkLoop(torch.autograd.Function):
    """Chunks in order. Inputs: act, L, then (G = B·H) qc, kc `[G, NC, b, d_0]`, vc `[G, NC, b, d_L]`, beta, c,
    u, w `[G, NC, b]`, Ctheta `[G, NC, b, b]`, a_last `[G, NC]`, then the state as 3·L tensors `[G, d_{l+1}, d_l]`
    (weights, momenta, anchor weights = the first chunk's Wg). Outputs: y `[G, NC, b, d_L]`, the final weights
    (L), momenta (L) and the last chunk's Wg (L)."""

    @staticmethod
    def forward(ctx, act, L, qc, kc, vc, beta, c, Ctheta, u, w, a_last, *state):
        NC = qc.shape[1]
        # bufs_W[l][n] = W_l at the start of chunk n (n = NC: the end); written in place, saved for the backward
        bufs_W = [state[l].new_empty(NC + 1, *state[l].shape) for l in range(L)]
        bufs_S = [state[l].new_empty(NC + 1, *state[l].shape) for l in range(L)]
        for l in range(L):
            bufs_W[l][0].copy_(state[l])
            bufs_S[l][0].copy_(state[L + l])
        anchor = list(state[2 * L:])
        ys, kept = [], []
        keep = any(ctx.needs_input_grad)  # chunk-sized intermediates for the backward (no recompute)
        for n in range(NC):
            Ws, Ss = [b[n] for b in bufs_W], [b[n] for b in bufs_S]
            Wg = anchor if n == 0 else Ws
            bn, cn, Cn, un, wn, bL, cL, aL = _coefficients(n, beta, c, Ctheta, u, w, a_last)
            keys = _keys(kc[:, n], vc[:, n], Wg, act)
            y, read = _readout(qc[:, n], bn, cn, Cn, Ws, Ss, keys[0], keys[3], act)
            if keep:
                kept.append((keys, read))
            _boundary_into([b[n + 1] for b in bufs_W], [b[n + 1] for b in bufs_S], bL, cL, aL, un, wn, Ws, Ss,
                           keys[0], keys[3])
            ys.append(y)
        ctx.save_for_backward(qc, kc, vc, beta, c, Ctheta, u, w, a_last, *bufs_W, *bufs_S, *anchor)
        ctx.act, ctx.L, ctx.kept = act, L, kept
        last_wg = anchor if NC == 1 else [b[NC - 1] for b in bufs_W]
        return (torch.stack(ys, dim=1), *(b[NC].clone() for b in bufs_W), *(b[NC].clone() for b in bufs_S),
                *(t.clone() for t in last_wg))

    @staticmethod
    def backward(ctx, gy, *g_state):
        act, L = ctx.act, ctx.L
        qc, kc, vc, beta, c, Ctheta, u, w, a_last, *rest = ctx.saved_tensors
        bufs_W, bufs_S, anchor = rest[:L], rest[L:2 * L], list(rest[2 * L:])
        gWn, gSn = [g.contiguous() for g in g_state[:L]], [g.contiguous() for g in g_state[L:2 * L]]
        g_last_wg = g_state[2 * L:]
        NC = qc.shape[1]
        gq, gk, gv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        g_beta, g_c, g_a = torch.empty_like(beta), torch.empty_like(c), torch.empty_like(a_last)
        g_Ct, g_u, g_w = torch.empty_like(Ctheta), torch.empty_like(u), torch.empty_like(w)
        for n in reversed(range(NC)):
            Ws, Ss = [b[n] for b in bufs_W], [b[n] for b in bufs_S]
            Wg = anchor if n == 0 else Ws
            coef = _coefficients(n, beta, c, Ctheta, u, w, a_last)
            keys, read = ctx.kept[n]
            share = n > 0 and n < NC - 1  # chunk NC-1's Wg is also an output: its gradient is kept apart
            (gQ, gK, gV, g_bn, g_cn, g_Cn, g_un, g_wn, g_bL, g_cL, g_aL, gW, gS, gWg) = _chunk_backward(
                gy[:, n], gWn, gSn, *coef, Ws, Ss, Wg, keys, read, act, share)
            if n == NC - 1:
                gWg = [a + b for a, b in zip(gWg, g_last_wg)]
            gq[:, n], gk[:, n], gv[:, n] = gQ, gK, gV
            g_beta[:, n], g_c[:, n] = g_bn.squeeze(-1), g_cn.squeeze(-1)
            g_beta[:, n, -1] += g_bL.view(-1)
            g_c[:, n, -1] += g_cL.view(-1)
            g_a[:, n] = g_aL.view(-1)
            g_Ct[:, n], g_u[:, n], g_w[:, n] = g_Cn, g_un.squeeze(-1), g_wn.squeeze(-1)
            if n == 0:
                return (None, None, gq, gk, gv, g_beta, g_c, g_Ct, g_u, g_w, g_a, *gW, *gS, *gWg)
            gWn = gW if share else [a + b for a, b in zip(gW, gWg)]  # chunk n's Wg is chunk n − 1's end W
            gSn = gS


def deep_memory_fused(q, k, v, theta, eta, alpha, state, *, chunk_size, chunk_offset=0, act="gelu"):
    """Deep MLP memory, chunk loop with a hand-written backward; the signature and results of
    :func:`.chunked.deep_memory_chunked`: q, k `[B,H,T,Dk]`, v `[B,H,T,Dv]`, gates `[B,H,T]`, state (weights,
    momenta[, anchor]) with weights[l] `[B,H,d_l,d_{l-1}]`. Returns y `[B,H,T,Dv]` and (weights, momenta, anchor)."""
    b, p = int(chunk_size), int(chunk_offset)
    if not 0 <= p < b:
        raise ValueError(f"chunk_offset must be in [0, {b}), got {p}")
    activation(q.new_zeros(()), act)  # an unknown activation fails here, not inside the backward
    Ws, Ss, Wa = _unpack_deep_state(state, p)
    if not p:  # a chunk starts here: its gradients are taken at W itself, whatever anchor a 3-tuple carries
        Wa = Ws
    B, H, T, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape), (Ws, Ss, Wa)
    qc, kc, vc, th, et, al, valid, NC = pad_to_chunks(q, k, v, theta, eta, alpha, b, p)
    coefficients = gate_coefficients(th, et, al, valid)
    L, G = len(Ws), B * H
    flat = [t.reshape(G, *t.shape[2:]) for t in (qc, kc, vc, *coefficients)]
    states = [t.reshape(G, *t.shape[-2:]) for t in (*Ws, *Ss, *Wa)]
    out = _DeepChunkLoop.apply(act, L, *flat, *states)
    y = out[0].reshape(B, H, NC * b, -1)[:, :, p:p + T]
    new_W, new_S, last_wg = ([t.view(B, H, *t.shape[1:]) for t in out[1 + i * L:1 + (i + 1) * L]] for i in range(3))
    anchor = new_W if (p + T) % b == 0 else last_wg
    return y, (tuple(new_W), tuple(new_S), tuple(anchor))


def linear_memory_fused(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0):
    """The linear memory M(x) = W x as the one-layer case of :func:`deep_memory_fused` (the activation only acts
    between layers, so one layer is exactly W x); the signature and results of
    :func:`.chunked.linear_memory_chunked`: state None | (W, S) | (W, S, W_anchor), each `[B,H,Dv,Dk]`.

    Why not the chunked form on CPU: autograd through it spent most of its time outside the matrix products
    (state-sized `cat`s, ~100 small ops per call in its backward), and its boundary map costs O(Dk² Dv) per chunk
    (`Wg @ P`, `P = Kᵀ diag(u) K`) where this loop goes through the keys, O(b Dk Dv). Forward + backward at
    B 4, H 4, T 256, D 64, b 16 (fp32, 1 thread): 57 → 18 ms (docs/titans_kernels.md#linear-memory-on-cpu)."""
    W, S, Wa = _unpack_linear_state(state, q, v, chunk_offset)
    y, (Ws, Ss, As) = deep_memory_fused(q, k, v, theta, eta, alpha, ((W,), (S,), (Wa,)), chunk_size=chunk_size,
                                        chunk_offset=chunk_offset)
    return y, (Ws[0], Ss[0], As[0])
