"""What an RMT block keeps for the backward through time: `memtrain plan`'s estimate (docs/planner.md)."""
from __future__ import annotations

import math

from memtrain.model.activations import Shapes, plain
from memtrain.model.config import ModelConfig

STATE_LABEL = "RMT memory tokens"


def layer_elements(cfg: ModelConfig, s: Shapes, mode: str = "none") -> tuple[float, float]:
    """Every segment's pass through the block is kept for the backward through time (one at a time with memory
    replay, plus the memory entering each segment)."""
    r = cfg.rmt
    segments = math.ceil(s.T / r.segment_len)
    n = s.P + 2 * r.num_memory + r.segment_len
    one = plain(s, n, mode)
    if r.memory_replay:  # one segment at a time, plus the memory entering each segment
        return one + segments * r.num_memory * s.D / cfg.n_layers, 0.0
    return segments * one, 0.0


def state_bytes(cfg: ModelConfig, s: Shapes, layers: int, act_bytes: float) -> float:
    """The memory tokens entering each segment."""
    return act_bytes * s.B * cfg.rmt.num_memory * cfg.d_model * math.ceil(s.T / cfg.rmt.segment_len)
