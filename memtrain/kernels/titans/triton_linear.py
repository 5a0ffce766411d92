"""Triton kernels for the linear Titans memory: the chunk step, forward and hand-written backward.

One program per (batch, head) walks the chunks in order (backward: in reverse) with the state (W, S) and the
gradient-memory W_grad held on chip; per chunk it does the dual-form matmuls of docs/titans_kernels.md#the-memory-exactly:

    E = K W_grad^T - V                      [b, Dv]
    Y = diag(beta) Q W^T + diag(c) Q S^T - 2 (Ctheta * Q K^T) E
    W <- beta_L W + c_L S - 2 E^T diag(u) K ;   S <- a_L S - 2 E^T diag(w) K

The gate coefficients (beta, c, Ctheta, u, w, a_L, see :mod:`.chunked`) are O(T b) and are built in torch, so
torch autograd carries their gradients to theta/eta/alpha; the kernels take gradients w.r.t. those coefficients.
Only chunk-boundary states are written to memory (the forward saves each chunk's start state for the backward).

Import this module only after deciding on TRITON_INTERPRET: Triton reads it when the kernels are decorated.
Tested on CPU under TRITON_INTERPRET=1 (tests/kernels/test_titans_triton.py); untested on a real GPU so far.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked import gate_coefficients, pad_to_chunks
from .reference import _unpack_linear_state

__all__ = ["linear_memory_triton", "LinearMemoryChunks"]


@triton.jit
def _tok_tile(ptr, row0, rows, nrows, cols, ncols, width):
    """Load a [rows, cols] tile of a row-major [*, width] matrix starting at row ``row0`` (masked, zero padded)."""
    return tl.load(ptr + (row0 + rows)[:, None] * width + cols[None, :],
                   mask=(rows < nrows)[:, None] & (cols < ncols)[None, :], other=0.0)


@triton.jit
def _chunk_gates(beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, row0, cn, ot, mt, b):
    """One chunk's per-token gates (beta, c, u, w: rows `ot` of the chunk starting at token row0, 0 past its end),
    their values at the chunk's last token (beta_l, c_l) and the chunk's forget product a_l; every Titans kernel,
    forward and backward, reads them alike."""
    beta = tl.load(beta_ptr + row0 + ot, mask=mt, other=0.0)
    c = tl.load(c_ptr + row0 + ot, mask=mt, other=0.0)
    u = tl.load(u_ptr + row0 + ot, mask=mt, other=0.0)
    w = tl.load(w_ptr + row0 + ot, mask=mt, other=0.0)
    return beta, c, u, w, tl.load(beta_ptr + row0 + b - 1), tl.load(c_ptr + row0 + b - 1), tl.load(al_ptr + cn)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, cth_ptr, beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr,
                w0_ptr, s0_ptr, wg0_ptr,
                y_ptr, winit_ptr, sinit_ptr, wf_ptr, sf_ptr, wlast_ptr,
                NC, b, DK, DV,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mt = ot < b
    st_off = ov[:, None] * DK + ok[None, :]
    st_m = (ov < DV)[:, None] & (ok < DK)[None, :]
    W = tl.load(w0_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)
    S = tl.load(s0_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)
    Wg = tl.load(wg0_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)
    Wlast = Wg
    for n in range(NC):
        row0 = bh * NC * b + n * b                       # first token row of this chunk
        cn = bh * NC + n                                 # chunk index
        q = _tok_tile(q_ptr, row0, ot, b, ok, DK, DK)
        k = _tok_tile(k_ptr, row0, ot, b, ok, DK, DK)
        v = _tok_tile(v_ptr, row0, ot, b, ov, DV, DV)
        cth = _tok_tile(cth_ptr, cn * b, ot, b, ot, b, b)
        beta, c, u, w, beta_l, c_l, a_l = _chunk_gates(beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, row0, cn, ot, mt, b)
        # the chunk-start state is the only thing saved for the backward
        tl.store(winit_ptr + cn * DV * DK + st_off, W, mask=st_m)
        tl.store(sinit_ptr + cn * DV * DK + st_off, S, mask=st_m)
        E = tl.dot(k, tl.trans(Wg), input_precision="ieee") - v
        A = cth * tl.dot(q, tl.trans(k), input_precision="ieee")
        Y = (beta[:, None] * tl.dot(q, tl.trans(W), input_precision="ieee")
             + c[:, None] * tl.dot(q, tl.trans(S), input_precision="ieee")
             - 2.0 * tl.dot(A, E, input_precision="ieee"))
        tl.store(y_ptr + (row0 + ot)[:, None] * DV + ov[None, :], Y, mask=mt[:, None] & (ov < DV)[None, :])
        W_new = beta_l * W + c_l * S - 2.0 * tl.dot(tl.trans(E * u[:, None]), k, input_precision="ieee")
        S = a_l * S - 2.0 * tl.dot(tl.trans(E * w[:, None]), k, input_precision="ieee")
        Wlast = Wg
        W = W_new
        Wg = W_new
    tl.store(wf_ptr + bh * DV * DK + st_off, W, mask=st_m)
    tl.store(sf_ptr + bh * DV * DK + st_off, S, mask=st_m)
    tl.store(wlast_ptr + bh * DV * DK + st_off, Wlast, mask=st_m)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, cth_ptr, beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr,
                winit_ptr, sinit_ptr, wg0_ptr,
                dy_ptr, dwf_ptr, dsf_ptr, dwlast_ptr,
                dq_ptr, dk_ptr, dv_ptr, dcth_ptr, dbeta_ptr, dc_ptr, du_ptr, dw_ptr, dal_ptr,
                dw0_ptr, ds0_ptr, dwg0_ptr,
                NC, b, DK, DV,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mt = ot < b
    m_tk = mt[:, None] & (ok < DK)[None, :]
    m_tv = mt[:, None] & (ov < DV)[None, :]
    st_off = ov[:, None] * DK + ok[None, :]
    st_m = (ov < DV)[:, None] & (ok < DK)[None, :]
    dW = tl.load(dwf_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)      # gradient w.r.t. the state
    dS = tl.load(dsf_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)      # after the current chunk
    dWlast = tl.load(dwlast_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)
    Wg0 = tl.load(wg0_ptr + bh * DV * DK + st_off, mask=st_m, other=0.0)
    dWg = dW * 0.0
    for i in range(NC):
        n = NC - 1 - i
        row0 = bh * NC * b + n * b
        cn = bh * NC + n
        first = tl.where(n == 0, 1.0, 0.0)               # chunk 0 takes its gradients at the anchor
        last_chunk = tl.where(n == NC - 1, 1.0, 0.0)
        W = tl.load(winit_ptr + cn * DV * DK + st_off, mask=st_m, other=0.0)
        S = tl.load(sinit_ptr + cn * DV * DK + st_off, mask=st_m, other=0.0)
        Wg = W * (1.0 - first) + Wg0 * first
        q = _tok_tile(q_ptr, row0, ot, b, ok, DK, DK)
        k = _tok_tile(k_ptr, row0, ot, b, ok, DK, DK)
        v = _tok_tile(v_ptr, row0, ot, b, ov, DV, DV)
        dY = _tok_tile(dy_ptr, row0, ot, b, ov, DV, DV)
        cth = _tok_tile(cth_ptr, cn * b, ot, b, ot, b, b)
        beta, c, u, w, beta_l, c_l, a_l = _chunk_gates(beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, row0, cn, ot, mt, b)
        # recompute the chunk's forward intermediates from its saved start state
        E = tl.dot(k, tl.trans(Wg), input_precision="ieee") - v
        P = tl.dot(q, tl.trans(k), input_precision="ieee")
        A = cth * P
        QW = tl.dot(q, tl.trans(W), input_precision="ieee")
        QS = tl.dot(q, tl.trans(S), input_precision="ieee")
        KdW = tl.dot(k, tl.trans(dW), input_precision="ieee")                    # [BT, BV]
        KdS = tl.dot(k, tl.trans(dS), input_precision="ieee")
        dE = -2.0 * (tl.dot(tl.trans(A), dY, input_precision="ieee") + u[:, None] * KdW + w[:, None] * KdS)
        dA = -2.0 * tl.dot(dY, tl.trans(E), input_precision="ieee")
        dP = dA * cth
        is_last = ot == b - 1                                                     # beta_L, c_L are beta[b-1], c[b-1]
        dbeta = tl.sum(dY * QW, axis=1) + tl.where(is_last, tl.sum(tl.sum(dW * W, axis=1), axis=0), 0.0)
        dc = tl.sum(dY * QS, axis=1) + tl.where(is_last, tl.sum(tl.sum(dW * S, axis=1), axis=0), 0.0)
        da_l = tl.sum(tl.sum(dS * S, axis=1), axis=0)
        EdW = tl.dot(E, dW, input_precision="ieee")                               # [BT, BK]
        EdS = tl.dot(E, dS, input_precision="ieee")
        dq = (beta[:, None] * tl.dot(dY, W, input_precision="ieee") + c[:, None] * tl.dot(dY, S, input_precision="ieee")
              + tl.dot(dP, k, input_precision="ieee"))
        dk = (tl.dot(tl.trans(dP), q, input_precision="ieee") + tl.dot(dE, Wg, input_precision="ieee")
              - 2.0 * u[:, None] * EdW - 2.0 * w[:, None] * EdS)
        tl.store(dq_ptr + (row0 + ot)[:, None] * DK + ok[None, :], dq, mask=m_tk)
        tl.store(dk_ptr + (row0 + ot)[:, None] * DK + ok[None, :], dk, mask=m_tk)
        tl.store(dv_ptr + (row0 + ot)[:, None] * DV + ov[None, :], -dE, mask=m_tv)
        tl.store(dcth_ptr + (cn * b + ot)[:, None] * b + ot[None, :], dA * P, mask=mt[:, None] & mt[None, :])
        tl.store(dbeta_ptr + row0 + ot, dbeta, mask=mt)
        tl.store(dc_ptr + row0 + ot, dc, mask=mt)
        tl.store(du_ptr + row0 + ot, -2.0 * tl.sum(EdW * k, axis=1), mask=mt)
        tl.store(dw_ptr + row0 + ot, -2.0 * tl.sum(EdS * k, axis=1), mask=mt)
        tl.store(dal_ptr + cn, da_l)
        # gradient w.r.t. this chunk's gradient-memory: the start state, or the anchor for chunk 0
        dWg = tl.dot(tl.trans(dE), k, input_precision="ieee") + last_chunk * dWlast
        dW_prev = (beta_l * dW + tl.dot(tl.trans(dY * beta[:, None]), q, input_precision="ieee")
                   + (1.0 - first) * dWg)
        dS = c_l * dW + a_l * dS + tl.dot(tl.trans(dY * c[:, None]), q, input_precision="ieee")
        dW = dW_prev
    tl.store(dw0_ptr + bh * DV * DK + st_off, dW, mask=st_m)
    tl.store(ds0_ptr + bh * DV * DK + st_off, dS, mask=st_m)
    tl.store(dwg0_ptr + bh * DV * DK + st_off, dWg, mask=st_m)


def _blocks(b, Dk, Dv):
    p2 = lambda x: max(16, triton.next_power_of_2(int(x)))  # noqa: E731  (tl.dot needs >= 16)
    BT, BK, BV = p2(b), p2(Dk), p2(Dv)
    return BT, BK, BV, (8 if BT * max(BK, BV) >= 64 * 64 else 4)


class LinearMemoryChunks(torch.autograd.Function):
    """Whole-sequence chunk loop as one autograd node.

    Inputs (BH = B*H, N = NC*b, all contiguous, one float dtype): q, k [BH,N,Dk]; v [BH,N,Dv];
    Ctheta [BH,NC,b,b]; beta, c, u, w [BH,N]; a_last [BH,NC]; W0, S0, W_grad0 [BH,Dv,Dk]; b (int).
    Outputs: y [BH,N,Dv]; W_final, S_final, W_grad of the last chunk (the next anchor) [BH,Dv,Dk].
    """

    @staticmethod
    def forward(ctx, q, k, v, cth, beta, c, u, w, a_last, W0, S0, Wg0, b):
        BH, N, Dk = q.shape
        Dv, NC = v.shape[-1], N // b
        y = torch.empty_like(v)
        winit = q.new_empty(BH, NC, Dv, Dk)
        sinit = torch.empty_like(winit)
        wf, sf, wlast = (q.new_empty(BH, Dv, Dk) for _ in range(3))
        BT, BK, BV, warps = _blocks(b, Dk, Dv)
        _fwd_kernel[(BH,)](q, k, v, cth, beta, c, u, w, a_last, W0, S0, Wg0, y, winit, sinit, wf, sf, wlast,
                           NC, b, Dk, Dv, BT=BT, BK=BK, BV=BV, num_warps=warps)
        ctx.save_for_backward(q, k, v, cth, beta, c, u, w, a_last, winit, sinit, Wg0)
        ctx.b = b
        return y, wf, sf, wlast

    @staticmethod
    def backward(ctx, dy, dwf, dsf, dwlast):
        q, k, v, cth, beta, c, u, w, a_last, winit, sinit, Wg0 = ctx.saved_tensors
        b = ctx.b
        BH, N, Dk = q.shape
        Dv, NC = v.shape[-1], N // b
        z = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()  # noqa: E731
        dy, dwf, dsf, dwlast = z(dy, v), z(dwf, Wg0), z(dsf, Wg0), z(dwlast, Wg0)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dcth, dbeta, dc, du, dw, dal = (torch.empty_like(x) for x in (cth, beta, c, u, w, a_last))
        dw0, ds0, dwg0 = (torch.empty_like(Wg0) for _ in range(3))
        BT, BK, BV, warps = _blocks(b, Dk, Dv)
        _bwd_kernel[(BH,)](q, k, v, cth, beta, c, u, w, a_last, winit, sinit, Wg0, dy, dwf, dsf, dwlast,
                           dq, dk, dv, dcth, dbeta, dc, du, dw, dal, dw0, ds0, dwg0,
                           NC, b, Dk, Dv, BT=BT, BK=BK, BV=BV, num_warps=warps)
        return dq, dk, dv, dcth, dbeta, dc, du, dw, dal, dw0, ds0, dwg0, None


def linear_memory_triton(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0):
    """Same contract as :func:`memtrain.kernels.titans.chunked.linear_memory_chunked`, Triton chunk loop.

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state None | (W, S) | (W, S, W_anchor) each [B,H,Dv,Dk].
    Computes in fp64 for fp64 inputs, else fp32 (bf16/fp16 are upcast; outputs cast back).
    """
    b, p = int(chunk_size), int(chunk_offset)
    W, S, Wa = _unpack_linear_state(state, q, v, p)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        return v.new_zeros(v.shape), (W, S, Wa)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, th, et, al, valid, NC = pad_to_chunks(*(x.to(cd) for x in (q, k, v, theta, eta, alpha)), b, p)
    beta, c, cth, u, w, a_last = gate_coefficients(th, et, al, valid)
    BH, N = B * H, NC * b
    flat = lambda x, *tail: x.reshape(BH, *tail).contiguous()  # noqa: E731
    st = lambda x: flat(x.to(cd), Dv, Dk)  # noqa: E731
    y, wf, sf, wlast = LinearMemoryChunks.apply(
        flat(qc, N, Dk), flat(kc, N, Dk), flat(vc, N, Dv), flat(cth, NC, b, b), flat(beta, N), flat(c, N),
        flat(u, N), flat(w, N), flat(a_last, NC), st(W), st(S), st(Wa if p else W), b)
    y = y.reshape(B, H, N, Dv)[:, :, p:p + T].to(q.dtype)
    wf, sf, wlast = (x.reshape(B, H, Dv, Dk).to(W.dtype) for x in (wf, sf, wlast))
    anchor = wf if (p + T) % b == 0 else wlast
    return y, (wf, sf, anchor)
