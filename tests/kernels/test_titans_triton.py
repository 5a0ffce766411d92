"""Triton linear-memory kernels (forward + hand-written backward) vs the spec, on CPU under TRITON_INTERPRET=1.

Triton decides interpreted vs compiled when a kernel is decorated (at import), so every check runs in a fresh
subprocess with TRITON_INTERPRET=1 set before anything imports triton; this file is also that subprocess's script
(``python tests/kernels/test_titans_triton.py GROUP`` prints one JSON object). The script asserts that the kernels
really are interpreter objects, so the tests cannot silently run something else. On a CUDA machine the ``gpu``
test runs the compiled kernels in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-10


# ---------------------------------------------------------------------------------------------- subprocess checks
def _checks(group: str, device: str = "cpu") -> dict:
    """Run one group of comparisons; returns {case: max relative error} (or booleans for property checks)."""
    from memtrain.kernels.titans import linear_memory
    from memtrain.kernels.titans.reference import linear_memory_naive_chunks, linear_memory_recurrent
    from memtrain.kernels.titans.testing import flatten, make_inputs, make_linear_state, max_rel_err, random_projection_loss

    dev = dict(device=device)
    B, H, DK, DV = 2, 2, 8, 6
    tri = lambda *a, **kw: linear_memory(*a, backend="triton", **kw)  # noqa: E731
    out: dict = {}

    def err(got, want):
        return max(max_rel_err(a.cpu(), b.cpu()) for a, b in zip(flatten(got), flatten(want)))

    def spec(*a, chunk_size, state, chunk_offset=0):
        if chunk_size == 1:
            return linear_memory_recurrent(*a, state)
        return linear_memory_naive_chunks(*a, chunk_size=chunk_size, state=state, chunk_offset=chunk_offset)

    if group == "forward":
        for b in (1, 3, 16, 64):
            for T in (1, 17, 100, 257):
                x = make_inputs(B, H, T, DK, DV, seed=T + b, **dev)
                st = make_linear_state(B, H, DK, DV, **dev)
                out[f"b={b},T={T}"] = err(tri(*x, chunk_size=b, state=st), spec(*x, chunk_size=b, state=st))
        x = make_inputs(B, H, 50, DK, DV, seed=1, dtype=torch.float32, **dev)
        st = make_linear_state(B, H, DK, DV, dtype=torch.float32, **dev)
        x64, st64 = [t.double() for t in x], [t.double() for t in st]
        out["fp32 b=16"] = err(tri(*x, chunk_size=16, state=st), spec(*x64, chunk_size=16, state=st64))
    elif group == "properties":
        x = make_inputs(B, H, 60, DK, DV, seed=3, **dev)
        st0 = make_linear_state(B, H, DK, DV, **dev)
        for b in (3, 16):                                   # 2. chained pieces, unaligned to chunks
            full = tri(*x, chunk_size=b, state=st0)
            st, seen, ys = st0, 0, []
            for n in (1, 16, 5, 30, 8):
                y, st = tri(*(t[:, :, seen:seen + n] for t in x), chunk_size=b, state=st, chunk_offset=seen % b)
                ys.append(y)
                seen += n
            out[f"chained b={b}"] = err((torch.cat(ys, 2), st), full)
        other = make_inputs(B, H, 60, DK, DV, seed=4, **dev)      # 3. causality
        mixed = [torch.cat([a[:, :, :30], o[:, :, 30:]], 2) for a, o in zip(x, other)]
        y1, _ = tri(*x, chunk_size=16, state=st0)
        y2, _ = tri(*mixed, chunk_size=16, state=st0)
        out["causal"] = (y1[:, :, :30] - y2[:, :, :30]).abs().max().item()
        out["causal perturbation visible"] = (y1[:, :, 30:] - y2[:, :, 30:]).abs().max().item() > 1e-3
        q, k, v, th, et, al = (t.clone() for t in x)                # 4. alpha = 1 erases (at end of chunk 0)
        al[:, :, 2], et[:, :, 2], th[:, :, 2] = 1.0, 0.0, 0.0
        ya, sa = tri(q, k, v, th, et, al, chunk_size=3, state=st0)
        k2 = k.clone()
        k2[:, :, :2] = torch.randn_like(k2[:, :, :2])
        yb, sb = tri(q, k2, v, th, et, al, chunk_size=3, state=make_linear_state(B, H, DK, DV, seed=9, **dev))
        out["erase"] = max(err((ya[:, :, 2:], sa), (yb[:, :, 2:], sb)), ya[:, :, 2].abs().max().item())
        z = torch.zeros_like(th)                                    # 4. zero gates keep M_0
        y0, (W, S, _) = tri(q, k, v, z, z, z, chunk_size=16, state=st0)
        out["zero gates"] = err((y0, W, S), (q @ st0[0].transpose(-1, -2), st0[0], torch.zeros_like(st0[1])))
        y5, st5 = tri(q, k, v, th, z, al, chunk_size=1, state=st0)  # 5. eta = 0, b = 1 == delta-rule spec
        out["eta=0 delta rule"] = err((y5, st5), spec(q, k, v, th, z, al, chunk_size=1, state=st0))
        et0 = torch.where(torch.rand_like(et) < 0.2, torch.zeros_like(et), et)   # exact zero / one gates
        al1 = torch.where(torch.rand_like(al) < 0.2, torch.ones_like(al), al)
        out["exact 0/1 gates"] = err(tri(q, k, v, th, et0, al1, chunk_size=16, state=st0),
                                     spec(q, k, v, th, et0, al1, chunk_size=16, state=st0))
    elif group == "grads":
        for b, T, p in ((1, 17, 0), (3, 40, 0), (16, 100, 0), (64, 100, 0), (16, 17, 5), (3, 1, 2)):
            x = make_inputs(B, H, T, DK, DV, seed=31 + T, **dev)
            W0, S0 = make_linear_state(B, H, DK, DV, **dev)
            st = (W0, S0, W0 + 0.1 * torch.randn_like(W0)) if p else (W0, S0)
            res = []
            for fn in (tri, spec if p == 0 else linear_memory_naive_chunks):
                ins = [t.clone().requires_grad_(True) for t in x]
                sts = tuple(t.clone().requires_grad_(True) for t in st)
                o = fn(*ins, chunk_size=b, state=sts, chunk_offset=p)
                res.append((o, torch.autograd.grad(random_projection_loss(o), ins + list(sts))))
            out[f"b={b},T={T},offset={p} outputs"] = err(res[0][0], res[1][0])
            names = ["q", "k", "v", "theta", "eta", "alpha", "W0", "S0", "anchor"]
            for name, g, r in zip(names, res[0][1], res[1][1]):
                out[f"b={b},T={T},offset={p} d{name}"] = max_rel_err(g.cpu(), r.cpu())
    else:
        raise ValueError(group)
    return out


def _run_interpreted(group: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), group], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_results(res: dict):
    tol = lambda key: 1e-5 if "fp32" in key else TOL  # noqa: E731
    bad = {k: v for k, v in res.items() if (v is not True) and not (isinstance(v, float) and v < tol(k))}
    assert not bad, f"failing cases: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("group", ["forward", "properties", "grads"])
def test_triton_interpreted_matches_spec(group):
    res = _run_interpreted(group)
    assert res.pop("__interpreted__") is True, "kernels did not run under the Triton interpreter"
    assert len(res) >= 6
    _assert_results(res)


@pytest.mark.gpu
@pytest.mark.parametrize("group", ["forward", "properties", "grads"])
def test_triton_cuda_matches_spec(group):
    _assert_results(_checks(group, device="cuda"))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    torch.manual_seed(0)
    from memtrain.kernels.titans import triton_linear
    result = _checks(sys.argv[1])
    result["__interpreted__"] = type(triton_linear._fwd_kernel).__name__ == "InterpretedFunction"
    print(json.dumps(result))
