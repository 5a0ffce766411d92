"""A memory kind defined outside memtrain, as a user would write one: `plugins = ["tests.e2e.memory_kind_plugin"]`
in a config registers it, and `model.memory = "warmup_meta"` selects it.

The kind is small on purpose: the plain decoder with meta tokens that start at zero (they grow from what the
text needs rather than from noise), trained on half-length sequences for its first two steps (a curriculum the
trainer asks of the spec), not pipelined, and exported with the plain decoder's Hugging Face template (the
architecture at inference is exactly the baseline's).
"""
from __future__ import annotations

import torch

from memtrain.model.memory import MemorySpec, register_memory
from memtrain.model.transformer import DecoderLM

WARMUP_STEPS = 2


class WarmupMetaLM(DecoderLM):
    def __init__(self, cfg, factory=None):
        super().__init__(cfg, factory)
        if self.embed.meta is not None:
            with torch.no_grad():
                self.embed.meta.zero_()


SPEC = register_memory(MemorySpec(
    name="warmup_meta",
    summary="meta tokens that start at zero; half-length sequences for the first steps",
    model=f"{__name__}:WarmupMetaLM",
    tokens_for_step=lambda cfg, step, seq_len: seq_len // 2 if step < WARMUP_STEPS else seq_len,
    pipeline="unsupported",
    hf_memory="none",
    describe=lambda cfg: "Meta tokens initialised at zero (a test kind registered from tests/e2e)",
), replace=True)
