"""CP = 2 (two gloo ranks, each holding half of every sequence) reproduces the single-process Titans models.

Checked for LMM (linear memory: affine maps composed across ranks, chunk grid not aligned to the slices), MAG
(deep memory handed rank to rank, windowed attention through the halo), MAL (linear memory, a window wider than
a slice: gathered keys) and MAC (linear and deep memory: the memory and conv tail handed rank to rank between
whole segments): logits, the objective and every parameter's gradient against one process over the sequence.
Gradients of replicated parameters are summed over the CP ranks (fp64: a linear functional of the logits) or
averaged (fp32: the mean loss).
"""
from __future__ import annotations

import functools

import pytest
import torch

from tests.dist.spawn import run_ranks
from tests.dist.test_context_parallel import B, T, TOL, compare_with_single_process

BASE = dict(vocab_size=50, vocab_pad_multiple=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24,
            max_seq_len=32, attention_backend="auto")
CASES = {
    # linear memory, chunk 3: the slices start at text offsets 0 and 8 after 2 meta tokens -> chunk offsets 2, 1
    "lmm_linear": dict(memory="lmm", num_meta_tokens=2, titans=dict(chunk_size=3)),
    # deep memory (rank to rank) and a window through the halo (W - 1 = 3 <= 8 tokens per rank), GQA
    "mag_deep": dict(memory="mag", num_meta_tokens=1, window=4, n_kv_heads=1,
                     titans=dict(chunk_size=4, memory_depth=2)),
    # linear memory, no meta tokens, a window wider than a slice (keys gathered from rank 0)
    "mal_linear": dict(memory="mal", num_meta_tokens=0, window=12, titans=dict(chunk_size=4)),
    # MAC: 2 segments per rank, chunk grid not aligned to the segments, no conv (only the memory is handed on)
    "mac_linear": dict(memory="mac", num_meta_tokens=2, titans=dict(segment_len=4, chunk_size=3, conv_size=0)),
    "mac_deep": dict(memory="mac", num_meta_tokens=1, titans=dict(segment_len=8, chunk_size=3, memory_depth=2)),
}


def _config(case: str):
    from memtrain.model import ModelConfig
    from memtrain.model.memory.titans.config import TitansConfig
    kw = {**BASE, **CASES[case]}
    # θ 0.1 (default 0.001): the memory moves enough that a wrong hand-off shows in fp32 too
    kw["titans"] = TitansConfig(**{"memory_heads": 2, "conv_size": 4, "theta_init": 0.1, **kw["titans"]})
    return ModelConfig(**kw)


def _rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from memtrain.launch.context_parallel import ContextParallel
    return compare_with_single_process(ContextParallel(dist.group.WORLD), CASES, _config, world)


@functools.lru_cache(maxsize=1)
def _results() -> list[dict]:
    return run_ranks(_rank, 2)


@pytest.mark.slow
def test_cp2_titans_models_match_single_process():
    for rank, res in enumerate(_results()):
        assert set(res) == {(c, str(d)) for c in CASES for d in (torch.float64, torch.float32)}
        for key, r in res.items():
            tol = r["tol"]
            assert not r["missing"], (rank, key, r)  # every parameter gets a gradient in the reference
            assert r["logits"] < tol, (rank, key, r)
            assert r["objective"] < tol * max(1.0, r["scale"]), (rank, key, r)
            assert r["grads"] < tol, (rank, key, r)


def test_cp_titans_layout_errors():
    from memtrain.launch.config import LayoutError
    from memtrain.launch.context_parallel import check_context_parallel

    for case in CASES:  # the parity cases themselves are accepted
        check_context_parallel(_config(case), T, 2)
    bad = [
        (lambda: check_context_parallel(_config("mac_deep"), 24, 2), "model.titans.segment_len=8"),
        (lambda: check_context_parallel(_config("lmm_linear"), 4, 2), "model.titans.conv_size"),
    ]
    for call, needle in bad:
        with pytest.raises(LayoutError, match=needle.replace(".", r"\.")) as info:
            call()
        assert "\n" not in str(info.value)
