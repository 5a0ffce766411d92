"""Recurrent Memory Transformer (memory = "rmt") of an exported memtrain model (copied verbatim into every export;
plain torch, no project import). Mirrors memtrain's memtrain/model/memory/rmt/model.py.

Text is cut into segments of L tokens; each segment runs through the ordinary decoder layers as

    [meta (P) ; read memory (M) ; segment text (l <= L) ; write memory (M)]

meta and read memory form a prefix every query sees (they see only each other); text is causal (windowed in
windowed layers, or narrowed to `bottleneck_window` in bottleneck mode); write tokens see everything before them
and the write tokens up to themselves. The RMS-normalised write outputs are the next segment's read memory. A
segment that is not full writes nothing and stays pending: the next call reruns it with the new tokens (the
native model does the same), so feeding tokens one by one equals one pass. The attention runs as one dense masked
SDPA call per layer over the N = P + 2M + l positions of a segment.

State: (memory `[B, M, D]`, pending ids `[B, r]`, full segments done).
"""
from __future__ import annotations

import torch
from torch import nn

from .memtrain_layers import rotary_table


def segment_mask(prefix: int, num_text: int, num_write: int, window: int | None, device) -> torch.Tensor:
    """Boolean `[N, N]` visibility for N = prefix + num_text + num_write (query rows, key columns)."""
    N = prefix + num_text + num_write
    i = torch.arange(N, device=device).unsqueeze(1)
    j = torch.arange(N, device=device).unsqueeze(0)
    vis = (j < prefix) | (j <= i)
    if window is not None:  # text queries only: the write tokens always see the whole segment
        text_row = (i >= prefix) & (i < prefix + num_text)
        vis = vis & ~(text_row & (j >= prefix) & (i - j >= window))
    return vis


def text_window(config, layer: int) -> int | None:
    """Window of text queries in `layer`: the layer's own, narrowed to `bottleneck_window` in bottleneck mode."""
    w = config.sliding_window if config.layer_types[layer] == "sliding_attention" else None
    c = config.memory_config
    if c.get("bottleneck"):
        w = c["bottleneck_window"] if w is None else min(w, c["bottleneck_window"])
    return w


def run_segment(model: nn.Module, ids: torch.Tensor, memory: torch.Tensor, segment_index: int, write: bool):
    """ids `[B, l]`, read memory `[B, M, D]` -> (final-normed text hidden states `[B, l, D]`, next memory or None)."""
    config = model.config
    B, l = ids.shape
    P, M = config.num_meta_tokens, config.memory_config["num_memory"]
    x = model.embed_tokens(ids)
    memory = memory.to(x.dtype)
    parts = []
    if model.meta_tokens is not None:
        parts.append(model.meta_tokens.to(x.dtype).unsqueeze(0).expand(B, -1, -1))
    parts += [memory + model.read_slots.to(x.dtype), x]
    if write:
        parts.append(memory + model.write_slots.to(x.dtype))
    h = torch.cat(parts, dim=1)
    num_write = M if write else 0
    c = config.memory_config
    offset = segment_index * c["segment_len"] if c["positions"] == "global" else 0
    cos, sin = rotary_table(P + M, l, num_write, config.head_dim, config.rope_theta, offset, h.device)
    for i, layer in enumerate(model.layers):
        mask = segment_mask(P + M, l, num_write, text_window(config, i), h.device)
        h = layer.forward_masked(h, cos, sin, mask)
    hidden = model.norm(h[:, P + M:P + M + l])
    return hidden, (model.memory_norm(h[:, P + M + l:]) if write else None)


def rmt_forward(model: nn.Module, ids: torch.Tensor, state):
    """ids `[B, n]` (real tokens only), state None or (memory, pending, segments) -> (hidden `[B, n, D]`, state)."""
    L = model.config.memory_config["segment_len"]
    B = ids.shape[0]
    if state is None:
        state = (model.memory_init.unsqueeze(0).expand(B, -1, -1), ids[:, :0], 0)
    memory, pending, segments = state
    r = pending.shape[1]
    seq = torch.cat([pending.to(ids), ids], dim=1) if r else ids
    pieces = list(seq.split(L, dim=1))
    hidden = []
    for s, piece in enumerate(pieces):
        full = piece.shape[1] == L
        h, new_memory = run_segment(model, piece, memory, segments + s, write=full)
        hidden.append(h)
        if full:
            memory = new_memory
    pending = pieces[-1] if pieces[-1].shape[1] < L else seq[:, :0]
    return torch.cat(hidden, dim=1)[:, r:], (memory, pending, segments + seq.shape[1] // L)
