"""Recurrent Memory Transformer, `model.memory = "rmt"` (docs/rmt.md): model.py, config.py ([model.rmt]), and
its spec below. Its pipeline schedule is memtrain/train/engines/rmt_pipeline.py (stages: memtrain/launch/
rmt_pipeline.py; the memory cycles from the last stage back to the first, which DeepSpeed's schedule cannot
express)."""
from __future__ import annotations

from typing import Any

from ...errors import ModelConfigError
from ..spec import MemorySpec
from .config import RMTConfig, tokens_for_step


def _sequence_rows(cfg, tokens: int) -> list[tuple[int, str]]:
    """A full segment runs meta, read memory, L text and write memory rows; a partial last one has no write rows."""
    P, M, L = cfg.num_meta_tokens, cfg.rmt.num_memory, cfg.rmt.segment_len
    rows = [(P + 2 * M + L, "model.num_meta_tokens + 2 * model.rmt.num_memory + model.rmt.segment_len")]
    if tokens % L:
        rows.append((P + M + tokens % L, "the rows of the partial last segment (data.seq_len is not a multiple of "
                                         "model.rmt.segment_len)"))
    return rows


def _check_run(cfg, parallel: Any, seq_len: int) -> None:
    """Rules of the RMT on a run: a training sequence holds at least one segment (else no memory is written);
    memory replay recomputes segments in one process with its own backward; the RMT pipeline schedule passes
    whole segments and has no ZeRO; a curriculum shortens sequences per step, which CP slices cannot follow."""
    r = cfg.rmt
    if r.segment_len > seq_len:
        raise ModelConfigError(f"model.rmt.segment_len={r.segment_len} is longer than the training sequence "
                               f"data.seq_len={seq_len}")
    if parallel.pp > 1:
        if r.memory_replay:
            raise ModelConfigError(f"model.rmt.memory_replay cannot run with parallel.pp={parallel.pp} (it recomputes "
                                   f"segments on one process): set model.rmt.memory_replay=false or parallel.pp=1")
        if parallel.zero_stage:
            raise ModelConfigError(f"parallel.pp={parallel.pp} with model.memory='rmt' runs memtrain's RMT pipeline "
                                   f"schedule, which has no ZeRO: set parallel.zero_stage=0")
        if parallel.cp > 1:
            raise ModelConfigError(f"parallel.pp={parallel.pp} with parallel.cp={parallel.cp} cannot run model.memory="
                                   f"'rmt' (the RMT pipeline schedule passes whole segments): set parallel.cp=1 or "
                                   f"parallel.pp=1")
    if parallel.cp > 1:
        if r.memory_replay:
            raise ModelConfigError("model.rmt.memory_replay does not run with parallel.cp > 1 yet: "
                                   "set model.rmt.memory_replay=false or parallel.cp=1")
        if r.curriculum:
            raise ModelConfigError("model.rmt.curriculum shortens sequences per step, which CP slices cannot follow: "
                                   "set model.rmt.curriculum=[] or parallel.cp=1")
    if r.memory_replay and parallel.engine == "deepspeed":
        raise ModelConfigError("model.rmt.memory_replay runs its own backward per segment: "
                               "set parallel.engine='torch' (it supports TP and DP)")


def _regions(cfg, n: int) -> dict[str, tuple[int, int]]:
    """[meta (P); read (M); text; write (M, full segments only)] of one segment's pass of n positions."""
    P, M, L = cfg.num_meta_tokens, cfg.rmt.num_memory, cfg.rmt.segment_len
    write = M if n == P + M + L + M else 0
    out = {"meta": (0, P), "read": (P, P + M), "text": (P + M, n - write)}
    if write:
        out["write"] = (n - write, n)
    return out


def _describe(cfg) -> str:
    r = cfg.rmt
    return (f"Recurrent Memory Transformer: {r.num_memory} memory tokens read and written per segment of "
            f"{r.segment_len} text tokens (positions: {r.positions}{', MemBottleneck' if r.bottleneck else ''})"
            f"; `generate()` carries the memory in its cache")


def _top_shapes(cfg) -> dict[str, tuple[int, ...]]:
    M, D = cfg.rmt.num_memory, cfg.d_model
    return {"memory_init": (M, D), "read_slots": (M, D), "write_slots": (M, D), "memory_norm.weight": (D,)}


SPEC = MemorySpec(
    name="rmt",
    summary="Recurrent Memory Transformer: memory tokens read and written per segment, carried to the next one",
    model="memtrain.model.memory.rmt.model:RMTDecoderLM",
    plan="memtrain.model.memory.rmt.plan",
    settings="rmt",
    check=lambda cfg: cfg.rmt.validate(cfg),
    stateful=True,
    tokens_for_step=lambda cfg, step, seq_len: tokens_for_step(cfg.rmt, step, seq_len),
    own_backward=lambda cfg: cfg.rmt.memory_replay,
    segment=lambda cfg: (cfg.rmt.segment_len, "model.rmt.segment_len"),
    # every segment runs meta, read and write rows next to its L text rows
    attention_keys=lambda cfg, layer, seq_len: (cfg.num_meta_tokens + 2 * cfg.rmt.num_memory
                                                + min(cfg.rmt.segment_len, seq_len)),
    positions_per_token=lambda cfg, seq_len: ((cfg.num_meta_tokens + 2 * cfg.rmt.num_memory
                                               + min(cfg.rmt.segment_len, seq_len)) / min(cfg.rmt.segment_len, seq_len)),
    pipeline="own",
    pipeline_engine="memtrain.train.engines.rmt_pipeline:RMTPipelineEngine",
    cp_sequential=lambda cfg: True,
    sequence_rows=_sequence_rows,
    check_run=_check_run,
    top_shapes=_top_shapes,
    regions=_regions,
    describe=_describe,
)

__all__ = ["SPEC", "RMTConfig"]
