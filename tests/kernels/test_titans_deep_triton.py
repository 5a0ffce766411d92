"""Triton deep-memory kernels (forward + backward, memtrain/kernels/titans/triton_deep*.py) vs the spec, on CPU
under TRITON_INTERPRET=1 (docs/titans_kernels.md#triton-deep-memory-kernel).

As in test_titans_triton.py, Triton decides interpreted vs compiled at import, so each group runs in a fresh
subprocess with TRITON_INTERPRET=1 (this file is that subprocess's script: ``python
tests/kernels/test_titans_deep_triton.py GROUP`` prints one JSON object) and asserts that the kernels really are
interpreter objects. The "quick" group (depth 2 and 3, b in {1, 16, 64}, T not a multiple of b, fp64 and fp32,
forward and every gradient) runs in every CI pass; "full" (more shapes, SiLU, chained calls) is marked slow.
On a CUDA machine the ``gpu`` tests run the compiled kernels in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL64, TOL32 = 1e-10, 5e-5   # relative to max(1, max|ref|); fp32 is compared with the fp64 spec
B, H, DK, DV = 1, 2, 8, 6
GATES = dict(theta_max=0.1, eta_max=0.9, alpha_max=0.1)   # deep memories diverge with large steps


# ---------------------------------------------------------------------------------------------- subprocess checks
def _case(out: dict, name: str, *, depth: int, b: int, T: int, p: int = 0, act: str = "gelu",
          dtype=torch.float64, device: str = "cpu", grads: bool = True):
    """Forward outputs (y, weights, momenta, anchor) and the gradients of a random projection of all of them
    w.r.t. q, k, v, θ, η, α and every initial state tensor: Triton vs the spec (fp64), as max relative errors."""
    from memtrain.kernels.titans import deep_memory
    from memtrain.kernels.titans.reference import deep_memory_naive_chunks, deep_memory_recurrent
    from memtrain.kernels.titans.testing import (flatten, make_deep_state, make_inputs, max_rel_err,
                                                 random_projection_loss)

    x = make_inputs(B, H, T, DK, DV, seed=100 * depth + 7 * b + T, **GATES)
    ws, ss = make_deep_state(B, H, DK, DV, depth=depth, seed=depth + b)
    st = (ws, ss, tuple(w + 0.02 * torch.randn_like(w) for w in ws)) if p else (ws, ss)

    def spec(*a, chunk_size, state, chunk_offset=0):
        if chunk_size == 1:
            return deep_memory_recurrent(*a, state, act=act)
        return deep_memory_naive_chunks(*a, state, chunk_size=chunk_size, chunk_offset=chunk_offset, act=act)

    def tri(*a, **kw):
        return deep_memory(*a, backend="triton", act=act, **kw)

    res = []
    for fn, dt, dev in ((tri, dtype, device), (spec, torch.float64, "cpu")):
        ins = [t.to(dt, copy=True).to(dev).requires_grad_(grads) for t in x]
        sts = tuple(tuple(t.to(dt, copy=True).to(dev).requires_grad_(grads) for t in part) for part in st)
        o = fn(*ins, chunk_size=b, state=sts, chunk_offset=p)
        g = torch.autograd.grad(random_projection_loss(o), ins + flatten(sts)) if grads else []
        res.append(([t.detach().double().cpu() for t in flatten(o)], [t.double().cpu() for t in g]))
    tag = "fp32 " if dtype == torch.float32 else ""
    out[f"{tag}{name} outputs"] = max(max_rel_err(a, r) for a, r in zip(*(r[0] for r in res)))
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"{s}{l}" for s in ("W", "S", "A")[:len(st)]
                                                        for l in range(depth)]
    for n, a, r in zip(names, res[0][1], res[1][1]):
        out[f"{tag}{name} d{n}"] = max_rel_err(a, r)


def _checks(group: str, device: str = "cpu") -> dict:
    """Run one group of comparisons; returns {case: max relative error} (or booleans for property checks)."""
    from memtrain.kernels.titans import deep_memory, triton_deep
    from memtrain.kernels.titans.testing import flatten, make_deep_state, make_inputs, max_rel_err

    out: dict = {}
    if group == "quick":
        for depth in (2, 3):
            for b, T in ((1, 5), (16, 37), (64, 70)):        # T never a multiple of b (b = 1 aside)
                _case(out, f"depth={depth},b={b},T={T}", depth=depth, b=b, T=T, device=device)
            _case(out, f"depth={depth},b=16,T=21,offset=5", depth=depth, b=16, T=21, p=5, device=device)
            _case(out, f"depth={depth},b=16,T=37", depth=depth, b=16, T=37, dtype=torch.float32, device=device)
        # launches per call do not grow with T / b: one forward and one backward launch for any length
        counts = []
        for T in (16, 80, 200):
            x = [t.to(device).requires_grad_() for t in make_inputs(B, H, T, DK, DV, **GATES)]
            st = tuple(tuple(t.to(device) for t in part) for part in make_deep_state(B, H, DK, DV))
            before = dict(triton_deep.LAUNCHES)
            y, s = deep_memory(*x, chunk_size=16, state=st, backend="triton")
            (y.sum() + sum(t.sum() for t in flatten(s))).backward()
            counts.append({k: triton_deep.LAUNCHES[k] - before[k] for k in before})
        out["launches per call constant in T"] = counts == [{"forward": 1, "backward": 1}] * 3
    elif group == "full":
        for depth in (2, 3):
            for b, T, p in ((1, 17, 0), (16, 100, 0), (64, 129, 0), (16, 100, 7), (64, 10, 60)):
                _case(out, f"depth={depth},b={b},T={T},offset={p}", depth=depth, b=b, T=T, p=p, device=device)
            _case(out, f"depth={depth},silu,b=16,T=40", depth=depth, b=16, T=40, act="silu", device=device)
            _case(out, f"depth={depth},b=64,T=100", depth=depth, b=64, T=100, dtype=torch.float32, device=device)
        # one pass == chained passes over pieces of any length (the 3-tuple state carries the anchor)
        x = [t.to(device) for t in make_inputs(B, H, 60, DK, DV, seed=3, **GATES)]
        st0 = tuple(tuple(t.to(device) for t in part) for part in make_deep_state(B, H, DK, DV, depth=3))
        full = deep_memory(*x, chunk_size=16, state=st0, backend="triton")
        st, seen, ys = st0, 0, []
        for n in (1, 16, 5, 30, 8):
            y, st = deep_memory(*(t[:, :, seen:seen + n] for t in x), chunk_size=16, state=st,
                                chunk_offset=seen % 16, backend="triton")
            ys.append(y)
            seen += n
        out["chained pieces"] = max(max_rel_err(a.cpu(), r.cpu())
                                    for a, r in zip(flatten((torch.cat(ys, 2), st)), flatten(full)))
    else:
        raise ValueError(group)
    return out


def _compile_sm90() -> dict:
    """Compile both kernels for sm_90 without a GPU (Triton frontend, PTX, ptxas): their shared memory in bytes."""
    from triton.backends.compiler import GPUTarget
    from memtrain.kernels.titans.triton_deep import shared_memory_bytes
    return {f"depth={L}": list(shared_memory_bytes(L, "gelu", 16, 16, 16, 16, "fp32", GPUTarget("cuda", 90, 32)))
            for L in (2, 3)}


def _run_interpreted(group: str, interpret: bool = True) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), group], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_results(res: dict):
    tol = lambda key: TOL32 if key.startswith("fp32") else TOL64  # noqa: E731
    bad = {k: v for k, v in res.items() if (v is not True) and not (isinstance(v, float) and v < tol(k))}
    assert not bad, f"failing cases: {bad}"


def test_deep_triton_interpreted_quick():
    res = _run_interpreted("quick")
    assert res.pop("__interpreted__") is True, "kernels did not run under the Triton interpreter"
    assert len(res) >= 100   # 12 cases x (outputs + 12-15 gradients) + the launch count
    _assert_results(res)


@pytest.mark.slow
def test_deep_triton_interpreted_full():
    res = _run_interpreted("full")
    assert res.pop("__interpreted__") is True, "kernels did not run under the Triton interpreter"
    _assert_results(res)


def test_auto_backend_is_fused_on_cpu():
    """backend="auto" never takes the Triton path for CPU tensors (the fused torch loop is the CPU path)."""
    from memtrain.kernels.titans import deep_memory
    from memtrain.kernels.titans.testing import make_deep_state, make_inputs
    x = make_inputs(B, H, 20, DK, DV, **GATES)
    st = make_deep_state(B, H, DK, DV)
    got = deep_memory(*x, chunk_size=16, state=st, backend="auto")
    want = deep_memory(*x, chunk_size=16, state=st, backend="fused")
    assert all(torch.equal(a, b) for a, b in zip((got[0], *got[1][0]), (want[0], *want[1][0])))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            deep_memory(*x, chunk_size=16, state=st, backend="triton")


@pytest.mark.slow
def test_deep_triton_compiles_for_sm90():
    """The compiled path (not the interpreter): both kernels, depth 2 and 3, go through Triton's CUDA compiler for
    an H100 target on this CPU machine; small shapes fit the 227 KiB of shared memory (what backend="auto" checks)."""
    res = _run_interpreted("compile", interpret=False)
    assert res.pop("__interpreted__") is False
    for fwd, bwd in res.values():
        assert 0 < fwd <= bwd <= 232448, res


@pytest.mark.gpu
@pytest.mark.parametrize("group", ["quick", "full"])
def test_deep_triton_cuda_matches_spec(group):
    _assert_results(_checks(group, device="cuda"))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0" if sys.argv[1] == "compile" else "1")
    sys.path.insert(0, ROOT)
    torch.manual_seed(0)
    from memtrain.kernels.titans import triton_deep, triton_deep_bwd
    result = _compile_sm90() if sys.argv[1] == "compile" else _checks(sys.argv[1])
    result["__interpreted__"] = all(type(f).__name__ == "InterpretedFunction"
                                    for f in (triton_deep._fwd_kernel, triton_deep_bwd.bwd_kernel))
    print(json.dumps(result))
