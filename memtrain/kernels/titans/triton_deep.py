"""Triton kernel for the deep (MLP, depth 2 or 3) Titans memory: the whole chunk scan in one launch.

One program per (batch, head) walks the chunks in order with every layer's weights W_l, momentum S_l and the
gradient weights Wg_l (the chunk-start weights, or the carried anchor for a first chunk entered mid-way) held on
chip. Per chunk it runs the TTT-MLP dual form of docs/titans_kernels.md#the-memory-exactly exactly as
:mod:`.deep_fused` writes it out (layers l = 0..L-1, W_l `[d_{l+1}, d_l]`):

    keys     x_0 = K, z_l = x_l Wg_lᵀ, x_{l+1} = act(z_l)           errors d_{L-1} = 2 (z_{L-1} − V),
                                                                     d_{l-1} = (d_l Wg_l) ⊙ act'(z_{l-1})
    read-out r_0 = Q, ρ_l = β ⊙ r_l W_lᵀ + c ⊙ r_l S_lᵀ − (Cθ ⊙ r_l x_lᵀ) d_l, r_{l+1} = act(ρ_l), y = ρ_{L-1}
    boundary W_l ← β_L W_l + c_L S_l − d_lᵀ (u ⊙ x_l),   S_l ← a_L S_l − d_lᵀ (w ⊙ x_l)

so per-token gates, momentum, forgetting and read-after-update are those of :mod:`.reference`. The gate
coefficients (β, c, Cθ, u, w, a_L; O(T b)) are built in torch (:func:`.chunked.gate_coefficients`) so autograd
carries their gradients to θ, η, α. Only chunk-start states leave the chip (for the backward).

Backward: a second kernel (:mod:`.triton_deep_bwd`), chunks in reverse, recomputing each chunk's intermediates
on chip from the saved chunk-start states. A training step is thus 2 launches per memory call whatever T / b
(docs/titans_kernels.md#triton-deep-memory-kernel); the gate coefficients add a fixed number of torch ops.

Import this module only after deciding on TRITON_INTERPRET (Triton reads it when the kernels are decorated).
Tested on CPU under TRITON_INTERPRET=1 (tests/kernels/test_titans_deep_triton.py); not yet run on a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .chunked import gate_coefficients, pad_to_chunks
from .reference import _unpack_deep_state, activation
from .triton_linear import _chunk_gates

__all__ = ["deep_memory_triton", "DeepMemoryChunks", "LAUNCHES", "fits_on_device", "shared_memory_bytes"]

ACTS = {"gelu": 0, "silu": 1}
LAUNCHES = {"forward": 0, "backward": 0}  # kernel launches so far (benchmarks/titans_ops.py counts them per training step)


# ------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _mm(a, b):
    # ieee: no TF32, so fp32 results match the torch paths to rounding; fp64 inputs give an fp64 dot
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:                                          # exact (erf) GELU, as reference.activation
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:                                                 # SiLU
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def _load_mat(ptr, rows, nrows, cols, ncols):
    """[R, C] tile of a row-major [nrows, ncols] matrix at ``ptr`` (masked, zero padded)."""
    return tl.load(ptr + rows[:, None] * ncols + cols[None, :],
                   mask=(rows < nrows)[:, None] & (cols < ncols)[None, :], other=0.0)


@triton.jit
def _store_mat(ptr, x, rows, nrows, cols, ncols):
    tl.store(ptr + rows[:, None] * ncols + cols[None, :], x,
             mask=(rows < nrows)[:, None] & (cols < ncols)[None, :])


@triton.jit
def _read(r, x, d, W, S, A_c, beta, c):
    """One read-out layer: β ⊙ r Wᵀ + c ⊙ r Sᵀ − (Cθ ⊙ r xᵀ) d   (r [BT, din], x [BT, din], d [BT, dout])."""
    return (beta[:, None] * _mm(r, tl.trans(W)) + c[:, None] * _mm(r, tl.trans(S))
            - _mm(A_c * _mm(r, tl.trans(x)), d))


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, cth_ptr, beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, y_ptr,
                w0_ptr, s0_ptr, a0_ptr, wi0_ptr, si0_ptr, wf0_ptr, sf0_ptr, wl0_ptr,
                w1_ptr, s1_ptr, a1_ptr, wi1_ptr, si1_ptr, wf1_ptr, sf1_ptr, wl1_ptr,
                w2_ptr, s2_ptr, a2_ptr, wi2_ptr, si2_ptr, wf2_ptr, sf2_ptr, wl2_ptr,
                NC, b, DK, DH, DV,
                DEPTH: tl.constexpr, ACT: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr):
    """Layer 0 is [DH, DK]; with DEPTH == 3 the middle layer ("1") is [DH, DH]; the last layer ("2") is [DV, DH].
    For DEPTH == 2 the layer-1 pointers are unused placeholders. Per layer: w/s/a = initial weights, momentum,
    anchor; wi/si [G, NC, ...] = chunk-start states (saved for the backward); wf/sf = final; wl = last chunk's Wg."""
    g = tl.program_id(0)
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    oh = tl.arange(0, BH)
    ov = tl.arange(0, BV)
    mt = ot < b
    n0, n1, n2 = DH * DK, DH * DH, DV * DH             # elements per layer matrix
    W0 = _load_mat(w0_ptr + g * n0, oh, DH, ok, DK)
    S0 = _load_mat(s0_ptr + g * n0, oh, DH, ok, DK)
    G0 = _load_mat(a0_ptr + g * n0, oh, DH, ok, DK)   # chunk 0 takes its gradients at the anchor
    W2 = _load_mat(w2_ptr + g * n2, ov, DV, oh, DH)
    S2 = _load_mat(s2_ptr + g * n2, ov, DV, oh, DH)
    G2 = _load_mat(a2_ptr + g * n2, ov, DV, oh, DH)
    L0, L2 = G0, G2
    if DEPTH == 3:
        W1 = _load_mat(w1_ptr + g * n1, oh, DH, oh, DH)
        S1 = _load_mat(s1_ptr + g * n1, oh, DH, oh, DH)
        G1 = _load_mat(a1_ptr + g * n1, oh, DH, oh, DH)
        L1 = G1
    for n in range(NC):
        row0 = g * NC * b + n * b                      # first token row of this chunk
        cn = g * NC + n                                # chunk index
        q = _load_mat(q_ptr + row0 * DK, ot, b, ok, DK)
        k = _load_mat(k_ptr + row0 * DK, ot, b, ok, DK)
        v = _load_mat(v_ptr + row0 * DV, ot, b, ov, DV)
        A_c = _load_mat(cth_ptr + cn * b * b, ot, b, ot, b)
        beta, c, u, w, beta_l, c_l, a_l = _chunk_gates(beta_ptr, c_ptr, u_ptr, w_ptr, al_ptr, row0, cn, ot, mt, b)
        _store_mat(wi0_ptr + cn * n0, W0, oh, DH, ok, DK)
        _store_mat(si0_ptr + cn * n0, S0, oh, DH, ok, DK)
        _store_mat(wi2_ptr + cn * n2, W2, ov, DV, oh, DH)
        _store_mat(si2_ptr + cn * n2, S2, ov, DV, oh, DH)
        # keys through the gradient weights, then the hand-written backprop of ||M(k) - v||^2
        # (zero-padded rows stay zero: act(0) = 0 for GELU and SiLU, and their gates are 0)
        z0 = _mm(k, tl.trans(G0))                      # [BT, BH]
        x1 = _act(z0, ACT)
        if DEPTH == 3:
            _store_mat(wi1_ptr + cn * n1, W1, oh, DH, oh, DH)
            _store_mat(si1_ptr + cn * n1, S1, oh, DH, oh, DH)
            z1 = _mm(x1, tl.trans(G1))
            x2 = _act(z1, ACT)
            d2 = 2.0 * (_mm(x2, tl.trans(G2)) - v)     # [BT, BV]
            d1 = _mm(d2, G2) * _act_grad(z1, ACT)
            d0 = _mm(d1, G1) * _act_grad(z0, ACT)
        else:
            x2 = x1
            d2 = 2.0 * (_mm(x2, tl.trans(G2)) - v)
            d0 = _mm(d2, G2) * _act_grad(z0, ACT)
        # read-out with every token's own weights (read after the update), layer by layer
        r = _act(_read(q, k, d0, W0, S0, A_c, beta, c), ACT)
        if DEPTH == 3:
            r = _act(_read(r, x1, d1, W1, S1, A_c, beta, c), ACT)
        y = _read(r, x2, d2, W2, S2, A_c, beta, c)
        tl.store(y_ptr + (row0 + ot)[:, None] * DV + ov[None, :], y, mask=mt[:, None] & (ov < DV)[None, :])
        # chunk-boundary state; the next chunk's gradients are taken at the new weights
        L0, L2 = G0, G2
        W0n = beta_l * W0 + c_l * S0 - _mm(tl.trans(d0), u[:, None] * k)
        S0 = a_l * S0 - _mm(tl.trans(d0), w[:, None] * k)
        W2n = beta_l * W2 + c_l * S2 - _mm(tl.trans(d2), u[:, None] * x2)
        S2 = a_l * S2 - _mm(tl.trans(d2), w[:, None] * x2)
        W0, G0, W2, G2 = W0n, W0n, W2n, W2n
        if DEPTH == 3:
            L1 = G1
            W1n = beta_l * W1 + c_l * S1 - _mm(tl.trans(d1), u[:, None] * x1)
            S1 = a_l * S1 - _mm(tl.trans(d1), w[:, None] * x1)
            W1, G1 = W1n, W1n
    _store_mat(wf0_ptr + g * n0, W0, oh, DH, ok, DK)
    _store_mat(sf0_ptr + g * n0, S0, oh, DH, ok, DK)
    _store_mat(wl0_ptr + g * n0, L0, oh, DH, ok, DK)
    _store_mat(wf2_ptr + g * n2, W2, ov, DV, oh, DH)
    _store_mat(sf2_ptr + g * n2, S2, ov, DV, oh, DH)
    _store_mat(wl2_ptr + g * n2, L2, ov, DV, oh, DH)
    if DEPTH == 3:
        _store_mat(wf1_ptr + g * n1, W1, oh, DH, oh, DH)
        _store_mat(sf1_ptr + g * n1, S1, oh, DH, oh, DH)
        _store_mat(wl1_ptr + g * n1, L1, oh, DH, oh, DH)


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))    # tl.dot needs every block dim >= 16


def _config(L: int, act: str, b: int, Dk: int, Dh: int, Dv: int) -> dict:
    """Compile-time constants of both kernels for one shape."""
    return dict(DEPTH=L, ACT=ACTS[act], BT=_p2(b), BK=_p2(Dk), BH=_p2(Dh), BV=_p2(Dv))


def _warps(kind: str, c: dict) -> int:
    # the backward keeps twice the state tiles live (the state and its gradient): always 8 warps
    return 8 if kind == "bwd" or c["BT"] * max(c["BK"], c["BH"], c["BV"]) >= 64 * 64 else 4


@functools.lru_cache(maxsize=None)
def shared_memory_bytes(L: int, act: str, b: int, Dk: int, Dh: int, Dv: int, dtype: str, target) -> tuple:
    """Shared memory (bytes) of the compiled (forward, backward) kernels for one shape on ``target`` (a
    ``triton.backends.compiler.GPUTarget``). Compiles without launching, so it runs without that GPU too
    (measured for sm_90 on a CPU machine: docs/titans_kernels.md#triton-deep-memory-kernel). dtype "fp32"/"fp64"."""
    from triton.compiler import ASTSource, compile as triton_compile
    from .triton_deep_bwd import bwd_kernel
    out = []
    for kind, fn in (("fwd", _fwd_kernel), ("bwd", bwd_kernel)):
        c = _config(L, act, b, Dk, Dh, Dv)
        sig = {n: "constexpr" if n in c else ("*" + dtype if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        out.append(triton_compile(ASTSource(fn, sig, c), target=target,
                                  options=dict(num_warps=_warps(kind, c))).metadata.shared)
    return tuple(out)


def fits_on_device(L: int, act: str, b: int, Dk: int, Dh: int, Dv: int, dtype: torch.dtype,
                   device: torch.device) -> bool:
    """Whether both kernels' shared memory fits the CUDA device: the whole state lives on chip, which at
    Dk = Dv = 64, hidden 128 already needs more than an H100 has, so backend="auto" checks before choosing."""
    driver = triton.runtime.driver.active
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = driver.utils.get_device_properties(index)["max_shared_mem"]
    name = "fp64" if dtype == torch.float64 else "fp32"
    return max(shared_memory_bytes(L, act, b, Dk, Dh, Dv, name, driver.get_current_target())) <= limit


def launch_forward(qc, kc, vc, cth, beta, c, u, w, a_last, state, b: int, act: str):
    """Run the forward kernel. qc, kc [G, N, Dk]; vc [G, N, Dv]; cth [G, NC, b, b]; beta, c, u, w [G, N];
    a_last [G, NC]; state = 3·L contiguous tensors (weights, momenta, anchors) `[G, d_{l+1}, d_l]`, L in {2, 3}.
    Returns (y [G, N, Dv], chunk-start weights and momenta per layer [G, NC, d_{l+1}, d_l], final weights,
    final momenta, last chunk's Wg)."""
    L = len(state) // 3
    G, N, Dk = qc.shape
    Dv, NC, Dh = vc.shape[-1], N // b, state[0].shape[-2]
    Ws, Ss, As = state[:L], state[L:2 * L], state[2 * L:]
    y = torch.empty_like(vc)
    wi = [qc.new_empty(G, NC, *x.shape[1:]) for x in Ws]
    si = [torch.empty_like(x) for x in wi]
    wf, sf, wl = ([torch.empty_like(x) for x in Ws] for _ in range(3))
    per_layer = [(Ws[l], Ss[l], As[l], wi[l], si[l], wf[l], sf[l], wl[l]) for l in range(L)]
    if L == 2:
        per_layer = [per_layer[0], per_layer[0], per_layer[1]]  # middle-layer slots unused (DEPTH == 2)
    cfg = _config(L, act, b, Dk, Dh, Dv)
    _fwd_kernel[(G,)](qc, kc, vc, cth, beta, c, u, w, a_last, y, *(t for lay in per_layer for t in lay),
                      NC, b, Dk, Dh, Dv, **cfg, num_warps=_warps("fwd", cfg))
    LAUNCHES["forward"] += 1
    return y, wi, si, wf, sf, wl


def launch_backward(inputs, wi, si, anchors, gy, gwf, gsf, gwl, b: int, act: str):
    """Run the backward kernel (:mod:`.triton_deep_bwd`). inputs = the forward's flat (qc, kc, vc, cth, beta, c,
    u, w, a_last); wi, si: chunk-start states from :func:`launch_forward`; anchors: the first chunk's Wg per layer;
    gy [G, N, Dv]; gwf, gsf, gwl: gradients of the final weights, momenta, last Wg per layer. Returns the gradients
    of the nine inputs, then of the initial weights, momenta and anchors (L each)."""
    from .triton_deep_bwd import bwd_kernel   # one module each keeps both files short
    qc, kc, vc, cth, beta, c, u, w, a_last = inputs
    L = len(wi)
    G, N, Dk = qc.shape
    Dv, NC, Dh = vc.shape[-1], N // b, anchors[0].shape[-2]
    grads = [torch.empty_like(x) for x in inputs]
    gw0, gs0, ga0 = ([torch.empty_like(x) for x in anchors] for _ in range(3))
    per_layer = [(wi[l], si[l], anchors[l], gwf[l], gsf[l], gwl[l], gw0[l], gs0[l], ga0[l]) for l in range(L)]
    if L == 2:
        per_layer = [per_layer[0], per_layer[0], per_layer[1]]  # middle-layer slots unused (DEPTH == 2)
    cfg = _config(L, act, b, Dk, Dh, Dv)
    bwd_kernel[(G,)](*inputs, gy, *grads, *(t for lay in per_layer for t in lay), NC, b, Dk, Dh, Dv, **cfg,
                     num_warps=_warps("bwd", cfg))
    LAUNCHES["backward"] += 1
    return (*grads, *gw0, *gs0, *ga0)


class DeepMemoryChunks(torch.autograd.Function):
    """Whole-sequence deep chunk scan as one autograd node: one Triton launch forward, one backward.

    Inputs as :class:`.deep_fused._DeepChunkLoop`: act, L, then (G = B·H) qc, kc `[G, NC, b, Dk]`, vc
    `[G, NC, b, Dv]`, beta, c, u, w `[G, NC, b]`, Ctheta `[G, NC, b, b]`, a_last `[G, NC]`, then 3·L state
    tensors `[G, d_{l+1}, d_l]` (weights, momenta, anchors). Outputs: y `[G, NC, b, Dv]`, final weights (L),
    momenta (L) and the last chunk's Wg (L)."""

    @staticmethod
    def forward(ctx, act, L, qc, kc, vc, beta, c, Ctheta, u, w, a_last, *state):
        G, NC, b, Dk = qc.shape
        flat = lambda x, *tail: x.reshape(G, *tail).contiguous()  # noqa: E731
        inputs = (flat(qc, NC * b, Dk), flat(kc, NC * b, Dk), flat(vc, NC * b, -1), Ctheta.contiguous(),
                  flat(beta, NC * b), flat(c, NC * b), flat(u, NC * b), flat(w, NC * b), a_last.contiguous())
        state = [s.contiguous() for s in state]
        y, wi, si, wf, sf, wl = launch_forward(*inputs, state, b, act)
        ctx.save_for_backward(*inputs, *wi, *si, *state[2 * L:])
        ctx.act, ctx.L, ctx.b, ctx.shapes = act, L, b, [x.shape for x in (qc, kc, vc, beta, c, Ctheta, u, w)]
        return (y.view(G, NC, b, -1), *wf, *sf, *wl)

    @staticmethod
    def backward(ctx, gy, *g_state):
        L = ctx.L
        saved = ctx.saved_tensors
        inputs, wi, si, anchors = saved[:9], saved[9:9 + L], saved[9 + L:9 + 2 * L], saved[9 + 2 * L:]
        z = lambda g, like: torch.zeros_like(like) if g is None else g.contiguous()  # noqa: E731
        gy = z(gy, inputs[2]).view(inputs[2].shape)
        gs = [z(g, a) for g, a in zip(g_state, [*anchors] * 3)]
        out = launch_backward(inputs, wi, si, anchors, gy, gs[:L], gs[L:2 * L], gs[2 * L:], ctx.b, ctx.act)
        gq, gk, gv, gct, gbeta, gc, gu, gw, gal = out[:9]
        # back to the input layouts (the kernel's Ctheta order differs from the Function's argument order)
        shp = ctx.shapes
        return (None, None, gq.view(shp[0]), gk.view(shp[1]), gv.view(shp[2]), gbeta.view(shp[3]),
                gc.view(shp[4]), gct.view(shp[5]), gu.view(shp[6]), gw.view(shp[7]), gal, *out[9:])


def deep_memory_triton(q, k, v, theta, eta, alpha, state, *, chunk_size, chunk_offset=0, act="gelu"):
    """Same contract as :func:`.deep_fused.deep_memory_fused`, forward as one Triton launch (depth 2 or 3).

    q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]; state (weights, momenta[, anchor]) with weights[l]
    [B,H,d_{l+1},d_l] (all hidden widths equal). Computes in fp64 for fp64 inputs, else fp32.
    Returns y [B,H,T,Dv] and (weights, momenta, anchor)."""
    b, p = int(chunk_size), int(chunk_offset)
    if not 0 <= p < b:
        raise ValueError(f"chunk_offset must be in [0, {b}), got {p}")
    if act not in ACTS:
        activation(q.new_zeros(()), act)      # raises the reference's error for an unknown activation
    Ws, Ss, Wa = _unpack_deep_state(state, p)
    L = len(Ws)
    if L not in (2, 3) or (L == 3 and Ws[1].shape[-1] != Ws[1].shape[-2]):
        raise ValueError(f"the Triton deep-memory kernel handles depth 2 and 3 (square middle layer), got {L}")
    B, H, T, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape), (Ws, Ss, Wa)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, th, et, al, valid, NC = pad_to_chunks(*(x.to(cd) for x in (q, k, v, theta, eta, alpha)), b, p)
    coefficients = gate_coefficients(th, et, al, valid)
    G = B * H
    flat = [t.reshape(G, *t.shape[2:]) for t in (qc, kc, vc, *coefficients)]
    states = [t.to(cd).reshape(G, *t.shape[-2:]) for t in (*Ws, *Ss, *Wa)]
    out = DeepMemoryChunks.apply(act, L, *flat, *states)
    y = out[0].reshape(B, H, NC * b, -1)[:, :, p:p + T].to(q.dtype)
    new_W, new_S, last_wg = ([t.view(B, H, *t.shape[1:]) for t in out[1 + i * L:1 + (i + 1) * L]] for i in range(3))
    anchor = new_W if (p + T) % b == 0 else last_wg
    return y, (tuple(new_W), tuple(new_S), tuple(anchor))
