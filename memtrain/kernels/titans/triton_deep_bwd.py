"""Backward Triton kernel of the deep (MLP, depth 2 or 3) Titans memory chunk scan (forward: :mod:`.triton_deep`).

One program per (batch, head) walks the chunks in reverse. Per chunk it reloads the chunk-start states the forward
saved, recomputes the chunk's chunk-sized intermediates on chip (keys, errors, read-out), and applies the chain rule
of :func:`.deep_fused._chunk_backward` line by line (docs/titans_kernels.md#triton-deep-memory-kernel), carrying the
state gradients (dW_l, dS_l) on chip from chunk to chunk. Chunk n's gradient weights Wg are its start weights, so
their gradient joins dW_l; chunk 0's Wg is the anchor input, whose gradient is written separately.
Layer slots as in the forward: 0 = first [DH, DK], 1 = middle [DH, DH] (DEPTH == 3 only), 2 = last [DV, DH].
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_deep import _act, _act_grad, _load_mat, _mm, _read, _store_mat
from .triton_linear import _chunk_gates

__all__ = ["bwd_kernel"]


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    # the forward contains the hand-written gradient of ||M(k) - v||^2, so its backward needs act''
    if ACT == 0:                                          # gelu'' = phi(z) (2 - z^2)
        return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    else:                                                 # silu'' = s (1 - s) (2 + z (1 - 2 s))
        s = tl.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


@triton.jit
def _boundary_bwd(gWn, gSn, W, S, d, x, u, w):
    """Backward of W' = β_L W + c_L S − dᵀ(u x), S' = a_L S − dᵀ(w x) for one layer, except the β_L/c_L/a_L
    scaling of the state gradients (the caller does it). Returns (<gW',W>, <gW',S>, <gS',S>, g_u, g_w, g_x, g_d)."""
    dW = _mm(d, gWn)                                      # [BT, din]
    dS = _mm(d, gSn)
    g_u = -tl.sum(dW * x, axis=1)
    g_w = -tl.sum(dS * x, axis=1)
    g_x = -(u[:, None] * dW + w[:, None] * dS)
    g_d = -(_mm(u[:, None] * x, tl.trans(gWn)) + _mm(w[:, None] * x, tl.trans(gSn)))
    return (tl.sum(tl.sum(gWn * W, axis=1), axis=0), tl.sum(tl.sum(gWn * S, axis=1), axis=0),
            tl.sum(tl.sum(gSn * S, axis=1), axis=0), g_u, g_w, g_x, g_d)


@triton.jit
def _read_bwd(gz, r, x, d, W, S, A_c, beta, c):
    """Backward of ρ = β ⊙ r Wᵀ + c ⊙ r Sᵀ − (Cθ ⊙ r xᵀ) d. Returns (g_β, g_c, gW, gS, g_d, g_Cθ, g_r, g_x)."""
    M = _mm(r, tl.trans(x))                               # [BT, BT]
    g_beta = tl.sum(gz * _mm(r, tl.trans(W)), axis=1)
    g_c = tl.sum(gz * _mm(r, tl.trans(S)), axis=1)
    bgz = beta[:, None] * gz
    cgz = c[:, None] * gz
    gA = -_mm(gz, tl.trans(d))
    E = gA * A_c
    g_r = _mm(bgz, W) + _mm(cgz, S) + _mm(E, x)
    return (g_beta, g_c, _mm(tl.trans(bgz), r), _mm(tl.trans(cgz), r), -_mm(tl.trans(A_c * M), gz), gA * M, g_r,
            _mm(tl.trans(E), r))


@triton.jit
def bwd_kernel(q_ptr, k_ptr, v_ptr, cth_ptr, beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, dy_ptr,
               dq_ptr, dk_ptr, dv_ptr, dcth_ptr, dbeta_ptr, dc_ptr, du_ptr, dw_ptr, dal_ptr,
               wi0_ptr, si0_ptr, a0_ptr, gwf0_ptr, gsf0_ptr, gwl0_ptr, gw0_ptr, gs0_ptr, ga0_ptr,
               wi1_ptr, si1_ptr, a1_ptr, gwf1_ptr, gsf1_ptr, gwl1_ptr, gw1_ptr, gs1_ptr, ga1_ptr,
               wi2_ptr, si2_ptr, a2_ptr, gwf2_ptr, gsf2_ptr, gwl2_ptr, gw2_ptr, gs2_ptr, ga2_ptr,
               NC, b, DK, DH, DV,
               DEPTH: tl.constexpr, ACT: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr):
    """Per layer: wi/si [G, NC, ...] chunk-start states (from the forward), a = anchor, gwf/gsf/gwl = incoming
    gradients of the final weights, momenta and last Wg; gw/gs/ga = gradients of the initial weights, momenta,
    anchor (outputs). Token-level gradients go to dq, dk, dv, dcth, dbeta, dc, du, dw, dal."""
    g = tl.program_id(0)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    oh = tl.arange(0, BH)
    ov = tl.arange(0, BV)
    mt = ot < b
    n0, n1, n2 = DH * DK, DH * DH, DV * DH
    gW0 = _load_mat(gwf0_ptr + g * n0, oh, DH, ok, DK)    # gradients w.r.t. the state after the current chunk
    gS0 = _load_mat(gsf0_ptr + g * n0, oh, DH, ok, DK)
    gL0 = _load_mat(gwl0_ptr + g * n0, oh, DH, ok, DK)    # ... and w.r.t. the last chunk's Wg (an output too)
    A0 = _load_mat(a0_ptr + g * n0, oh, DH, ok, DK)
    gW2 = _load_mat(gwf2_ptr + g * n2, ov, DV, oh, DH)
    gS2 = _load_mat(gsf2_ptr + g * n2, ov, DV, oh, DH)
    gL2 = _load_mat(gwl2_ptr + g * n2, ov, DV, oh, DH)
    A2 = _load_mat(a2_ptr + g * n2, ov, DV, oh, DH)
    gG0, gG2 = gW0 * 0.0, gW2 * 0.0
    if DEPTH == 3:
        gW1 = _load_mat(gwf1_ptr + g * n1, oh, DH, oh, DH)
        gS1 = _load_mat(gsf1_ptr + g * n1, oh, DH, oh, DH)
        gL1 = _load_mat(gwl1_ptr + g * n1, oh, DH, oh, DH)
        A1 = _load_mat(a1_ptr + g * n1, oh, DH, oh, DH)
        gG1 = gW1 * 0.0
    for i in range(NC):
        n = NC - 1 - i
        row0 = g * NC * b + n * b
        cn = g * NC + n
        first = tl.where(n == 0, 1.0, 0.0)                # chunk 0 takes its gradients at the anchor
        last = tl.where(n == NC - 1, 1.0, 0.0)
        q = _load_mat(q_ptr + row0 * DK, ot, b, ok, DK)
        k = _load_mat(k_ptr + row0 * DK, ot, b, ok, DK)
        v = _load_mat(v_ptr + row0 * DV, ot, b, ov, DV)
        gy = _load_mat(dy_ptr + row0 * DV, ot, b, ov, DV)
        A_c = _load_mat(cth_ptr + cn * b * b, ot, b, ot, b)
        beta, c, u, w, beta_l, c_l, a_l = _chunk_gates(beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, row0, cn, ot, mt, b)
        W0 = _load_mat(wi0_ptr + cn * n0, oh, DH, ok, DK)
        S0 = _load_mat(si0_ptr + cn * n0, oh, DH, ok, DK)
        W2 = _load_mat(wi2_ptr + cn * n2, ov, DV, oh, DH)
        S2 = _load_mat(si2_ptr + cn * n2, ov, DV, oh, DH)
        G0 = W0 * (1.0 - first) + A0 * first
        G2 = W2 * (1.0 - first) + A2 * first
        # ---- recompute the chunk's forward (the forward kept nothing chunk-sized)
        z0 = _mm(k, tl.trans(G0))
        x1 = _act(z0, ACT)
        s0 = _act_grad(z0, ACT)
        if DEPTH == 3:
            W1 = _load_mat(wi1_ptr + cn * n1, oh, DH, oh, DH)
            S1 = _load_mat(si1_ptr + cn * n1, oh, DH, oh, DH)
            G1 = W1 * (1.0 - first) + A1 * first
            z1 = _mm(x1, tl.trans(G1))
            x2 = _act(z1, ACT)
            s1 = _act_grad(z1, ACT)
            d2 = 2.0 * (_mm(x2, tl.trans(G2)) - v)
            p2 = _mm(d2, G2)                              # d_2 Wg_2: d_1 = p2 ⊙ act'(z_1)
            d1 = p2 * s1
            p1 = _mm(d1, G1)
            d0 = p1 * s0
        else:
            x2 = x1
            d2 = 2.0 * (_mm(x2, tl.trans(G2)) - v)
            p2 = _mm(d2, G2)
            d0 = p2 * s0
        zr0 = _read(q, k, d0, W0, S0, A_c, beta, c)
        r1 = _act(zr0, ACT)
        r2 = r1
        if DEPTH == 3:
            zr1 = _read(r1, x1, d1, W1, S1, A_c, beta, c)
            r2 = _act(zr1, ACT)
        # ---- boundary: W' = β_L W + c_L S − dᵀ(u x), S' = a_L S − dᵀ(w x)
        bW, bS, bA, g_u, g_w, gx0, gd0 = _boundary_bwd(gW0, gS0, W0, S0, d0, k, u, w)
        g_bl, g_cl, g_al = bW, bS, bA
        nW0, nS0 = gW0 * beta_l, gS0 * a_l + gW0 * c_l
        bW, bS, bA, gu_, gw_, gx2, gd2 = _boundary_bwd(gW2, gS2, W2, S2, d2, x2, u, w)
        g_bl, g_cl, g_al, g_u, g_w = g_bl + bW, g_cl + bS, g_al + bA, g_u + gu_, g_w + gw_
        nW2, nS2 = gW2 * beta_l, gS2 * a_l + gW2 * c_l
        if DEPTH == 3:
            bW, bS, bA, gu_, gw_, gx1, gd1 = _boundary_bwd(gW1, gS1, W1, S1, d1, x1, u, w)
            g_bl, g_cl, g_al, g_u, g_w = g_bl + bW, g_cl + bS, g_al + bA, g_u + gu_, g_w + gw_
            nW1, nS1 = gW1 * beta_l, gS1 * a_l + gW1 * c_l
        # ---- read-out, top layer down
        g_b, g_c, aW, aS, ad, g_C, g_r, ax = _read_bwd(gy, r2, x2, d2, W2, S2, A_c, beta, c)
        nW2, nS2, gd2, gx2 = nW2 + aW, nS2 + aS, gd2 + ad, gx2 + ax
        if DEPTH == 3:
            gz = g_r * _act_grad(zr1, ACT)
            gb_, gc_, aW, aS, ad, gC_, g_r, ax = _read_bwd(gz, r1, x1, d1, W1, S1, A_c, beta, c)
            g_b, g_c, g_C = g_b + gb_, g_c + gc_, g_C + gC_
            nW1, nS1, gd1, gx1 = nW1 + aW, nS1 + aS, gd1 + ad, gx1 + ax
        gz = g_r * _act_grad(zr0, ACT)
        gb_, gc_, aW, aS, ad, gC_, g_q, ax = _read_bwd(gz, q, k, d0, W0, S0, A_c, beta, c)
        g_b, g_c, g_C = g_b + gb_, g_c + gc_, g_C + gC_
        nW0, nS0, gd0, gx0 = nW0 + aW, nS0 + aS, gd0 + ad, gx0 + ax
        # ---- errors, bottom layer up: d_{l-1} = (d_l Wg_l) ⊙ act'(z_{l-1}); then the keys, top layer down
        gp = gd0 * s0
        if DEPTH == 3:
            gzk0 = gd0 * p1 * _act_grad2(z0, ACT)
            gd1 += _mm(gp, tl.trans(G1))
            gG1 = _mm(tl.trans(d1), gp)
            gp = gd1 * s1
            gzk1 = gd1 * p2 * _act_grad2(z1, ACT)
        else:
            gzk0 = gd0 * p2 * _act_grad2(z0, ACT)
        gd2 += _mm(gp, tl.trans(G2))
        gG2 = _mm(tl.trans(d2), gp)
        gzk2 = 2.0 * gd2
        gG2 += _mm(tl.trans(gzk2), x2)
        gx2 += _mm(gzk2, G2)
        if DEPTH == 3:
            gzk1 += gx2 * s1
            gG1 += _mm(tl.trans(gzk1), x1)
            gx1 += _mm(gzk1, G1)
            gzk0 += gx1 * s0
        else:
            gzk0 += gx2 * s0
        gG0 = _mm(tl.trans(gzk0), k)
        gx0 += _mm(gzk0, G0)
        # ---- token-level gradients of this chunk
        m_tk = mt[:, None] & (ok < DK)[None, :]
        m_tv = mt[:, None] & (ov < DV)[None, :]
        tl.store(dq_ptr + (row0 + ot)[:, None] * DK + ok[None, :], g_q, mask=m_tk)
        tl.store(dk_ptr + (row0 + ot)[:, None] * DK + ok[None, :], gx0, mask=m_tk)
        tl.store(dv_ptr + (row0 + ot)[:, None] * DV + ov[None, :], -gzk2, mask=m_tv)
        _store_mat(dcth_ptr + cn * b * b, g_C, ot, b, ot, b)
        is_last = ot == b - 1                             # β_L, c_L are β, c of the chunk's last token
        tl.store(dbeta_ptr + row0 + ot, g_b + tl.where(is_last, g_bl, 0.0), mask=mt)
        tl.store(dc_ptr + row0 + ot, g_c + tl.where(is_last, g_cl, 0.0), mask=mt)
        tl.store(du_ptr + row0 + ot, g_u, mask=mt)
        tl.store(dw_ptr + row0 + ot, g_w, mask=mt)
        tl.store(dal_ptr + cn, g_al)
        # ---- state gradients before this chunk; chunk n's Wg is its start W (unless n == 0: the anchor)
        gG0, gG2 = gG0 + last * gL0, gG2 + last * gL2
        gW0, gS0 = nW0 + (1.0 - first) * gG0, nS0
        gW2, gS2 = nW2 + (1.0 - first) * gG2, nS2
        if DEPTH == 3:
            gG1 = gG1 + last * gL1
            gW1, gS1 = nW1 + (1.0 - first) * gG1, nS1
    _store_mat(gw0_ptr + g * n0, gW0, oh, DH, ok, DK)
    _store_mat(gs0_ptr + g * n0, gS0, oh, DH, ok, DK)
    _store_mat(ga0_ptr + g * n0, gG0, oh, DH, ok, DK)
    _store_mat(gw2_ptr + g * n2, gW2, ov, DV, oh, DH)
    _store_mat(gs2_ptr + g * n2, gS2, ov, DV, oh, DH)
    _store_mat(ga2_ptr + g * n2, gG2, ov, DV, oh, DH)
    if DEPTH == 3:
        _store_mat(gw1_ptr + g * n1, gW1, oh, DH, oh, DH)
        _store_mat(gs1_ptr + g * n1, gS1, oh, DH, oh, DH)
        _store_mat(ga1_ptr + g * n1, gG1, oh, DH, oh, DH)
