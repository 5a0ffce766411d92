"""Deep (MLP) Titans memory: the docs/titans_kernels.md#the-memory-exactly properties, fp64, both fast paths vs the spec.

The spec computes every per-token gradient with torch.autograd (create_graph), the fast paths by hand-written
backprop inside the dual form. Gradients: autograd through the spec (second order) and through the chunked
dual form; the fused loop (memtrain/kernels/titans/deep_fused.py) has a hand-written backward. Every property test runs
on both fast paths (`impl`).
Property 5 (delta rule) is specific to the linear memory and lives in test_titans_linear.py.
"""
from __future__ import annotations

import pytest
import torch

from memtrain.kernels.titans import deep_memory, init_deep_memory
from memtrain.kernels.titans.reference import deep_memory_naive_chunks, deep_memory_recurrent, mlp_forward
from memtrain.kernels.titans.testing import flatten, make_deep_state, make_inputs, max_rel_err, random_projection_loss

TOL = 1e-10
CHUNKS = [1, 3, 16, 64]
LENGTHS = [1, 17, 100, 257]
B, H, DK, DV = 2, 2, 8, 6
GATES = dict(theta_max=0.1, eta_max=0.9, alpha_max=0.1)   # deep memories diverge with large steps


def _inputs(T, seed):
    return make_inputs(B, H, T, DK, DV, seed=seed, **GATES)


def _assert_all_close(got, want, tol=TOL, what=""):
    got, want = flatten(got), flatten(want)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = max_rel_err(a, b)
        assert err < tol, f"{what} tensor {i}: rel err {err:.3e}"


@pytest.fixture(params=["chunked", "fused"])
def impl(request):
    """The fast path under test: deep_memory with that backend."""
    def run(*a, **kw):
        return deep_memory(*a, backend=request.param, **kw)
    return run


# ------------------------------------------------------------------------------------- 1. equals the spec (forward)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("b", CHUNKS)
def test_forward_equals_spec(b, T, impl):
    q, k, v, th, et, al = _inputs(T, seed=T + 7 * b)
    state = make_deep_state(B, H, DK, DV)
    y, st = impl(q, k, v, th, et, al, chunk_size=b, state=state)
    if b == 1:
        y_ref, st_ref = deep_memory_recurrent(q, k, v, th, et, al, state)
    else:
        y_ref, st_ref = deep_memory_naive_chunks(q, k, v, th, et, al, state, chunk_size=b)
    _assert_all_close((y, st), (y_ref, st_ref), what=f"b={b} T={T}")


@pytest.mark.parametrize("depth,act", [(3, "silu"), (2, "silu"), (3, "gelu")])
def test_forward_other_depths_and_activations(depth, act, impl):
    q, k, v, th, et, al = _inputs(60, seed=depth)
    state = make_deep_state(B, H, DK, DV, depth=depth, expansion=1.5)
    y, st = impl(q, k, v, th, et, al, chunk_size=16, state=state, act=act)
    y_ref, st_ref = deep_memory_naive_chunks(q, k, v, th, et, al, state, chunk_size=16, act=act)
    _assert_all_close((y, st), (y_ref, st_ref))


def test_init_deep_memory_shapes():
    ws = init_deep_memory(4, 8, 6, depth=3, expansion=2)
    assert [tuple(w.shape) for w in ws] == [(4, 16, 8), (4, 16, 16), (4, 6, 16)]


# -------------------------------------------------------------------------------------- 2. chained == one pass
@pytest.mark.parametrize("b", CHUNKS)
def test_chained_pieces_equal_one_pass(b, impl):
    T = 100
    q, k, v, th, et, al = _inputs(T, seed=11)
    state0 = make_deep_state(B, H, DK, DV)
    y_full, st_full = impl(q, k, v, th, et, al, chunk_size=b, state=state0)
    pieces = [1, 16, 5, 0, 50, 27, 1]
    state, seen, ys = state0, 0, []
    for n in pieces:
        sl = slice(seen, seen + n)
        y, state = impl(q[:, :, sl], k[:, :, sl], v[:, :, sl], th[:, :, sl], et[:, :, sl], al[:, :, sl],
                            chunk_size=b, state=state, chunk_offset=seen % b)
        ys.append(y)
        seen += n
    _assert_all_close((torch.cat(ys, dim=2), state), (y_full, st_full), what=f"b={b}")


# ------------------------------------------------------------------------------------------------ 3. causality
@pytest.mark.parametrize("b", [1, 16])
def test_causality(b, impl):
    T, t0 = 64, 37
    inputs = _inputs(T, seed=13)
    other = _inputs(T, seed=14)
    mixed = [torch.cat([x[:, :, :t0 + 1], o[:, :, t0 + 1:]], dim=2) for x, o in zip(inputs, other)]
    state = make_deep_state(B, H, DK, DV)
    y1, _ = impl(*inputs, chunk_size=b, state=state)
    y2, _ = impl(*mixed, chunk_size=b, state=state)
    assert (y1[:, :, :t0 + 1] - y2[:, :, :t0 + 1]).abs().max().item() < 1e-13
    assert (y1[:, :, t0 + 1:] - y2[:, :, t0 + 1:]).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------- 4. gate limits
@pytest.mark.parametrize("b", [1, 3, 16])
def test_alpha_one_erases(b, impl):
    """alpha = 1 with eta = theta = 0 at the last token of chunk 0 zeroes every weight and momentum: that token
    reads 0 and all later outputs are independent of the initial state and of earlier tokens."""
    T, t0 = 40, b - 1
    q, k, v, th, et, al = _inputs(T, seed=17)
    al, et, th = al.clone(), et.clone(), th.clone()
    al[:, :, t0], et[:, :, t0], th[:, :, t0] = 1.0, 0.0, 0.0
    k2, v2 = k.clone(), v.clone()
    for x in (k2, v2):
        x[:, :, :t0] = torch.randn_like(x[:, :, :t0])
    y1, st1 = impl(q, k, v, th, et, al, chunk_size=b, state=make_deep_state(B, H, DK, DV, seed=2))
    y2, st2 = impl(q, k2, v2, th, et, al, chunk_size=b, state=make_deep_state(B, H, DK, DV, seed=8))
    assert y1[:, :, t0].abs().max().item() == 0.0
    # the memory restarts from zero weights: an all-zero MLP has zero gradient, so it stays zero
    _assert_all_close((y1[:, :, t0:], st1), (y2[:, :, t0:], st2), tol=1e-12)


@pytest.mark.parametrize("b", [1, 16])
def test_zero_gates_keep_initial_memory(b, impl):
    q, k, v, th, _, _ = _inputs(33, seed=19)
    z = torch.zeros_like(th)
    ws, ss = make_deep_state(B, H, DK, DV)
    y, (ws1, ss1, _) = impl(q, k, v, z, z, z, chunk_size=b, state=(ws, ss))
    _assert_all_close((y, ws1, ss1), (mlp_forward(ws, q, "gelu"), ws, tuple(torch.zeros_like(s) for s in ss)),
                      tol=1e-13)


@pytest.mark.parametrize("b", [1, 16])
def test_small_step_lowers_loss(b, impl):
    q, k, v, _, _, _ = _inputs(1, seed=23)
    z = torch.zeros(B, H, 1, dtype=q.dtype)
    ws, ss = make_deep_state(B, H, DK, DV)
    _, (ws1, _, _) = impl(q, k, v, z + 1e-3, z, z, chunk_size=b, state=(ws, None))
    before = (mlp_forward(ws, k, "gelu") - v).norm(dim=-1)
    after = (mlp_forward(ws1, k, "gelu") - v).norm(dim=-1)
    assert (after < before).all()


# ------------------------------------------------------------------------------------------------- 6. gradients
def deep_grads(fn, inputs, state, b, offset=0, **kw):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    state = tuple(tuple(t.detach().clone().requires_grad_(True) for t in part) for part in state)
    y, st = fn(*inputs, state=state, chunk_size=b, chunk_offset=offset, **kw)
    loss = random_projection_loss((y, st))
    leaves = inputs + flatten(state)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return (y, st), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _spec_kw(*a, chunk_size, **kw):
    if chunk_size == 1 and not kw.get("chunk_offset"):
        kw.pop("chunk_offset", None)
        return deep_memory_recurrent(*a, **kw)
    return deep_memory_naive_chunks(*a, chunk_size=chunk_size, **kw)


def _spec_adapter(q, k, v, th, et, al, *, state, chunk_size, chunk_offset=0, act="gelu"):
    return _spec_kw(q, k, v, th, et, al, state, chunk_size=chunk_size, chunk_offset=chunk_offset, act=act)


@pytest.mark.parametrize("b,T,offset,depth", [(1, 17, 0, 2), (3, 40, 0, 2), (16, 100, 0, 2), (64, 100, 0, 2),
                                              (16, 30, 5, 3)])
def test_gradients_equal_autograd_of_spec(b, T, offset, depth, impl):
    inputs = _inputs(T, seed=31 + T)
    ws, ss = make_deep_state(B, H, DK, DV, depth=depth)
    state = (ws, ss, tuple(w + 0.05 * torch.randn_like(w) for w in ws)) if offset else (ws, ss)
    outs, grads = deep_grads(impl, inputs, state, b, offset)
    outs_ref, grads_ref = deep_grads(_spec_adapter, inputs, state, b, offset)
    _assert_all_close(outs, outs_ref, what="outputs")
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"state{i}" for i in range(len(grads) - 6)]
    for name, g, r in zip(names, grads, grads_ref):
        assert r.abs().max().item() > 0, f"{name}: reference gradient is zero"
        err = max_rel_err(g, r)
        assert err < TOL, f"grad {name}: rel err {err:.3e}"


# ------------------------------------------------------------------- the fused loop's hand-written backward
def _fused(*a, **kw):
    return deep_memory(*a, backend="fused", **kw)


def _chunked(*a, **kw):
    return deep_memory(*a, backend="chunked", **kw)


@pytest.mark.parametrize("b,T,offset,depth,act", [(8, 3, 2, 2, "gelu"),    # one chunk entered mid-way, ends mid-way
                                                  (4, 23, 2, 3, "silu"), (5, 5, 0, 1, "gelu"), (7, 31, 6, 2, "silu")])
def test_fused_gradients_equal_spec_other_shapes(b, T, offset, depth, act):
    """Odd shapes the property tests do not reach: a single chunk whose anchor is the incoming one, depth 3 and
    depth 1, SiLU (its second derivative differs from GELU's), chunk offsets at both ends."""
    inputs = _inputs(T, seed=41 + T)
    ws, ss = make_deep_state(B, H, DK, DV, depth=depth)
    state = (ws, ss, tuple(w + 0.05 * torch.randn_like(w) for w in ws)) if offset else (ws, ss)
    outs, grads = deep_grads(_fused, inputs, state, b, offset, act=act)
    outs_ref, grads_ref = deep_grads(_spec_adapter, inputs, state, b, offset, act=act)
    _assert_all_close(outs, outs_ref, what="outputs")
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert r.abs().max().item() > 0, f"input {i}: reference gradient is zero"
        assert max_rel_err(g, r) < TOL, f"grad {i}: rel err {max_rel_err(g, r):.3e}"


@pytest.mark.parametrize("b,T", [(4, 10), (4, 8)])
def test_three_tuple_state_at_chunk_start_ignores_its_anchor(b, T, impl):
    """chunk_offset 0: the first chunk's gradients are taken at the weights themselves (the spec resets the anchor
    there), even if the state carries a different anchor (the fused loop used it before 2026-12-07)."""
    inputs = _inputs(T, seed=43)
    ws, ss = make_deep_state(B, H, DK, DV)
    state = (ws, ss, tuple(w + 0.05 * torch.randn_like(w) for w in ws))
    outs, grads = deep_grads(impl, inputs, state, b, 0)
    outs_ref, grads_ref = deep_grads(_spec_adapter, inputs, (ws, ss), b, 0)
    _assert_all_close(outs, outs_ref, what="outputs")
    _assert_all_close(grads[:len(grads_ref)], grads_ref, what="grads")
    assert all(g.abs().max().item() == 0.0 for g in grads[len(grads_ref):])


@pytest.mark.parametrize("use", ["y", "state", "anchor"])
def test_fused_gradients_of_each_output_alone(use):
    """Gradients reach the inputs from each output on its own (the others get no gradient at all)."""
    T, b, offset = 37, 8, 3   # (3 + 37) % 8 == 0 would make the anchor the final weights: 40 → use T = 37
    inputs = [x.requires_grad_(True) for x in (t.clone() for t in _inputs(T, seed=5))]
    ws, ss = make_deep_state(B, H, DK, DV)
    state = (ws, ss, tuple(w + 0.05 * torch.randn_like(w) for w in ws))
    grads = {}
    for name, fn in (("fused", _fused), ("chunked", _chunked)):
        st = tuple(tuple(t.clone().requires_grad_(True) for t in part) for part in state)
        y, (w1, s1, a1) = fn(*inputs, chunk_size=b, state=st, chunk_offset=offset)
        out = {"y": [y], "state": [*w1, *s1], "anchor": list(a1)}[use]
        loss = random_projection_loss(out)
        grads[name] = torch.autograd.grad(loss, [*inputs, *flatten(st)], allow_unused=True)
    for g, r in zip(grads["fused"], grads["chunked"]):
        if r is None:
            assert g is None or g.abs().max().item() == 0
        else:
            assert max_rel_err(g, r) < TOL


def test_fused_fp32_and_bf16_at_model_sizes():
    """fp32 at the MAC benchmark's shapes (B 2, 4 heads, 64 wide, chunk 16, a 128-token segment) against the
    chunked form in fp64, and bf16 inputs (computed in fp32, returned in bf16)."""
    q, k, v, th, et, al = make_inputs(2, 4, 128, 64, 64, seed=3, theta_max=0.02, eta_max=0.95, alpha_max=0.05)
    ws, ss = make_deep_state(2, 4, 64, 64)
    want_outs, want = deep_grads(_chunked, (q, k, v, th, et, al), (ws, ss), 16)
    f32 = lambda t: t.float()  # noqa: E731
    got_outs, got = deep_grads(_fused, [f32(x) for x in (q, k, v, th, et, al)],
                               (tuple(map(f32, ws)), tuple(map(f32, ss))), 16)
    for a, r in zip(flatten(got_outs) + list(got), flatten(want_outs) + list(want)):
        assert max_rel_err(a.double(), r) < 2e-5
    # bf16: the same rounded inputs in fp64 are the reference; what is left is the bf16 rounding of y
    inputs16, ws16 = [x.bfloat16() for x in (q, k, v, th, et, al)], tuple(w.bfloat16() for w in ws)
    y16, _ = _fused(*inputs16, chunk_size=16, state=(ws16, None))
    y_ref, _ = _chunked(*(x.double() for x in inputs16), chunk_size=16, state=(tuple(w.double() for w in ws16), None))
    assert y16.dtype == torch.bfloat16
    assert max_rel_err(y16.double(), y_ref) < 1e-2
