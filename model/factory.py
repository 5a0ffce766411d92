"""The layer factory: the one seam through which tensor parallelism enters the model.

Every layer whose weights may be split across tensor-parallel ranks is made by a factory, never by
`nn.Linear` directly. `LayerFactory` below makes plain single-device layers; `launch.tensor_parallel`
supplies a factory of megatron-core layers with the same contract, so the model code is identical at
TP = 1 and TP > 1 and names no process group.

Contract (shapes for inputs `[..., in]`):
- `column(in, out)`: output `[..., out / tp]`, this rank's slice of the output features.
- `row(in, out)`: input `[..., in / tp]` (a column layer's output), output `[..., out]`, summed over ranks.
- `embedding(vocab, dim)`: ids `[B, T]` -> `[B, T, dim]`, full on every rank (vocab rows are split).
- `lm_head(dim, vocab, tied)`: `[..., dim]` -> logits `[..., vocab / tp]` over this rank's vocab slice.
- `cross_entropy(logits, targets)`: per-token loss `[B, T]` from (possibly vocab-sharded) logits.
- `vocab_range(vocab)`: the global ids `[start, end)` whose logits this rank holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _TiedHead(nn.Module):
    """Output head that reuses an embedding's weight `[vocab, dim]` (no parameters of its own)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        # A plain attribute, not a submodule: the weight belongs to the embedding and is saved there once.
        self.__dict__["embedding"] = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)


class LayerFactory:
    """Single-device layers (TP = 1)."""

    tp_size: int = 1
    tp_rank: int = 0

    def column(self, in_features: int, out_features: int, *, std: float, bias: bool = False) -> nn.Module:
        return _init(nn.Linear(in_features, out_features, bias=bias, device="meta"), std)

    def row(self, in_features: int, out_features: int, *, std: float, bias: bool = False) -> nn.Module:
        return _init(nn.Linear(in_features, out_features, bias=bias, device="meta"), std)

    def embedding(self, vocab: int, dim: int, *, std: float) -> nn.Module:
        return _init(nn.Embedding(vocab, dim, device="meta"), std)

    def lm_head(self, dim: int, vocab: int, *, std: float, tied: nn.Module | None = None) -> nn.Module:
        if tied is not None:
            return _TiedHead(tied)
        return self.column(dim, vocab, std=std)

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
    layer = layer.to_empty(device="cpu")
    nn.init.normal_(layer.weight, std=std)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def upcast_for_softmax(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax (bf16/fp16 lose digits); fp64 stays fp64 for exact tests."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
