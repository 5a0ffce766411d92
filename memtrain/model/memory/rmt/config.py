"""Configuration of the Recurrent Memory Transformer (`model.memory = "rmt"`), section [model.rmt].

Also the curriculum schedule as pure functions (no torch), so the trainer can ask how many segments a step
trains on without building anything: `segments_for_step(curriculum, step)` and `tokens_for_step(...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import ModelConfigError

if TYPE_CHECKING:  # only for the annotation: config.py imports this module
    from ...config import ModelConfig

POSITION_MODES = ("segment", "global")


@dataclass
class RMTConfig:
    segment_len: int = 128
    """Text tokens per segment L."""

    num_memory: int = 8
    """Memory tokens M per segment (read and write slots each)."""

    bptt_segments: int = -1
    """Memory transitions the gradient may pass through, counted back from the last segment of a call (k); older
    memory is detached. -1 = full backpropagation through time; 0 = every segment is trained on its own."""

    bottleneck: bool = False
    """MemBottleneck mode: text sees the meta tokens, the read memory and only a causal window of
    `bottleneck_window` text tokens in every layer; everything longer-range must pass through memory."""

    bottleneck_window: int = 1
    """Text tokens (itself included) a text token sees in bottleneck mode; 1 = only itself."""

    positions: str = "segment"
    """Rotary positions of text: "segment" restarts at 0 in every segment (every segment looks alike, so a model
    trained on a few segments reads any number of them); "global" continues across segments."""

    curriculum: list[list[int]] = field(default_factory=list)
    """Segments per training sample by step, as [step, segments] pairs with increasing steps starting at 0,
    e.g. [[0, 1], [100, 2], [200, 4]]; empty = every segment of the sequence from the start."""

    memory_replay: bool = False
    """Memory replay backpropagation: a forward pass storing only the memory states, then segment-by-segment
    recomputation in reverse; activation memory of one segment, gradients equal to plain backpropagation."""

    def validate(self, model_cfg: ModelConfig) -> None:
        """Check these values against the model section; raises ModelConfigError naming `model.rmt.<key>`."""
        L, M = self.segment_len, self.num_memory
        if L < 1:
            raise ModelConfigError(f"model.rmt.segment_len must be >= 1, got {L}")
        if M < 1:
            raise ModelConfigError(
                f"model.rmt.num_memory must be >= 1, got {M} (no memory tokens carry nothing across segments; "
                f"use model.memory = \"none\" for the plain model)")
        if L > model_cfg.max_seq_len:
            raise ModelConfigError(
                f"model.rmt.segment_len={L} is longer than the sequence the model takes "
                f"(model.max_seq_len={model_cfg.max_seq_len})")
        if self.bptt_segments < -1:
            raise ModelConfigError(
                f"model.rmt.bptt_segments must be -1 (full) or >= 0, got {self.bptt_segments}")
        if self.bottleneck and not 1 <= self.bottleneck_window <= L:
            raise ModelConfigError(
                f"model.rmt.bottleneck_window must lie in [1, model.rmt.segment_len={L}], "
                f"got {self.bottleneck_window}")
        if self.positions not in POSITION_MODES:
            raise ModelConfigError(
                f"model.rmt.positions={self.positions!r} is not one of {', '.join(POSITION_MODES)}")
        check_curriculum(self.curriculum)
        if self.curriculum:
            most = max(n for _, n in self.curriculum)
            if most * L > model_cfg.max_seq_len:
                raise ModelConfigError(
                    f"model.rmt.curriculum asks for {most} segments of {L} tokens, longer than "
                    f"model.max_seq_len={model_cfg.max_seq_len}")


def check_curriculum(curriculum: list[list[int]]) -> None:
    """Raise ModelConfigError unless `curriculum` is [] or [[0, n0], [s1, n1], ...] with s increasing, n >= 1."""
    last = -1
    for i, entry in enumerate(curriculum):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in entry)):
            raise ModelConfigError(f"model.rmt.curriculum[{i}] must be a pair [step, segments], got {entry!r}")
        step, segments = entry
        if i == 0 and step != 0:
            raise ModelConfigError(f"model.rmt.curriculum must start at step 0, got {step}")
        if step <= last:
            raise ModelConfigError(
                f"model.rmt.curriculum steps must increase, got {step} after {last} at entry {i}")
        if segments < 1:
            raise ModelConfigError(f"model.rmt.curriculum[{i}] has {segments} segments; must be >= 1")
        last = step


def segments_for_step(curriculum: list[list[int]], step: int) -> int:
    """Segments per training sample at optimizer step `step` (0-based): the entry with the largest start <= step.

    `curriculum` = [[0, 1], [100, 2], [200, 4]] gives 1 for steps 0-99, 2 for 100-199, 4 from 200 on.
    Raises ValueError for an empty or malformed curriculum or a negative step (an empty curriculum means
    "no schedule": use `tokens_for_step`, which handles it).
    """
    if not curriculum:
        raise ValueError("empty curriculum: there is no schedule to look up (model.rmt.curriculum = [])")
    check_curriculum(curriculum)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    segments = curriculum[0][1]
    for start, n in curriculum:
        if start > step:
            break
        segments = n
    return segments


def tokens_for_step(cfg: RMTConfig, step: int, seq_len: int) -> int:
    """Tokens of each training sample to keep at `step`: min(seq_len, segments × L), or seq_len without a
    curriculum. The trainer truncates inputs and targets `[B, seq_len]` to `[:, :tokens_for_step(...)]`."""
    if not cfg.curriculum:
        return seq_len
    return min(seq_len, segments_for_step(cfg.curriculum, step) * cfg.segment_len)
