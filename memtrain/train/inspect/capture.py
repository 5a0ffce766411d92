"""Capture hidden states and attention probabilities of a model without changing the model's code.

    with capture(model) as trace:
        model(ids)                       # ids [B, T]
    trace.passes[0].hidden[l]            # [B, N, D] residual stream entering block l (hidden[L]: after the last)
    trace.passes[0].probs[l]             # [B, Hq, N, N] float64 attention probabilities of block l
    trace.passes[0].regions              # {"meta": (0, P), "text": (P, N)} (RMT adds "read" and "write")

How. The plain model runs its blocks once per call; the RMT runs them once per segment ("pass"). Three hooks:

* a forward pre-hook on every `Block` keeps its input `h` (a pass starts when block 0 runs), and a forward hook on the
  last block keeps the stream after it;
* a forward pre-hook (with kwargs) on every `Attention` replaces the `attend` argument by a wrapper around the call
  the layer would have made anyway: `attend` when one is given (the RMT passes its own), else the layer's default
  `memtrain.kernels.attention.attention(q, k, v, num_prefix, window, backend)`. The wrapper runs that call unchanged (the
  model's outputs are bit-for-bit those of an uncaptured run), and keeps q and k (after rotary).
* The probabilities are then recomputed in float64 from q, k and the visibility mask of the reference spec
  (`memtrain/kernels/attention/reference.py`): `softmax(q kᵀ / sqrt(Dh))` over `build_mask(N, num_prefix, window)`, or for
  an RMT windowed layer the same mask for the first N − M rows and `memtrain.model.memory.rmt.model.write_mask` for the M write rows.
  An `attend` the capture does not recognise (a future layout) is measured instead by probing it: calling it with
  one-hot values (`v = e_j` for Dh positions at a time) returns the probability columns directly.

Self-check: for every call, `probs @ v` must reproduce the kernel's own output (max abs error <= 1e-4 relative to
the output scale); otherwise the capture raises rather than report a mask the model did not use.

Titans models (mac / mag / mal) run attention through their own code paths, not `Attention.forward`: `capture`
hands them to `titans_capture.capture_titans`, which wraps those paths instead (MAC maps have their own key layout,
`Pass.key_regions`). LMM has no attention: refused.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from memtrain.kernels.attention import attention as kernel_attention
from memtrain.kernels.attention.reference import build_mask, repeat_kv
from memtrain.model.memory import memory_kinds, memory_spec

from .load import InspectError

CAPTURED = frozenset({"registers", "attention"})  # the inspections that capture passes through the blocks

Regions = dict[str, tuple[int, int]]


@dataclass
class Pass:
    """One run of the blocks (the whole sequence for the plain model, one segment for the RMT)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    """L + 1 tensors `[B, N, D]` (float32, detached): the stream entering block l, then the stream after block L-1."""
    probs: list[torch.Tensor] = field(default_factory=list)
    """L tensors `[B, Hq, N, N]` float64: attention probabilities of block l (0 where masked); Titans MAC:
    `[B, Hq, N, Nk]` with keys laid out as `key_regions`."""
    methods: list[str] = field(default_factory=list)
    """How each block's probabilities were obtained: "reference-mask" or "probe"."""
    regions: Regions = field(default_factory=dict)
    """Named position ranges [start, end) of this pass: meta, (read), text, (write)."""
    key_regions: Regions = field(default_factory=dict)
    """Named ranges of the key axis when it differs from the query axis (Titans MAC: persistent, retrieved,
    segment); empty: keys are the same positions as the queries (`regions`)."""


@dataclass
class Trace:
    passes: list[Pass] = field(default_factory=list)


def regions_for(model: torch.nn.Module, n: int) -> Regions:
    """Layout of a pass of N = n positions, as the memory kind's spec gives it: plain [meta; text], RMT
    [meta; read; text; (write)]."""
    return memory_spec(model.cfg.memory).regions(model.cfg, n)


def mask_of(attend: Callable, n: int, device=None) -> torch.Tensor | None:
    """The `[N, N]` visibility mask an attend callable applies, when it is one the capture knows; else None."""
    if isinstance(attend, functools.partial):
        kw = attend.keywords
        if attend.func is kernel_attention:
            return build_mask(n, kw.get("num_prefix", 0), kw.get("window"), device=device)
        from memtrain.model.memory.rmt.model import split_attend, write_mask
        if attend.func is split_attend:  # body through the kernel, write rows dense (see memtrain/model/memory/rmt/model.py)
            m = kw["num_write"]
            mask = torch.zeros(n, n, dtype=torch.bool, device=device)
            mask[: n - m, : n - m] = build_mask(n - m, kw["num_prefix"], kw["window"], device=device)
            mask[n - m:] = write_mask(n - m, m, device)
            return mask
    return None


def reference_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(Dh)) under `mask`, in float64: q `[B, Hq, N, Dh]`, k `[B, Hkv, N, Dh]` -> `[B, Hq, N, N]`."""
    k = repeat_kv(k.double(), q.shape[1] // k.shape[1])
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def probe_probs(attend: Callable, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Probabilities `[B, Hq, N, N]` of any attend callable, read off its output for one-hot values.

    With v = e_j (one-hot over key positions), out[i] = Σ_j p[i, j] e_j = p[i, :]; the head dim Dh limits one call to
    Dh key positions, so N / Dh calls cover all keys. Exact up to the kernel's own rounding (float32).
    """
    B, Hkv, N, Dh = k.shape
    cols = []
    for start in range(0, N, Dh):
        width = min(Dh, N - start)
        v = torch.zeros_like(k)
        v[:, :, start:start + width, :width] = torch.eye(width, dtype=k.dtype, device=k.device)
        cols.append(attend(q, k, v)[..., :width])
    return torch.cat(cols, dim=-1).double()


def _check_reproduces(probs: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    ref = probs @ repeat_kv(v.double(), probs.shape[1] // v.shape[1])
    err = float((ref - out.double()).abs().max())
    scale = max(1.0, float(out.abs().max()))
    if err > 1e-4 * scale:
        raise InspectError(f"captured attention of block {layer} does not reproduce the kernel's output "
                           f"(max error {err:.2e}): the capture does not know this layer's mask")


@contextlib.contextmanager
def capture(model: torch.nn.Module, *, probs: bool = True) -> Iterator[Trace]:
    """Record every pass of `model`'s blocks while the context is open (see the module docstring).

    `probs=False` keeps only hidden states (cheaper: no N × N tensors). The hooks are removed on exit.
    """
    from memtrain.model.layers import Block

    from .titans_capture import capture_titans, is_titans
    if is_titans(model):  # their own capture (LMM included: hidden states and gates, no attention to draw)
        with capture_titans(model, probs=probs) as trace:
            yield trace
        return
    cfg = getattr(model, "cfg", None)
    if cfg is None or not CAPTURED & memory_spec(cfg.memory).inspect:
        kind = getattr(cfg, "memory", type(model).__name__)
        supported = [k for k in memory_kinds() if CAPTURED & memory_spec(k).inspect]
        raise InspectError(f"capturing attention of model.memory={kind!r} is not available for this model yet "
                           f"(supported: {', '.join(supported)})")
    blocks = list(model.blocks)
    if not all(isinstance(b, Block) for b in blocks):
        raise InspectError("this model's blocks are not memtrain.model.layers.Block: capture is not available for it yet")
    trace = Trace()
    handles = []

    def block_pre(index: int):
        def hook(module, args):
            if index == 0:
                h = args[0]
                trace.passes.append(Pass(regions=regions_for(model, h.shape[1])))
            trace.passes[-1].hidden.append(args[0].detach().float().clone())
        return hook

    def last_post(module, args, output):
        trace.passes[-1].hidden.append(output.detach().float().clone())

    def attn_pre(index: int, attn):
        def hook(module, args, kwargs):
            inner = kwargs.get("attend") or functools.partial(
                kernel_attention, num_prefix=attn.num_prefix, window=attn.window, backend=attn.backend)

            def recording(q, k, v):
                out = inner(q, k, v)
                mask = mask_of(inner, q.shape[2], q.device)
                if mask is None:
                    p, method = probe_probs(inner, q.detach(), k.detach()), "probe"
                else:
                    p, method = reference_probs(q.detach(), k.detach(), mask), "reference-mask"
                _check_reproduces(p, v.detach(), out.detach(), index)
                trace.passes[-1].probs.append(p)
                trace.passes[-1].methods.append(method)
                return out
            return args, {**kwargs, "attend": recording}
        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_pre(i)))
            if probs:
                handles.append(block.attn.register_forward_pre_hook(attn_pre(i, block.attn), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(last_post))
        yield trace
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_captured(model: torch.nn.Module, ids: torch.Tensor, *, probs: bool = True) -> Trace:
    """One no-grad forward of `ids` `[B, T]` under `capture`; the trace of its passes."""
    model.check_tokens(ids)
    with capture(model, probs=probs) as trace:
        model(ids)
    return trace
