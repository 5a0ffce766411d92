"""Exact resume with real DataLoader worker processes: 2 workers on each of 2 DP ranks, across an epoch end, and
across DP sizes and worker counts (the order of windows is global)."""
from __future__ import annotations

import json

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.manifest import load_manifest
from memtrain.data.stream import build_stream
from memtrain.data.testing import tiny_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))


def cfg(path: str, **kw) -> DataConfig:
    base = dict(path=path, seq_len=64, batch_size=4, num_workers=2, shuffle_buffer=4, seed=3)
    base.update(kw)
    return DataConfig(**base)


def batches_to_epoch_end(path: str, rank: int) -> int:
    """Batches a rank reads until the stream has started epoch 1 (read without workers: same order)."""
    s = build_stream(cfg(path, num_workers=0), dp_rank=rank, dp_size=2)
    n = 0
    while s.epoch < 1:
        next(s)
        n += 1
    return n


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_two_workers_two_ranks_across_epoch_boundary(ds, rank):
    end = batches_to_epoch_end(ds, rank)
    k, m = end - 6, 12  # save a few batches before the epoch end, read past it
    a = build_stream(cfg(ds), dp_rank=rank, dp_size=2)
    for _ in range(k):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    ref = [next(a) for _ in range(m)]
    assert state["lanes"][0]["epoch"] == 0 and a.epoch >= 1, "the m batches must cross the epoch end"
    a.close()
    b = build_stream(cfg(ds), dp_rank=rank, dp_size=2)
    b.load_state_dict(state)
    got = [next(b) for _ in range(m)]
    b.close()
    for r, g in zip(ref, got):
        assert torch.equal(r.inputs, g.inputs) and torch.equal(r.targets, g.targets)
        assert torch.equal(r.doc_start, g.doc_start)


def test_workers_do_not_change_the_order(ds):
    """Worker k makes micro-batches k, k+2, ...: the batches are the ones read without workers."""
    s = build_stream(cfg(ds), dp_rank=1, dp_size=2)
    got = [next(s) for _ in range(10)]
    s.close()
    plain = build_stream(cfg(ds, num_workers=0), dp_rank=1, dp_size=2)
    for g in got:
        assert torch.equal(g.inputs, next(plain).inputs)


def test_state_from_dp2_with_workers_resumes_at_dp1_without(ds):
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(7):
        for s in two:
            next(s)
    states = [json.loads(json.dumps(s.state_dict())) for s in two]
    assert states[0] == states[1]
    want = [torch.cat([next(s).inputs for s in two]) for _ in range(5)]
    for s in two:
        s.close()
    one = build_stream(cfg(ds, batch_size=8, num_workers=0))
    one.load_state_dict(states[0])
    for w in want:
        assert torch.equal(next(one).inputs, w)


def test_bad_shard_in_a_worker_process_is_one_line_data_error(ds, tmp_path):
    import os
    import shutil

    from memtrain.data.errors import DataError, DataWarning
    copy = str(tmp_path / "copy")
    shutil.copytree(ds, copy)
    name = load_manifest(copy).split("train")[0].file
    with open(os.path.join(copy, name), "r+b") as f:
        f.truncate(1000)
    s = build_stream(DataConfig(path=copy, seq_len=64, batch_size=4, num_workers=2), dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=name) as e:
        for _ in range(200):
            next(s)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    s = build_stream(DataConfig(path=copy, seq_len=64, batch_size=4, num_workers=2, skip_bad_shards=True))
    with pytest.warns(DataWarning, match=name):
        for _ in range(200):
            next(s)
    assert s.skipped_shards >= 1
    s.close()
