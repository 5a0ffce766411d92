"""Deep (MLP) Titans memory: the DESIGN.md §2 properties, fp64, chunked dual form vs the spec.

The spec computes every per-token gradient with torch.autograd (create_graph), the chunked form by hand-written
backprop inside the dual form; gradients of both go through autograd (second order for the spec).
Property 5 (delta rule) is specific to the linear memory and lives in test_titans_linear.py.
"""
from __future__ import annotations

import pytest
import torch

from kernels.titans import deep_memory, init_deep_memory
from kernels.titans.reference import deep_memory_naive_chunks, deep_memory_recurrent, mlp_forward
from kernels.titans.testing import flatten, make_deep_state, make_inputs, max_rel_err, random_projection_loss

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


def _chunked(*a, **kw):
    return deep_memory(*a, backend="chunked", **kw)


# ------------------------------------------------------------------------------------- 1. equals the spec (forward)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("b", CHUNKS)
def test_forward_equals_spec(b, T):
    q, k, v, th, et, al = _inputs(T, seed=T + 7 * b)
    state = make_deep_state(B, H, DK, DV)
    y, st = _chunked(q, k, v, th, et, al, chunk_size=b, state=state)
    if b == 1:
        y_ref, st_ref = deep_memory_recurrent(q, k, v, th, et, al, state)
    else:
        y_ref, st_ref = deep_memory_naive_chunks(q, k, v, th, et, al, state, chunk_size=b)
    _assert_all_close((y, st), (y_ref, st_ref), what=f"b={b} T={T}")


@pytest.mark.parametrize("depth,act", [(3, "silu"), (2, "silu"), (3, "gelu")])
def test_forward_other_depths_and_activations(depth, act):
    q, k, v, th, et, al = _inputs(60, seed=depth)
    state = make_deep_state(B, H, DK, DV, depth=depth, expansion=1.5)
    y, st = _chunked(q, k, v, th, et, al, chunk_size=16, state=state, act=act)
    y_ref, st_ref = deep_memory_naive_chunks(q, k, v, th, et, al, state, chunk_size=16, act=act)
    _assert_all_close((y, st), (y_ref, st_ref))


def test_init_deep_memory_shapes():
    ws = init_deep_memory(4, 8, 6, depth=3, expansion=2)
    assert [tuple(w.shape) for w in ws] == [(4, 16, 8), (4, 16, 16), (4, 6, 16)]


# -------------------------------------------------------------------------------------- 2. chained == one pass
@pytest.mark.parametrize("b", CHUNKS)
def test_chained_pieces_equal_one_pass(b):
    T = 100
    q, k, v, th, et, al = _inputs(T, seed=11)
    state0 = make_deep_state(B, H, DK, DV)
    y_full, st_full = _chunked(q, k, v, th, et, al, chunk_size=b, state=state0)
    pieces = [1, 16, 5, 0, 50, 27, 1]
    state, seen, ys = state0, 0, []
    for n in pieces:
        sl = slice(seen, seen + n)
        y, state = _chunked(q[:, :, sl], k[:, :, sl], v[:, :, sl], th[:, :, sl], et[:, :, sl], al[:, :, sl],
                            chunk_size=b, state=state, chunk_offset=seen % b)
        ys.append(y)
        seen += n
    _assert_all_close((torch.cat(ys, dim=2), state), (y_full, st_full), what=f"b={b}")


# ------------------------------------------------------------------------------------------------ 3. causality
@pytest.mark.parametrize("b", [1, 16])
def test_causality(b):
    T, t0 = 64, 37
    inputs = _inputs(T, seed=13)
    other = _inputs(T, seed=14)
    mixed = [torch.cat([x[:, :, :t0 + 1], o[:, :, t0 + 1:]], dim=2) for x, o in zip(inputs, other)]
    state = make_deep_state(B, H, DK, DV)
    y1, _ = _chunked(*inputs, chunk_size=b, state=state)
    y2, _ = _chunked(*mixed, chunk_size=b, state=state)
    assert (y1[:, :, :t0 + 1] - y2[:, :, :t0 + 1]).abs().max().item() < 1e-13
    assert (y1[:, :, t0 + 1:] - y2[:, :, t0 + 1:]).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------- 4. gate limits
@pytest.mark.parametrize("b", [1, 3, 16])
def test_alpha_one_erases(b):
    """alpha = 1 with eta = theta = 0 at the last token of chunk 0 zeroes every weight and momentum: that token
    reads 0 and all later outputs are independent of the initial state and of earlier tokens."""
    T, t0 = 40, b - 1
    q, k, v, th, et, al = _inputs(T, seed=17)
    al, et, th = al.clone(), et.clone(), th.clone()
    al[:, :, t0], et[:, :, t0], th[:, :, t0] = 1.0, 0.0, 0.0
    k2, v2 = k.clone(), v.clone()
    for x in (k2, v2):
        x[:, :, :t0] = torch.randn_like(x[:, :, :t0])
    y1, st1 = _chunked(q, k, v, th, et, al, chunk_size=b, state=make_deep_state(B, H, DK, DV, seed=2))
    y2, st2 = _chunked(q, k2, v2, th, et, al, chunk_size=b, state=make_deep_state(B, H, DK, DV, seed=8))
    assert y1[:, :, t0].abs().max().item() == 0.0
    # the memory restarts from zero weights: an all-zero MLP has zero gradient, so it stays zero
    _assert_all_close((y1[:, :, t0:], st1), (y2[:, :, t0:], st2), tol=1e-12)


@pytest.mark.parametrize("b", [1, 16])
def test_zero_gates_keep_initial_memory(b):
    q, k, v, th, _, _ = _inputs(33, seed=19)
    z = torch.zeros_like(th)
    ws, ss = make_deep_state(B, H, DK, DV)
    y, (ws1, ss1, _) = _chunked(q, k, v, z, z, z, chunk_size=b, state=(ws, ss))
    _assert_all_close((y, ws1, ss1), (mlp_forward(ws, q, "gelu"), ws, tuple(torch.zeros_like(s) for s in ss)),
                      tol=1e-13)


@pytest.mark.parametrize("b", [1, 16])
def test_small_step_lowers_loss(b):
    q, k, v, _, _, _ = _inputs(1, seed=23)
    z = torch.zeros(B, H, 1, dtype=q.dtype)
    ws, ss = make_deep_state(B, H, DK, DV)
    _, (ws1, _, _) = _chunked(q, k, v, z + 1e-3, z, z, chunk_size=b, state=(ws, None))
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
def test_gradients_equal_autograd_of_spec(b, T, offset, depth):
    inputs = _inputs(T, seed=31 + T)
    ws, ss = make_deep_state(B, H, DK, DV, depth=depth)
    state = (ws, ss, tuple(w + 0.05 * torch.randn_like(w) for w in ws)) if offset else (ws, ss)
    outs, grads = deep_grads(_chunked, inputs, state, b, offset)
    outs_ref, grads_ref = deep_grads(_spec_adapter, inputs, state, b, offset)
    _assert_all_close(outs, outs_ref, what="outputs")
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"state{i}" for i in range(len(grads) - 6)]
    for name, g, r in zip(names, grads, grads_ref):
        assert r.abs().max().item() > 0, f"{name}: reference gradient is zero"
        err = max_rel_err(g, r)
        assert err < TOL, f"grad {name}: rel err {err:.3e}"
