"""Exact resume with real DataLoader worker processes: 2 workers on each of 2 DP ranks, across an epoch end."""
from __future__ import annotations

import pickle

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.manifest import load_manifest
from memtrain.data.reader import SlotReader
from memtrain.data.stream import build_stream
from memtrain.data.testing import tiny_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))


def cfg(path: str) -> DataConfig:
    return DataConfig(path=path, seq_len=64, batch_size=4, num_workers=2, shuffle_buffer=4, seed=3)


def batches_to_epoch_end(path: str, rank: int) -> int:
    """Batches a rank reads until every one of its workers has started epoch 1."""
    s = build_stream(cfg(path), dp_rank=rank, dp_size=2)
    n = 0
    while not all(w["epoch"] >= 1 for w in s.state_dict()["workers"]):
        next(s)
        n += 1
    s.close()
    return n


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_two_workers_two_ranks_across_epoch_boundary(ds, rank):
    end = batches_to_epoch_end(ds, rank)
    k, m = end - 6, 12  # save a few batches before the epoch end, read past it
    a = build_stream(cfg(ds), dp_rank=rank, dp_size=2)
    for _ in range(k):
        next(a)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    ref = [next(a) for _ in range(m)]
    assert any(w["epoch"] == 0 for w in state["workers"])
    assert all(w["epoch"] >= 1 for w in a.state_dict()["workers"]), "the m batches must cross the epoch end"
    a.close()
    b = build_stream(cfg(ds), dp_rank=rank, dp_size=2)
    b.load_state_dict(state)
    got = [next(b) for _ in range(m)]
    b.close()
    for r, g in zip(ref, got):
        assert torch.equal(r.inputs, g.inputs) and torch.equal(r.targets, g.targets)
        assert torch.equal(r.doc_start, g.doc_start)


def test_worker_batches_interleave_round_robin(ds):
    """Batch n of a rank is batch n // 2 of its logical worker n % 2 (slot rank * 2 + worker)."""
    c = cfg(ds)
    s = build_stream(c, dp_rank=1, dp_size=2)
    got = [next(s) for _ in range(10)]
    s.close()
    m = load_manifest(ds)
    readers = [SlotReader(m, "train", 2 + w, 4, seq_len=64, batch_size=4, seed=3, shuffle_buffer=4, shuffle=True,
                          skip_bad=False, eos_id=2) for w in range(2)]
    for n, g in enumerate(got):
        inputs, _, _ = readers[n % 2].next_batch()
        assert torch.equal(g.inputs, torch.from_numpy(inputs))


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
