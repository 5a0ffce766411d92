"""Greedy decoding for stateful models: the prompt in one call, then one call per new token with the state."""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int, state: Any = None) -> tuple[torch.Tensor, Any]:
    """prompt `[B, T0]` -> (prompt + new tokens `[B, T0 + n]`, the state after them).

    `model(tokens, state=...)` must return an LMOutput whose `.state` continues the sequence exactly
    (RMT memory, Titans memory and KV cache). With TP > 1 the last logits are gathered over the vocab slices.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if model.factory.region.active:  # one new token is not a length the TP ranks can split
        raise ValueError("generation needs a model built without sequence parallelism (the weights are the same): "
                         "build it with MegatronFactory(sequence_parallel=False)")
    out = model(prompt, state=state)
    tokens = [prompt]
    for _ in range(max_new_tokens):
        last = out.logits[:, -1:]
        if model.factory.tp_size > 1:
            last = model.factory.gather_logits(last)[..., : model.cfg.vocab_size]
        nxt = last[:, 0].argmax(-1, keepdim=True).to(prompt.dtype)
        tokens.append(nxt)
        out = model(nxt, state=out.state)
    return torch.cat(tokens, dim=1), out.state
