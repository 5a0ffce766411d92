"""The RMT's pipeline stages (`model.memory = "rmt"`, `parallel.pp > 1`): which blocks and parameters each
stage holds. The schedule that trains them is memtrain/train/engines/rmt_pipeline.py.

Stages: stage p holds n // pp + (p < n % pp) consecutive blocks (the split DeepSpeed's "type:" partition gives
the other models); stage 0 also `embed` (tokens, meta), `memory_init`, `read_slots`, `write_slots`; the last
stage `head`, `memory_norm` and, with tied embeddings, `embed.tokens.weight`, whose gradient is summed with
stage 0's over megatron's embedding group (first + last stage) so both copies stay identical. Every rank builds
the whole model (same seed: the single-process weights); the parameters of other stages are not used, updated
or counted. Peers are rank ± tp·dp (same tp_rank, dp_rank): under TP each rank sends its replicated h to its
counterpart.
"""
from __future__ import annotations

from torch import nn

FIRST_STAGE = ("embed.", "memory_init", "read_slots", "write_slots")
LAST_STAGE = ("head.", "memory_norm.")


def stage_blocks(n_layers: int, pp: int, stage: int) -> range:
    """Blocks of `stage`: n // pp each, the first n % pp stages one more (DeepSpeed's split of the blocks)."""
    start = stage * (n_layers // pp) + min(stage, n_layers % pp)
    return range(start, start + n_layers // pp + (stage < n_layers % pp))


def stage_parameters(model: nn.Module, pp: int, stage: int) -> dict[str, nn.Parameter]:
    """The parameters `stage` uses, under RMTDecoderLM names (the tied token embedding on first and last)."""
    blocks = stage_blocks(model.cfg.n_layers, pp, stage)
    tied = model.cfg.tie_embeddings
    named = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            mine = int(name.split(".")[1]) in blocks
        elif name.startswith(FIRST_STAGE):
            mine = stage == 0 or (tied and stage == pp - 1 and name == "embed.tokens.weight")
        elif name.startswith(LAST_STAGE):
            mine = stage == pp - 1
        else:  # a new parameter must be placed here, not silently left untrained
            raise RuntimeError(f"RMT pipeline: no stage for parameter {name!r} (place it in FIRST_STAGE or "
                               f"LAST_STAGE of memtrain/launch/rmt_pipeline.py)")
        if mine:
            named[name] = p
    return named
