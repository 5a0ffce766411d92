"""Every attention backend equals the reference (docs/attention.md) in output and in the gradients of q, k and v.

fp64 comparisons use 1e-10: an off-by-one in the mask changes outputs by ~1e-2 (see test_tolerance_can_fail).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memtrain.kernels.attention import attention, available_backends, build_mask, select_backend
from memtrain.kernels.attention import flash as flash_mod
from memtrain.kernels.attention import flex as flex_mod
from memtrain.kernels.attention.reference import attention_reference, masked_attention
from memtrain.kernels.attention.sdpa import attention_sdpa

NS, PS, WS = (1, 7, 130, 1000), (0, 1, 5), (None, 1, 64)
HEADS = ((4, 2), (2, 2))  # (Hq, Hkv): GQA and plain multi-head
GRID = [c for c in itertools.product(NS, PS, WS, HEADS) if c[1] <= c[0]]
IDS = [f"N{n}-P{p}-W{w}-H{hq}x{hkv}" for n, p, w, (hq, hkv) in GRID]
B, D = 2, 8


def _inputs(n, heads, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    mk = lambda h: torch.randn(B, h, n, D, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v, dout = mk(hq), mk(hkv), mk(hkv), mk(hq)
    return [x.requires_grad_() for x in (q, k, v)], dout


_REF_CACHE: dict = {}


def _reference(n, p, w, heads):
    """fp64 reference output and (dq, dk, dv), computed once per case and shared by the backends."""
    key = (n, p, w, heads)
    if key not in _REF_CACHE:
        (q, k, v), dout = _inputs(n, heads)
        out = attention_reference(q, k, v, num_prefix=p, window=w)
        _REF_CACHE[key] = (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))
    return _REF_CACHE[key]


def _max_err(a, b):
    return max((x.detach().double().cpu() - y.double().cpu()).abs().max().item() for x, y in zip(a, b))


def _check_fwd_bwd(fn, n, p, w, heads, dtype=torch.float64, tol=1e-10):
    (q, k, v), dout = _inputs(n, heads, dtype)
    out = fn(q, k, v, p, w)
    assert out.shape == q.shape and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    err = _max_err((out, *grads), _reference(n, p, w, heads))
    assert err < tol, f"max |backend - reference| = {err:.3g} >= {tol}"


# --- the mask itself --------------------------------------------------------------------------------------------


def test_mask_matches_definition():
    for n, p, w in [(9, 3, None), (9, 3, 2), (12, 0, 4), (5, 5, 1)]:
        m = build_mask(n, p, w)
        for i in range(n):
            for j in range(n):
                want = j < p or (p <= j <= i and (w is None or i - j < w))
                assert bool(m[i, j]) == want, (n, p, w, i, j)
    m = build_mask(10, 4, 3)
    assert m[:4, :4].all() and not m[:4, 4:].any(), "prefix rows: the whole prefix, no text"


def test_tolerance_can_fail():
    # The 1e-10 tolerance is meaningful: a window off by one, or a prefix off by one, is caught by far.
    (q, k, v), _ = _inputs(130, (4, 2))
    with torch.no_grad():
        ref = attention_reference(q, k, v, num_prefix=5, window=64)
        assert (ref - attention_reference(q, k, v, num_prefix=5, window=65)).abs().max() > 1e-3
        assert (ref - attention_reference(q, k, v, num_prefix=4, window=64)).abs().max() > 1e-3
        assert (ref - attention_sdpa(q, k, v, num_prefix=5, window=63)).abs().max() > 1e-3


# --- sdpa ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p,w,heads", GRID, ids=IDS)
def test_sdpa_fp64_matches_reference(n, p, w, heads):
    _check_fwd_bwd(lambda q, k, v, p, w: attention(q, k, v, num_prefix=p, window=w, backend="sdpa"), n, p, w, heads)


@pytest.mark.parametrize("block", [1, 3, 64, 2048])
def test_sdpa_block_sizes(block):
    # Blocks smaller than, equal to, and larger than the window and the text length.
    fn = lambda q, k, v, p, w: attention_sdpa(q, k, v, num_prefix=p, window=w, block=block)  # noqa: E731
    _check_fwd_bwd(fn, 130, 5, 64, (4, 2))
    _check_fwd_bwd(fn, 130, 1, 1, (2, 2))


@pytest.mark.parametrize("n,p,w", [(1000, 5, 64), (130, 1, None), (7, 0, 1)])
def test_sdpa_fp32_matches_reference(n, p, w):
    fn = lambda q, k, v, p, w: attention(q, k, v, num_prefix=p, window=w, backend="sdpa")  # noqa: E731
    _check_fwd_bwd(fn, n, p, w, (4, 2), dtype=torch.float32, tol=2e-5)


class _Shapes(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        self.ops.add(str(func))
        return out


def _largest_intermediate(n, p, w):
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    with _Shapes() as rec:
        attention_sdpa(q, k, v, num_prefix=p, window=w).sum().backward()
    return rec.max_numel


@pytest.mark.parametrize("w", [64, None])
def test_sdpa_never_builds_n_by_n(w, monkeypatch):
    # The dense builder is never called, and no intermediate (forward or backward) grows like N^2: doubling N
    # at most doubles the largest tensor, which stays far below N^2.
    import memtrain.kernels.attention.reference as ref

    def _boom(*a, **k):
        raise AssertionError("sdpa backend called the dense N x N mask builder")

    monkeypatch.setattr(ref, "build_mask", _boom)
    small, large = _largest_intermediate(2048, 5, w), _largest_intermediate(4096, 5, w)
    assert large <= 2.1 * small, (small, large)
    assert large < 4096 * 4096 / 8, large


# --- flash: the log-sum-exp merge and its backward, on CPU --------------------------------------------------------


def test_merge_by_lse_equals_union():
    (q, k, v), _ = _inputs(50, (2, 2))
    q, k, v = q.detach(), k.detach(), v.detach()
    sel = torch.rand(50, generator=torch.Generator().manual_seed(1)) < 0.4  # arbitrary disjoint split of keys
    full = torch.ones(50, 50, dtype=torch.bool)
    o, lse = masked_attention(q, k, v, full, return_lse=True)
    o1, l1 = masked_attention(q, k[:, :, sel], v[:, :, sel], full[:, sel], return_lse=True)
    o2, l2 = masked_attention(q, k[:, :, ~sel], v[:, :, ~sel], full[:, ~sel], return_lse=True)
    om, lm = flash_mod.merge_by_lse(o1, l1, o2, l2)
    assert _max_err((om, lm), (o, lse)) < 1e-12


@pytest.mark.parametrize("n,p,w,heads", GRID, ids=IDS)
def test_flash_merge_reference_primitive_fp64(n, p, w, heads):
    prim = flash_mod.ReferencePrimitive()
    fn = lambda q, k, v, p, w: flash_mod.prefix_attention_from_primitive(q, k, v, p, w, prim)  # noqa: E731
    _check_fwd_bwd(fn, n, p, w, heads)


@pytest.mark.parametrize("n,p,w,heads", [c for c in GRID if c[3] == (4, 2)], ids=[i for i, c in zip(IDS, GRID)
                                                                                    if c[3] == (4, 2)])
def test_flash_merge_aten_cpu_flash_primitive(n, p, w, heads):
    # The real fused CPU kernel (forward returns lse, backward takes out + lse), as flash-attn would be used.
    prim = flash_mod.CpuFlashPrimitive()
    fn = lambda q, k, v, p, w: flash_mod.prefix_attention_from_primitive(q, k, v, p, w, prim)  # noqa: E731
    _check_fwd_bwd(fn, n, p, w, heads)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_mod.HAVE_FLASH_ATTN, reason="flash-attn not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,p,w", [(1, 1, None), (7, 0, 1), (130, 5, 64), (1000, 1, None), (1000, 5, 64)])
def test_flash_attn_cuda(n, p, w, dtype):
    # The real flash-attn kernels (forward pieces + private backward with the merged out/lse), D = 64.
    g = torch.Generator().manual_seed(0)
    mk = lambda h: torch.randn(B, h, n, 64, generator=g, dtype=torch.float64)  # noqa: E731
    q64, k64, v64, dout64 = mk(4), mk(2), mk(2), mk(4)
    q, k, v = (x.to("cuda", dtype).requires_grad_() for x in (q64, k64, v64))
    out = attention(q, k, v, num_prefix=p, window=w, backend="flash")
    grads = torch.autograd.grad(out, (q, k, v), dout64.to("cuda", dtype))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_reference(qd, kd, vd, num_prefix=p, window=w)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), dout64.to("cuda"))
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in zip((out, *grads), (ref, *rgrads)):
        assert (got.double() - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


# --- flex ---------------------------------------------------------------------------------------------------------


def test_flex_tiles_match_create_block_mask():
    # The analytic tile classification equals FlexAttention's own (evaluated on the dense grid, small N only).
    from torch.nn.attention.flex_attention import create_block_mask

    for n, p, w in itertools.product([1, 7, 16, 17, 130], [0, 1, 5, 20], [None, 1, 16, 40]):
        if p > n:
            continue
        bm = create_block_mask(flex_mod.make_mask_mod(p, w), None, None, n, n, device="cpu", BLOCK_SIZE=16)
        partial, full = flex_mod.tile_masks(n, p, w, tile=16)
        assert torch.equal(bm.to_dense()[0, 0].bool(), partial | full), (n, p, w)
        theirs = torch.zeros_like(full)
        nfull, ifull = bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0]
        for r in range(theirs.shape[0]):
            theirs[r, ifull[r, : nfull[r]].long()] = True
        assert not (full & ~theirs).any(), (n, p, w)  # only tiles flex also calls full skip the mask_mod


FLEX_CASES = [(1000, 5, 64, (4, 2)), (130, 1, None, (2, 2)), (7, 0, 1, (4, 2)), (1, 1, None, (2, 2))]


@pytest.mark.skipif("flex" not in available_backends(), reason="no FlexAttention in this torch")
@pytest.mark.parametrize("n,p,w,heads", FLEX_CASES, ids=[f"N{c[0]}-P{c[1]}-W{c[2]}" for c in FLEX_CASES])
def test_flex_forward_cpu(n, p, w, heads):
    # CPU: forward only and no float64. Each case compiles (4-10 s on 2 cores): a few representative cases only.
    (q, k, v), _ = _inputs(n, heads, torch.float32)
    with torch.no_grad():
        out = attention(q, k, v, num_prefix=p, window=w, backend="flex")
    err = _max_err((out,), _reference(n, p, w, heads)[:1])
    assert err < 2e-5, err


@pytest.mark.gpu
@pytest.mark.parametrize("n,p,w", [(130, 5, 64), (1000, 1, None)])
def test_flex_cuda_forward_backward(n, p, w):
    (q, k, v), dout = _inputs(n, (4, 2), torch.float32, device="cuda")
    out = attention(q, k, v, num_prefix=p, window=w, backend="flex")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    err = _max_err((out, *grads), _reference(n, p, w, (4, 2)))
    assert err < 1e-4, err


# --- public wrapper -----------------------------------------------------------------------------------------------


def test_available_and_auto_on_cpu():
    names = available_backends()
    assert {"reference", "sdpa"} <= set(names)
    (q, k, v), _ = _inputs(7, (4, 2), torch.float32)
    assert select_backend(q, k, v) == "sdpa"  # grad needed on CPU: flex cannot
    out = attention(q, k, v, num_prefix=1, window=3)
    out.sum().backward()
    assert q.grad is not None and k.grad.shape == k.shape


def test_auto_selection_rules_cpu():
    q = torch.zeros(1, 2, 4096, 8)
    with torch.no_grad():
        want = "flex" if "flex" in available_backends() else "sdpa"
        assert select_backend(q, q, q, window=256, num_prefix=32) == want  # long windowed forward
        assert select_backend(q, q, q, window=None, num_prefix=32) == "sdpa"  # causal: SDPA's kernel is faster
        assert select_backend(q, q, q, window=5000, num_prefix=32) == "sdpa"  # window covers everything
        assert select_backend(q.double(), q.double(), q.double(), window=256) == "sdpa"  # flex: no fp64 on CPU
        assert select_backend(q[:, :, :1000], q[:, :, :1000], q[:, :, :1000], window=64) == "sdpa"  # short
    q.requires_grad_()
    assert select_backend(q, q, q, window=256) == "sdpa"  # gradient needed: no flex backward on CPU


def test_explicit_unsupported_backend_raises():
    (q, k, v), _ = _inputs(7, (2, 2), torch.float32)
    if "flex" in available_backends():
        with pytest.raises(RuntimeError, match="forward only"):
            attention(q, k, v, backend="flex")  # grad needed on CPU
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flash"):
            attention(q, k, v, backend="flash")


@pytest.mark.parametrize(
    "kwargs,shapes,match",
    [
        (dict(backend="fast"), None, "unknown attention backend"),
        ({}, ((1, 3, 8, 4), (1, 2, 8, 4)), "multiple of key/value heads"),
        ({}, ((1, 4, 8, 4), (1, 2, 9, 4)), "sequence length mismatch"),
        (dict(window=0), None, "window must be"),
        (dict(num_prefix=9), None, "num_prefix"),
        ({}, ((1, 4, 8, 4), (1, 2, 8, 5)), "head dim mismatch"),
    ],
)
def test_bad_arguments(kwargs, shapes, match):
    qs, ks = shapes or ((1, 4, 8, 4), (1, 2, 8, 4))
    q, k = torch.randn(qs), torch.randn(ks)
    with pytest.raises(ValueError, match=match) as exc:
        attention(q, k, k.clone(), **kwargs)
    assert "\n" not in str(exc.value)


def test_scale_is_inverse_sqrt_d():
    # One query, two keys, no mask games: softmax weights follow scores / sqrt(D).
    q = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    k = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64).expand(1, 1, 2, 4)
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float64).expand(1, 1, 2, 4)
    out = attention(q, k, v, num_prefix=2, backend="sdpa")  # both keys are prefix: visible to both queries
    w = 1 / (1 + math.exp(-1 / 2))
    assert abs(out[0, 0, 0, 0].item() - w) < 1e-12
