"""The layer factory: the one seam through which tensor parallelism enters the model.

Every layer whose weights may be split across tensor-parallel ranks is made by a factory, never by
`nn.Linear` directly. `LayerFactory` below makes plain single-device layers; `memtrain.launch.tensor_parallel`
supplies a factory of megatron-core layers with the same contract, so the model code is identical at
TP = 1 and TP > 1 and names no process group.

Contract (shapes for inputs `[..., in]`):
- `column(in, out)`: output `[..., out / tp]`, this rank's slice of the output features.
- `row(in, out)`: input `[..., in / tp]` (a column layer's output), output `[..., out]`, summed over ranks.
- `embedding(vocab, dim)`: ids `[B, T]` -> `[B, T, dim]`, full on every rank (vocab rows are split).
- `lm_head(dim, vocab, tied)`: `[..., dim]` -> logits `[..., vocab / tp]` over this rank's vocab slice.
- `cross_entropy(logits, targets)`: per-token loss `[B, T]` from (possibly vocab-sharded) logits.
- `vocab_range(vocab)`: the global ids `[start, end)` whose logits this rank holds.

Under sequence parallelism (`factory.region`, Megatron-LM's SP) the residual stream between tensor-parallel regions
holds only this rank's rows `[B, N / tp, D]`. A layer the caller runs inside such a region is asked for with
`sequence_parallel=True`: a column layer's input then comes from `region.enter` (which sums its input gradient, so the
layer does not), a row layer's output is this rank's partial sum, handed to `region.exit`. Without sequence
parallelism the flag changes nothing and `region` is the identity.

The factory also carries `sequence`, the seam for context parallelism: a `SequenceOps` object the model asks
for everything that crosses the sequence dimension (attention over earlier positions, memory state handed
from one slice of the sequence to the next). The default below is single-device (this process holds the
whole sequence); `memtrain.launch.context_parallel.ContextParallel` answers the same calls across CP ranks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memtrain.kernels.attention import attention


class _TiedHead(nn.Module):
    """Output head that reuses an embedding's weight `[vocab, dim]` (no parameters of its own)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        # A plain attribute, not a submodule: the weight belongs to the embedding and is saved there once.
        self.__dict__["embedding"] = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)


class SequenceOps:
    """Sequence-dimension operations for a process that holds the whole sequence (context parallel size 1).

    Under context parallelism (memtrain/launch/context_parallel.py) each of the `size` ranks holds a contiguous slice of
    the text (rank `rank` holds text positions rank·T_local .. (rank+1)·T_local − 1) and the same prefix; these
    methods then communicate. The model calls them and never names a process group.
    """

    size: int = 1
    rank: int = 0

    def text_offset(self, local_len: int) -> int:
        """Global position of this process's first text token when it holds `local_len` text tokens."""
        return 0

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_prefix: int,
                  window: int | None, backend: str) -> torch.Tensor:
        """Prefix + causal (+ window) attention (docs/attention.md) over this process's positions.

        q `[B, Hq, P + T, Dh]`, k/v `[B, Hkv, P + T, Dh]` (rotary already applied) -> `[B, Hq, P + T, Dh]`.
        """
        return attention(q, k, v, num_prefix=num_prefix, window=window, backend=backend)

    def halo(self, x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """The `n` positions along `dim` that precede this process's first one, held by the previous CP rank
        (e.g. a causal conv's tail); here (and on CP rank 0) there are none: `x` narrowed to 0 positions."""
        return x.narrow(dim, 0, 0)

    def handoff_in(self, state, *, differentiable: bool = True):
        """The state entering this process's slice: `state` itself here (the sequence's initial state).

        `state`: a tensor or nested tuple of tensors. Under CP, ranks > 0 receive the previous rank's final
        state instead (same structure and shapes as `state`).
        """
        return state

    def handoff_out(self, out: torch.Tensor, state, *, differentiable: bool = True) -> torch.Tensor:
        """Hand this slice's final `state` to the next slice; returns `out` (under CP, tied to the hand-off so
        the next rank's gradient of the state flows back through this rank's backward)."""
        return out

    def linear_memory(self, q, k, v, theta, eta, alpha, *, chunk_size: int, state=None, chunk_offset: int = 0,
                      backend: str = "auto"):
        """Titans linear memory over this process's tokens (shapes of `memtrain.kernels.titans.linear_memory`);
        `state` and `chunk_offset` are those of the whole sequence's start (under CP: on every rank).
        Returns (y `[B, H, T, Dv]`, state after this process's tokens (W, S, W_anchor))."""
        from memtrain.kernels.titans import linear_memory
        return linear_memory(q, k, v, theta, eta, alpha, chunk_size=chunk_size, state=state,
                             chunk_offset=chunk_offset, backend=backend)

    def deep_memory(self, q, k, v, theta, eta, alpha, *, chunk_size: int, state, chunk_offset: int = 0,
                    act: str = "gelu", backend: str = "auto"):
        """Titans deep memory over this process's tokens (shapes of `memtrain.kernels.titans.deep_memory`); `state` and
        `chunk_offset` as in `linear_memory`. Returns (y `[B, H, T, Dv]`, state (weights, momenta, anchor))."""
        from memtrain.kernels.titans import deep_memory
        return deep_memory(q, k, v, theta, eta, alpha, chunk_size=chunk_size, state=state,
                           chunk_offset=chunk_offset, act=act, backend=backend)


class RegionOps:
    """How activations enter and leave tensor-parallel regions; without sequence parallelism every call is the identity.

    Under sequence parallelism (memtrain/launch/tensor_parallel.py, `SequenceParallelRegion`) the N rows of the
    residual stream `[B, N, D]` (meta tokens included) are split into `tp` contiguous pieces, rank r holding rows
    r·N/tp .. (r+1)·N/tp − 1; the methods below then communicate over the TP group.
    """

    active: bool = False
    size: int = 1

    def local_rows(self, rows: int) -> int:
        """How many of a sequence's `rows` positions this rank holds between regions."""
        return rows

    def scatter(self, h: torch.Tensor) -> torch.Tensor:
        """A replicated `[B, N, D]` (the same on every TP rank) -> this rank's rows `[B, N / tp, D]`."""
        return h

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's rows -> the replicated `[B, N, D]`, for code that consumes it the same way on every rank."""
        return h

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows -> `[B, N, D]`, the input of `sequence_parallel=True` column layers (their input
        gradients are partial sums: the backward of this call reduces them)."""
        return x

    def narrow(self, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of an `enter` output, `x[:, start:stop]`, still feeding sequence-parallel column layers
        as `enter`'s output does (slice there, not elsewhere)."""
        return x[:, start:stop]

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums `[B, N, D]` of `sequence_parallel=True` row layers -> this rank's rows of their sum."""
        return y

    def sum_grad(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as used on this rank's rows only (e.g. a norm's gain): its gradient is summed over the TP ranks."""
        return weight


class LayerFactory:
    """Single-device layers (TP = 1)."""

    tp_size: int = 1
    tp_rank: int = 0
    region: RegionOps = RegionOps()
    """Sequence parallelism between tensor-parallel regions (identity unless the factory is sequence parallel)."""
    sequence: SequenceOps = SequenceOps()
    """Set to a `memtrain.launch.context_parallel.ContextParallel` on an instance for context parallelism."""
    holds: Callable[[str], bool] | None = None
    """Which top-level parts ("embed", "blocks.{i}", "head") this process builds with storage; the others are
    built on the meta device (shapes only). None: all of them. A pipeline stage sets it to its own parts."""

    def column(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
               sequence_parallel: bool = False) -> nn.Module:
        return _init(nn.Linear(in_features, out_features, bias=bias, device="meta"), std)

    def row(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
            sequence_parallel: bool = False) -> nn.Module:
        return _init(nn.Linear(in_features, out_features, bias=bias, device="meta"), std)

    def embedding(self, vocab: int, dim: int, *, std: float) -> nn.Module:
        return _init(nn.Embedding(vocab, dim, device="meta"), std)

    def lm_head(self, dim: int, vocab: int, *, std: float, tied: nn.Module | None = None) -> nn.Module:
        """Input from `region.enter` (a sequence-parallel column layer)."""
        if tied is not None:
            return _TiedHead(tied)
        return self.column(dim, vocab, std=std, sequence_parallel=True)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token loss `[B, T]` from logits `[B, T, V]` in fp32 (bf16 softmax loses digits)."""
        return F.cross_entropy(upcast_for_softmax(logits).flatten(0, -2), targets.flatten(), reduction="none").view(
            targets.shape
        )

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        return 0, vocab

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's slice (identity at TP = 1)."""
        return logits


def _init(layer: nn.Module, std: float) -> nn.Module:
    """Allocate a meta-device layer and draw its weight with one normal_ over the full matrix.

    Built on the meta device so torch's default init draws nothing: the default generator is consumed
    exactly as megatron-core's CPU initialisation consumes it (one draw per full weight, in order), and a
    TP > 1 run with the same seed starts from the same full weights as a TP = 1 run.
    """
    # the default device is "meta" while a part this process does not hold is built (`build_parts`): shapes only
    layer = layer.to_empty(device=torch.get_default_device())
    nn.init.normal_(layer.weight, std=std)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def upcast_for_softmax(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax (bf16/fp16 lose digits); fp64 stays fp64 for exact tests."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
