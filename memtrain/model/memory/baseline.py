"""`model.memory = "none"`: the plain decoder (memtrain/model/transformer.py), meta tokens its only memory."""
from __future__ import annotations

from .spec import MemorySpec

SPEC = MemorySpec(
    name="none",
    summary="no memory across segments; the meta tokens (model.num_meta_tokens) are learned, input-independent",
    model="memtrain.model.transformer:DecoderLM",
    plan="memtrain.model.activations",
)
