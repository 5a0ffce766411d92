"""Titans gates θ (step size), η (momentum) and α (forgetting) along the text, captured by hooks.

Each `TitansBlock` has a `memory` (memtrain/model/memory/titans/memory.py) whose `gates` column layer gives, per token and memory
head, θ, η, α = memory.gate_values(gates(x)), `[B, n, H, 3]`. A forward hook on that layer keeps its outputs; the model
code is untouched. MAG / MAL / LMM blocks call the memory first on the P meta positions (when P > 0), then on the
text; MAC blocks call it once per segment on the text's attention outputs. The text calls are joined along n.
"""
from __future__ import annotations

import torch

from .load import InspectError

GATE_NAMES = ("theta", "eta", "alpha")


@torch.no_grad()
def titans_gates(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `ids` `[B, T]`; returns {"theta", "eta", "alpha"}: `[L, B, H, T]` gate values in [0, 1] along the text."""
    blocks = list(model.blocks)
    if not all(hasattr(b, "memory") and hasattr(b.memory, "gates") for b in blocks):
        raise InspectError("this Titans model's blocks have no memory.gates layer: gates are not available for it")
    calls: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, output, i=i, memory=block.memory):
            calls[i].append(memory.gate_values(output.detach().float()))  # [B, n, H, 3]
        handles.append(block.memory.gates.register_forward_hook(hook))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    P, T = model.cfg.num_meta_tokens, ids.shape[1]
    per_layer = []
    for i, block in enumerate(blocks):
        text_calls = calls[i][1:] if block.meta_memory_call else calls[i]
        g = torch.cat(text_calls, dim=1) if text_calls else None  # [B, T, H, 3]
        if g is None or g.shape[1] != T:
            raise InspectError(f"could not line up block {i}'s gate calls with the {T} text tokens "
                               f"(model.memory={model.cfg.memory}): gates not available for this model yet")
        per_layer.append(g.permute(3, 0, 2, 1))  # [3, B, H, T]
    stacked = torch.stack(per_layer, dim=1)  # [3, L, B, H, T]
    return {name: stacked[j] for j, name in enumerate(GATE_NAMES)}
