"""Attention capture for Titans models of kind mac, mag and mal (memtrain/model/memory/titans/model.py).

    with capture_titans(model) as trace:     # or capture.capture(model), which hands Titans models here
        model(ids)                           # ids [B, T], a fresh call (state=None)
    trace.passes[0].probs[l]                 # MAG / MAL: [B, Hq, N, N]; MAC: [B, Hq, N, P + 2n] (float64)

Titans blocks compute attention inside `TitansBlock.step`, not through `Attention.forward`, so capture.py's hooks
never see it. While the context is open, the names the block code looks up at call time are wrapped, and restored
on exit (after an error too):

* `block.step` of every block, as an instance attribute shadowing the method. The model calls `block.step` through
  `run_block`, so a module forward pre-hook would never fire; the wrapper tells the other wrappers which block is
  running, keeps the block's input h `[B, P + n, D]` (one pass = one model call) and files the block's map when the
  block returns;
* MAG / MAL: `block.attn.sequence`, by a proxy whose `attention(q, k, v, num_prefix=P, window=W, backend=...)` is
  the fresh call's prefix + sliding-window attention (every other attribute is the original's);
* MAC: the module-level `_masked(q, keys, vals, mask)` (the text queries of one segment) and `attention(...)` (the
  meta queries over the prefix) of memtrain.model.memory.titans.model.

Each wrapper runs the original call unchanged and returns its result: the model's outputs are bit-for-bit those of
an uncaptured run. The probabilities are recomputed in float64 with the kernels' scaling, softmax(q kᵀ / sqrt(Dh))
(`capture.reference_probs`), under the call's mask: `build_mask(N, P, W)` of the spec
(memtrain/kernels/attention/reference.py) for MAG / MAL and the MAC meta queries, the mask `_masked` was given for
MAC segments. As in capture.py, `probs @ v` must reproduce every call's output, or the capture raises.

Layouts. MAG / MAL: queries and keys are the block's positions [meta P ‖ text n] (regions meta, text), as in the
plain model. MAC: queries [meta P ‖ text n]; keys [persistent P ‖ retrieved n ‖ segment n] on absolute text
positions (`Pass.key_regions`): retrieved column P + j is h_j (token j's read of the memory as it stood before j's
segment), segment column P + n + j is token j. Text query i of segment s sees every persistent key and h_j, x_j for
j in s with j <= i: each half of the key axis is a band of per-segment causal triangles. Meta queries see the
persistent keys only.

Only fresh calls (state=None) are captured: a continued call attends to a KV cache the capture never saw.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

import memtrain.model.memory.titans.model as titans_model
from memtrain.kernels.attention.reference import build_mask
from memtrain.model.memory.titans.model import TitansBlock

from .capture import Pass, Regions, Trace, _check_reproduces, reference_probs, regions_for
from .load import InspectError



def is_titans(model: torch.nn.Module) -> bool:
    """Whether every block of `model` is a `TitansBlock` (its attention is captured here, not by capture.py)."""
    blocks = getattr(model, "blocks", None)
    return blocks is not None and len(blocks) > 0 and all(isinstance(b, TitansBlock) for b in blocks)


def no_attention_reason(model: torch.nn.Module) -> str | None:
    """None when `capture_titans` can record `model`'s attention maps; else why not, in one line."""
    if not is_titans(model):
        return f"the blocks of {type(model).__name__} are not Titans blocks the capture knows"
    if any(b.attention_layout is None for b in model.blocks):
        return f"model.memory={model.cfg.memory!r} has no attention (LMM is the neural memory alone)"
    return None


def mac_key_regions(num_prefix: int, n: int) -> Regions:
    """The MAC map's key axis for P = num_prefix meta tokens and n text tokens (module docstring)."""
    P = num_prefix
    return {"persistent": (0, P), "retrieved": (P, P + n), "segment": (P + n, P + 2 * n)}


@dataclass
class TitansTrace(Trace):
    io: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    """With `keep_io`: per pass, per block (values `[B, Hkv, Nk, Dh]`, kernel outputs `[B, Hq, N, Dh]`), both laid
    out as the block's map (masked keys' values 0), so that `probs @ values` must equal `outputs`."""


@dataclass
class _Running:
    """The attention calls of the block running now, assembled into its map `[B, Hq, P + n, Nk]`."""

    index: int
    block: TitansBlock
    n: int
    """Text positions of this call."""
    keep_io: bool
    probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    filled: int = 0
    """MAC: text query rows written by segment calls so far (segments come in order)."""
    meta: bool = False
    """MAC: the meta queries' call was seen."""

    def allocate(self, p: torch.Tensor, v: torch.Tensor) -> None:
        """Zero maps on the block's first call (MAC: the map is filled by several calls); p `[B, Hq, r, k]`,
        v `[B, Hkv, k, Dh]` give the sizes."""
        if self.probs is not None:
            return
        (B, Hq), (Hkv, Dh) = p.shape[:2], (v.shape[1], v.shape[3])
        P = self.block.num_prefix
        nk = P + 2 * self.n if self.block.attention_layout == "segments" else P + self.n
        self.probs = p.new_zeros(B, Hq, P + self.n, nk)
        if self.keep_io:
            self.values = v.new_zeros(B, Hkv, nk, Dh)
            self.outputs = v.new_zeros(B, Hq, P + self.n, Dh)

    def place(self, rows: slice, cols: list[tuple[slice, slice]], p: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor) -> None:
        """Copy one call's probabilities p `[B, Hq, r, k]` (and v `[B, Hkv, k, Dh]`, out `[B, Hq, r, Dh]`) into
        the map: query rows `rows`, key columns `dst` of the map <- columns `src` of the call, per (dst, src)."""
        self.allocate(p, v)
        for dst, src in cols:
            self.probs[:, :, rows, dst] = p[..., src]
            if self.keep_io:
                self.values[:, :, dst] = v[:, :, src]
        if self.keep_io:
            self.outputs[:, :, rows] = out

    def unexpected(self, what: str) -> InspectError:
        return InspectError(f"block {self.index} (model.memory={self.block.kind!r}) made an attention call the "
                            f"Titans capture does not know ({what}): did the block's layout change?")


class _SequenceProxy:
    """`attn.sequence` while capturing: `attention` is recorded, every other attribute is the original's."""

    def __init__(self, inner: Any, record):
        self._inner, self._record = inner, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
        out = self._inner.attention(q, k, v, **kw)
        self._record(q, k, v, out, kw)
        return out


@contextlib.contextmanager
def capture_titans(model: torch.nn.Module, *, probs: bool = True, keep_io: bool = False) -> Iterator[TitansTrace]:
    """Record the blocks of a Titans `model` while the context is open (module docstring).

    `probs=False` keeps only hidden states (LMM included); `keep_io` also keeps each block's values and kernel
    outputs in its map's layout (`TitansTrace.io`, for tests). Everything wrapped is restored on exit.
    """
    if not is_titans(model):
        raise InspectError(f"capture_titans takes a Titans model, got {type(model).__name__}")
    reason = no_attention_reason(model) if probs else None
    if reason:
        raise InspectError(f"{reason}: no attention maps to capture (`memtrain inspect attention` writes its gates)")
    blocks: list[TitansBlock] = list(model.blocks)
    if probs and any(getattr(b.attn.sequence, "size", 1) > 1 for b in blocks):
        raise InspectError("Titans attention capture runs on one process only, not under context parallelism")
    trace = TitansTrace()
    running: list[_Running | None] = [None]  # the block whose step runs now (None between blocks)

    def current(layouts: tuple[str, ...], what: str) -> _Running | None:
        r = running[0]
        if r is not None and r.block.attention_layout not in layouts:
            raise r.unexpected(what)
        return r

    @torch.no_grad()
    def window_call(q, k, v, out, kw: dict) -> None:  # MAG / MAL: sequence.attention over [meta ‖ text]
        r = current(("window",), "sequence.attention")
        if r is None:
            return
        P, N = r.block.num_prefix, q.shape[2]
        if r.probs is not None or kw.get("num_prefix") != P or N != P + r.n:
            raise r.unexpected(f"sequence.attention over N={N} with num_prefix={kw.get('num_prefix')}")
        p = reference_probs(q.detach(), k.detach(), build_mask(N, P, kw.get("window"), device=q.device))
        _check_reproduces(p, v.detach(), out.detach(), r.index)
        everything = slice(0, N)
        r.place(everything, [(everything, everything)], p, v.detach(), out.detach())

    @torch.no_grad()
    def segment_call(q, keys, vals, mask, out) -> None:  # MAC: one segment's text queries
        r = current(("segments",), "_masked")
        if r is None:
            return
        P, l, t0 = r.block.num_prefix, q.shape[2], r.filled
        if keys.shape[2] != P + 2 * l or t0 + l > r.n:
            raise r.unexpected(f"_masked with {l} queries and {keys.shape[2]} keys after {t0} text rows")
        p = reference_probs(q.detach(), keys.detach(), mask)  # [B, Hq, l, P + 2l]
        _check_reproduces(p, vals.detach(), out.detach(), r.index)
        # a fresh call starts on the segment grid: the call's keys are [p ‖ h of this segment ‖ x of this segment]
        cols = [(slice(0, P), slice(0, P)), (slice(P + t0, P + t0 + l), slice(P, P + l)),
                (slice(P + r.n + t0, P + r.n + t0 + l), slice(P + l, P + 2 * l))]
        r.place(slice(P + t0, P + t0 + l), cols, p, vals.detach(), out.detach())
        r.filled += l

    @torch.no_grad()
    def prefix_call(q, k, v, out, kw: dict) -> None:  # MAC: meta queries over the prefix
        r = current(("segments",), "attention")
        if r is None:
            return
        P = r.block.num_prefix
        if r.meta or q.shape[2] != P or k.shape[2] != P or kw.get("num_prefix") != P:
            raise r.unexpected(f"attention over N={q.shape[2]} with num_prefix={kw.get('num_prefix')}")
        p = reference_probs(q.detach(), k.detach(), build_mask(P, P, kw.get("window"), device=q.device))
        _check_reproduces(p, v.detach(), out.detach(), r.index)
        r.place(slice(0, P), [(slice(0, P), slice(0, P))], p, v.detach(), out.detach())
        r.meta = True

    def finish(r: _Running) -> None:
        P = r.block.num_prefix
        mac_done = r.filled == r.n and (r.meta or P == 0)
        if r.probs is None or (r.block.attention_layout == "segments" and not mac_done):
            raise r.unexpected("the capture saw only part of the block's attention")

    original_masked, original_attention = titans_model._masked, titans_model.attention

    def masked(q, k, v, mask):
        out = original_masked(q, k, v, mask)
        segment_call(q, k, v, mask, out)
        return out

    def attention(q, k, v, **kw):
        out = original_attention(q, k, v, **kw)
        prefix_call(q, k, v, out, kw)
        return out

    def wrap_step(index: int, block: TitansBlock, original):
        def step(h: torch.Tensor, state=None, seen: int = 0):
            if state is not None or seen:
                raise InspectError("Titans attention capture takes fresh calls only (state=None): a continued "
                                   "call attends to a KV cache the capture never saw")
            if index == 0 or not trace.passes:
                P = block.num_prefix
                keys = mac_key_regions(P, h.shape[1] - P) if block.attention_layout == "segments" and probs else {}
                trace.passes.append(Pass(regions=regions_for(model, h.shape[1]), key_regions=keys))
                trace.io.append([])
            now = trace.passes[-1]
            now.hidden.append(h.detach().float().clone())
            r = _Running(index, block, h.shape[1] - block.num_prefix, keep_io) if probs else None
            running[0] = r
            try:
                result = original(h, state, seen)
            finally:
                running[0] = None
            if r is not None:
                finish(r)
                now.probs.append(r.probs)
                now.methods.append("reference-mask")
                if keep_io:
                    trace.io[-1].append((r.values, r.outputs))
            if index == len(blocks) - 1:
                now.hidden.append(result[0].detach().float().clone())
            return result
        return step

    patches: list[tuple[Any, str, bool, Any]] = []  # (object, name, whether it had its own value, that value)

    def patch(obj: Any, name: str, value: Any) -> None:
        own = vars(obj)
        patches.append((obj, name, name in own, own.get(name)))
        setattr(obj, name, value)

    try:
        for i, block in enumerate(blocks):
            patch(block, "step", wrap_step(i, block, block.step))
            if probs and block.attention_layout != "segments":
                patch(block.attn, "sequence", _SequenceProxy(block.attn.sequence, window_call))
        if probs:
            patch(titans_model, "_masked", masked)
            patch(titans_model, "attention", attention)
        yield trace
    finally:
        for obj, name, had, old in reversed(patches):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)  # `step`: the instance attribute goes, the class's method shows again
