"""Prefix attention from an (out, log-sum-exp) attention primitive: flash-attn on CUDA, testable on CPU.

flash-attn has no mask argument, so the mask of docs/attention.md is cut into pieces it runs natively:

* prefix rows    (queries i < P):  prefix keys, non-causal;
* text rows      (queries i >= P): (a) prefix keys, non-causal, and (b) text keys, causal with window_size
                 (W-1, 0); (a) and (b) are disjoint key sets of the same softmax row, merged by their
                 log-sum-exp (``merge_by_lse``).

Backward (the ring-attention identity): for one softmax row over the union of key sets, the gradient restricted
to one key set is what a flash backward on that set computes when it is handed the *merged* output and *merged*
log-sum-exp instead of its own (probabilities exp(s - lse) are then the global ones, and the correction term
rowsum(dO * O) uses the global output). So backward is one primitive backward per piece with the merged
(out, lse), summing dq over pieces. A plain autograd through ``merge_by_lse`` would be wrong here, because
flash-attn's autograd drops the gradient of its log-sum-exp output.

The logic is written against a small ``Primitive`` interface (forward -> (out, lse); backward given out/lse), with
three implementations: ``FlashAttnPrimitive`` (flash-attn, CUDA, fp16/bf16), ``CpuFlashPrimitive``
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, docs/distributed.md#what-runs-on-a-cpu) and ``ReferencePrimitive``
(plain torch, float64), so the merge and the backward are tested on CPU.
"""
from __future__ import annotations

import inspect
import math

import torch

from .reference import build_mask, repeat_kv

try:  # optional extra for CUDA machines (pyproject [cuda]); no wheel for CPU machines
    from flash_attn import flash_attn_func
    from flash_attn import flash_attn_interface as _fai

    HAVE_FLASH_ATTN = True
except Exception:  # ImportError, or a wheel built against another torch that fails to load
    HAVE_FLASH_ATTN = False


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Combine attention over two disjoint key sets of the same queries into attention over their union.

    o1/o2 ``[B, H, N, D]``, lse1/lse2 ``[B, H, N]`` (natural log). Returns (out ``[B, H, N, D]`` in o1's dtype,
    lse ``[B, H, N]``). Computed in at least float32 so a bf16 output is rounded once, after the merge.
    """
    dt = torch.promote_types(torch.promote_types(o1.dtype, lse1.dtype), torch.float32)
    lse1, lse2 = lse1.to(dt), lse2.to(dt)
    lse = torch.logaddexp(lse1, lse2)
    out = o1.to(dt) * torch.exp(lse1 - lse).unsqueeze(-1) + o2.to(dt) * torch.exp(lse2 - lse).unsqueeze(-1)
    return out.to(o1.dtype), lse


class ReferencePrimitive:
    """Plain-torch primitive, any dtype (float64 for exact tests). Tensors ``[B, H, N, D]``, lse ``[B, H, N]``."""

    @staticmethod
    def _mask(nq, nk, causal, window, device):
        if not causal:
            return torch.ones(nq, nk, dtype=torch.bool, device=device)
        assert nq == nk, "causal pieces are square (text x text)"
        return build_mask(nq, 0, window, device=device)

    def forward(self, q, k, v, causal, window):
        g = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, g), repeat_kv(v, g)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~self._mask(q.shape[2], k.shape[2], causal, window, q.device), float("-inf"))
        lse = torch.logsumexp(s, -1)
        return torch.exp(s - lse.unsqueeze(-1)) @ v, lse

    def backward(self, dout, q, k, v, out, lse, causal, window):
        # The flash backward in plain torch: probabilities from the given lse, D = rowsum(dO * O) from the given out.
        g = q.shape[1] // k.shape[1]
        kr, vr = repeat_kv(k, g), repeat_kv(v, g)
        scale = 1.0 / math.sqrt(q.shape[-1])
        s = (q @ kr.transpose(-1, -2)) * scale
        s = s.masked_fill(~self._mask(q.shape[2], k.shape[2], causal, window, q.device), float("-inf"))
        p = torch.exp(s - lse.unsqueeze(-1).to(s.dtype))
        dv = p.transpose(-1, -2) @ dout
        ds = p * (dout @ vr.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        dq = (ds @ kr) * scale
        dk = (ds.transpose(-1, -2) @ q) * scale
        return dq, _sum_groups(dk, g), _sum_groups(dv, g)


def _sum_groups(x, g):
    # Gradient of repeat_kv: sum the g query heads that share a key/value head.
    if g == 1:
        return x
    B, H, N, D = x.shape
    return x.view(B, H // g, g, N, D).sum(2)


class CpuFlashPrimitive:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward): returns lse on CPU (docs/distributed.md#what-runs-on-a-cpu).

    It has no window argument, so a windowed causal piece passes an explicit mask: fine for tests, not fast.
    """

    def _args(self, q, k, v, causal, window):
        g = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, g), repeat_kv(v, g)
        if causal and window is not None:
            # The raw op takes an additive mask of q's dtype (the bool conversion lives in F.sdpa, not here).
            keep = build_mask(q.shape[2], 0, window, device=q.device)
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
            return q, k, v, False, mask, g
        return q, k, v, causal, None, g

    def forward(self, q, k, v, causal, window):
        q, k, v, is_causal, mask, _ = self._args(q, k, v, causal, window)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, window):
        q, k, v, is_causal, mask, g = self._args(q, k, v, causal, window)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, is_causal, attn_mask=mask
        )
        return dq, _sum_groups(dk, g), _sum_groups(dv, g)


class FlashAttnPrimitive:
    """flash-attn 2 on CUDA (fp16/bf16, head dim <= 256 and a multiple of 8). Tensors ``[B, H, N, D]`` here,
    ``[B, N, H, D]`` for flash-attn (transposed views, no copy); GQA native; causal with Nq == Nk only."""

    @staticmethod
    def _ws(causal, window):
        return (window - 1, 0) if (causal and window is not None) else (-1, -1)

    def forward(self, q, k, v, causal, window):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        out, lse, _ = flash_attn_func(
            t(q), t(k), t(v), dropout_p=0.0, causal=causal, window_size=self._ws(causal, window),
            return_attn_probs=True,
        )
        return t(out), lse  # lse is [B, H, N] float32

    def backward(self, dout, q, k, v, out, lse, causal, window):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        dq, dk, dv = torch.empty_like(t(q)), torch.empty_like(t(k)), torch.empty_like(t(v))
        left, right = self._ws(causal, window)
        # The private backward's signature changed across flash-attn 2.x (window_size tuple, later split into
        # window_size_left/right; softcap added): pass by name, only what this version accepts.
        fn = _fai._flash_attn_backward
        params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters  # custom_op wraps the python fn
        kw = dict(
            dout=t(dout).contiguous(), q=t(q), k=t(k), v=t(v), out=t(out).contiguous(), softmax_lse=lse,
            dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, causal=causal,
            window_size=(left, right), window_size_left=left, window_size_right=right, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        fn(**{name: val for name, val in kw.items() if name in params})
        return t(dq), t(dk), t(dv)


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_prefix, window, prim):
        P, T = num_prefix, q.shape[2] - num_prefix
        qp, qt, kp, kt, vp, vt = q[:, :, :P], q[:, :, P:], k[:, :, :P], k[:, :, P:], v[:, :, :P], v[:, :, P:]
        outs, saved = [], {}
        if P:
            saved["pp"] = prim.forward(qp, kp, vp, False, None)
            outs.append(saved["pp"][0])
        if T:
            o_t, lse_t = prim.forward(qt, kt, vt, True, window)
            if P:
                o_tp, lse_tp = prim.forward(qt, kp, vp, False, None)
                o_t, lse_t = merge_by_lse(o_tp, lse_tp, o_t, lse_t)
            saved["t"] = (o_t, lse_t)
            outs.append(o_t)
        ctx.args = (P, window, prim, list(saved))
        ctx.save_for_backward(q, k, v, *[x for key in saved for x in saved[key]])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, dout):
        P, window, prim, keys = ctx.args
        q, k, v, *rest = ctx.saved_tensors
        saved = {key: (rest[2 * i], rest[2 * i + 1]) for i, key in enumerate(keys)}
        qp, qt, kp, kt, vp, vt = q[:, :, :P], q[:, :, P:], k[:, :, :P], k[:, :, P:], v[:, :, :P], v[:, :, P:]
        dq_parts, dkp, dvp, dkt, dvt = [], None, None, None, None
        if "pp" in saved:
            o, lse = saved["pp"]
            dqp, dkp, dvp = prim.backward(dout[:, :, :P], qp, kp, vp, o, lse, False, None)
            dq_parts.append(dqp)
        if "t" in saved:
            o, lse = saved["t"]
            dot = dout[:, :, P:]
            dqt, dkt, dvt = prim.backward(dot, qt, kt, vt, o, lse, True, window)
            if P:  # text queries x prefix keys, with the merged (out, lse)
                dq2, dk2, dv2 = prim.backward(dot, qt, kp, vp, o, lse, False, None)
                dqt = dqt + dq2
                dkp, dvp = (dk2, dv2) if dkp is None else (dkp + dk2, dvp + dv2)
            dq_parts.append(dqt)
        cat = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs, dim=2)  # noqa: E731
        dk = cat([x for x in (dkp, dkt) if x is not None])
        dv = cat([x for x in (dvp, dvt) if x is not None])
        return cat(dq_parts), dk, dv, None, None, None


def prefix_attention_from_primitive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int, window: int | None, prim
) -> torch.Tensor:
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]`` from any primitive (see module doc)."""
    return _PrefixAttention.apply(q, k, v, num_prefix, window, prim)


def supports(q: torch.Tensor) -> bool:
    """flash-attn installed, CUDA tensor, fp16/bf16, head dim <= 256 and a multiple of 8."""
    return (
        HAVE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    )


def attention_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_prefix: int = 0, window: int | None = None
) -> torch.Tensor:
    """The flash backend: flash-attn pieces merged by log-sum-exp (CUDA, fp16/bf16)."""
    if not supports(q):
        raise RuntimeError("flash backend needs flash-attn, a CUDA tensor in fp16/bf16 and head dim <= 256, % 8 == 0")
    return prefix_attention_from_primitive(q, k, v, num_prefix, window, FlashAttnPrimitive())
