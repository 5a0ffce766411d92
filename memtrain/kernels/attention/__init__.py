"""Attention with prefix (meta) tokens, optional sliding window and GQA: one spec, several fast paths.

    from memtrain.kernels.attention import attention
    out = attention(q, k, v, num_prefix=P, window=W, backend="auto")

q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` with Hq a multiple of Hkv; returns ``[B, Hq, N, D]``; softmax scale
1/sqrt(D). The first P positions are prefix tokens. Key j is visible to query i iff j < P, or P <= j <= i and
(W is None or i - j < W) (docs/attention.md): prefix queries see the whole prefix and no text.

Backends (all equal to ``reference``; see docs/attention.md for speed and memory):
    reference  dense N x N mask, plain torch, float64: the spec (reference.py)
    sdpa       torch SDPA, causal or block-banded, no N x N mask, autograd backward everywhere (sdpa.py)
    flex       compiled FlexAttention with a block mask; CPU: forward only, no float64 (flex.py)
    flash      flash-attn pieces merged by log-sum-exp; CUDA + flash-attn, fp16/bf16 (flash.py)
    auto       the fastest available backend that supports the case (device, dtype, whether grad is needed)
"""
from __future__ import annotations

import torch

from . import flash as _flash
from . import flex as _flex
from .reference import attention_reference, build_mask
from .sdpa import attention_sdpa

__all__ = ["attention", "available_backends", "select_backend", "attention_reference", "build_mask", "BACKENDS"]

BACKENDS = ("auto", "reference", "sdpa", "flex", "flash")


def available_backends() -> list[str]:
    """Backends that can run in this environment (not counting "auto")."""
    names = ["reference", "sdpa"]
    if _flex.HAVE_FLEX:
        names.append("flex")
    if _flash.HAVE_FLASH_ATTN and torch.cuda.is_available():
        names.append("flash")
    return names


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _unsupported_reason(name: str, q: torch.Tensor, needs_grad: bool) -> str | None:
    if name in ("reference", "sdpa"):
        return None
    if name == "flex":
        if not _flex.HAVE_FLEX:
            return "torch.nn.attention.flex_attention is not available in this torch"
        if not _flex.supports(q, needs_grad):
            return (f"flex on {q.device.type} supports forward only, in float32/float16/bfloat16 (got dtype "
                    f"{q.dtype}, grad needed: {needs_grad}); use backend='sdpa'")
        return None
    if not _flash.supports(q):
        return "flash needs flash-attn installed, a CUDA tensor in fp16/bf16 and head dim <= 256 divisible by 8"
    return None


# On CPU, compiled flex beat the blocked SDPA in the windowed forward at every N measured (docs/attention.md:
# 1.1-3x once compiled), but each new shape costs 5-15 s of compilation. Below this length a call takes well under
# 0.5 s either way, so the compile is rarely repaid: auto uses flex from here on only.
FLEX_CPU_MIN_N = 4096
_flex_failed = False  # set when compiling flex fails here (e.g. no C++ compiler): auto then stays on sdpa


def select_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, num_prefix: int = 0
) -> str:
    """What ``backend="auto"`` runs for these inputs (grad needed = grad mode on and an input requires grad).

    CUDA: flash when it supports the case, else flex (compiled kernels with a backward), else sdpa.
    CPU: sdpa whenever a gradient is needed (flex has no CPU backward), for float64, without an effective
    window (SDPA's causal kernel is faster there) and for short sequences; flex for the windowed forward at
    N >= FLEX_CPU_MIN_N. flex compiles once per shape (5-15 s on 2 cores), which pays off only when a shape
    repeats, as in evaluation loops.
    """
    needs_grad = _needs_grad(q, k, v)
    flex_ok = not _flex_failed and _flex.supports(q, needs_grad)
    if q.device.type == "cuda":
        if _flash.supports(q):
            return "flash"
        return "flex" if flex_ok else "sdpa"
    n = q.shape[2]
    windowed = window is not None and window < n - num_prefix
    return "flex" if (flex_ok and windowed and n >= FLEX_CPU_MIN_N) else "sdpa"


def _check(q, k, v, num_prefix, window, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (B, Hq, N, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"batch size mismatch: q has {B}, k/v have {Bk}")
    if N != Nk:
        raise ValueError(f"sequence length mismatch: q has N={N}, k/v have N={Nk}")
    if D != Dk:
        raise ValueError(f"head dim mismatch: q has D={D}, k/v have D={Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= N:
        raise ValueError(f"num_prefix must be an int in [0, N={N}], got {num_prefix!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int = 0,
    window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Prefix + causal (+ sliding window) attention.

    q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` (Hq % Hkv == 0, GQA: query head h reads key/value head
    h // (Hq / Hkv)), ``num_prefix`` P in [0, N], ``window`` None or W >= 1 (a text query sees the W most recent
    text keys including itself, plus the prefix). Returns ``[B, Hq, N, D]`` in q's dtype.

    Raises ValueError for an unknown backend or inconsistent shapes/arguments, RuntimeError when an explicitly
    named backend cannot run this case here (e.g. "flash" without CUDA, "flex" with grad on CPU).
    """
    _check(q, k, v, num_prefix, window, backend)
    if backend == "auto":
        backend = select_backend(q, k, v, window, num_prefix)
        if backend == "flex" and q.device.type == "cpu":
            try:
                return _flex.attention_flex(q, k, v, num_prefix=num_prefix, window=window)
            except Exception:  # compilation unavailable here: remember, and use the always-available path
                global _flex_failed
                _flex_failed = True
                backend = "sdpa"
    else:
        reason = _unsupported_reason(backend, q, _needs_grad(q, k, v))
        if reason:
            raise RuntimeError(f"attention backend {backend!r} cannot run this case: {reason}")
    if backend == "reference":
        return attention_reference(q, k, v, num_prefix=num_prefix, window=window)
    if backend == "sdpa":
        return attention_sdpa(q, k, v, num_prefix=num_prefix, window=window)
    if backend == "flex":
        return _flex.attention_flex(q, k, v, num_prefix=num_prefix, window=window)
    return _flash.attention_flash(q, k, v, num_prefix=num_prefix, window=window)
