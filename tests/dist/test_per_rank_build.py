"""Ranks build only their part: at TP 2 x PP 2 each of 4 ranks builds its pipeline stage's layers, TP-sharded, and
the rest of the model as shapes on the meta device (`LayerFactory.holds`, `memtrain.launch.pipeline.stage_parts`).
The peak resident memory of building is about a quarter of building the whole model in one process."""
from __future__ import annotations

import os
import threading
import time

import pytest

from tests.dist.spawn import run_ranks

MODEL = dict(vocab_size=512, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=256, num_meta_tokens=4,
             window=64, global_layers=[-1], tie_embeddings=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_while(build) -> tuple[object, int]:
    """(build(), peak resident bytes above the level before it), RSS sampled every millisecond."""
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        out = build()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0], _rss()) - before


def _exact_rss() -> None:
    """Large blocks straight from mmap and back to the OS when freed: without this, glibc keeps freed heap (here
    megatron-core's full-size master weight of each layer, cut to this rank's shard) and the resident size then
    counts memory the build no longer uses."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)


def _build(rank: int, world: int, tp: int, pp: int) -> dict:
    import torch
    from megatron.core import parallel_state

    from memtrain.launch.pipeline import stage_parts
    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import LayerFactory, ModelConfig, build_model
    _exact_rss()
    torch.manual_seed(0)
    factory = LayerFactory()
    if world > 1:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        factory = MegatronFactory()
        factory.holds = stage_parts(ModelConfig(**MODEL), pp, parallel_state.get_pipeline_model_parallel_rank()).__contains__
    model, peak = _peak_while(lambda: build_model(ModelConfig(**MODEL), factory))
    held = sum(p.numel() for p in model.parameters() if not p.is_meta)
    meta = sum(p.numel() for p in model.parameters() if p.is_meta)
    return {"peak": peak, "held": held, "meta": meta}


@pytest.mark.slow
def test_each_of_four_ranks_builds_about_a_quarter():
    (whole,) = run_ranks(_build, 1, 1, 1)
    ranks = run_ranks(_build, 4, 2, 2)
    assert whole["meta"] == 0
    for r in ranks:
        assert r["meta"] > 0  # the other stage's layers exist as shapes only
        assert r["held"] < 0.3 * whole["held"], (r, whole)
        assert r["peak"] < 0.4 * whole["peak"], (r, whole)  # a quarter, plus one full layer while megatron cuts it
    per_rank = ", ".join(f"{r['peak'] / 2**20:.1f}" for r in ranks)
    print(f"peak build memory: whole {whole['peak'] / 2**20:.1f} MiB, per rank at TP 2 x PP 2 {per_rank} MiB")
