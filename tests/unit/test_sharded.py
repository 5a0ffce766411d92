"""memtrain/train/sharded.py in one process: rectangles of fragments, resharding on load, the safe metadata reader."""
from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

from memtrain.train.checkpoint import CheckpointError
from memtrain.train.sharded import Pieces, load_tensors, placement, read_all, read_full, rectangles, save_tensors


def _tp_shard(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return full if dim is None else full.chunk(size, dim=dim)[rank].contiguous()


@pytest.mark.parametrize("shape,dim", [((6, 10), 0), ((6, 10), 1), ((12,), 0), ((4, 3, 5), 0), ((7, 9), None)])
def test_rectangles_of_any_fragment_hold_the_full_tensors_values(shape, dim):
    rng = random.Random(0)
    full = torch.randn(shape, dtype=torch.float64)
    tp = 1 if dim is None else 2
    for rank in range(tp):
        local = _tp_shard(full, dim, rank, tp)
        where = placement(local.shape, dim, rank, tp)
        assert where.shape == tuple(full.shape)
        full2d = full.reshape(where.rows, where.cols)
        flat = local.reshape(-1)
        for _ in range(30):
            start = rng.randrange(flat.numel())
            end = rng.randrange(start + 1, flat.numel() + 1)
            parts = rectangles(flat[start:end].clone(), start, where)
            assert len(parts) <= 3 and sum(v.numel() for _, v in parts) == end - start
            for (r, c), view in parts:
                assert torch.equal(view, full2d[r:r + view.shape[0], c:c + view.shape[1]])


def test_a_middle_dimension_split_is_refused():
    with pytest.raises(CheckpointError, match="only the first or the last dim"):
        placement((2, 3, 4), 1, 0, 2)


def test_saved_fragments_load_into_another_layout_exactly(tmp_path):
    """Saved as two column shards, each in three ZeRO-like fragments; read back as three row shards and whole."""
    full = torch.randn(6, 10, dtype=torch.float64)
    parts = []
    for rank in range(2):
        local = _tp_shard(full, 1, rank, 2)
        where = placement(local.shape, 1, rank, 2)
        flat = local.reshape(-1)
        for a, b in [(0, 7), (7, 19), (19, flat.numel())]:
            parts += rectangles(flat[a:b].clone(), a, where)
    save_tensors(tmp_path / "state", {"model.w": Pieces(where, parts)})
    for rank in range(3):
        target = torch.zeros(2, 10, dtype=torch.float64)
        load_tensors(tmp_path / "state", {"model.w": Pieces.whole(placement(target.shape, 0, rank, 3), target)})
        assert torch.equal(target, full.chunk(3, 0)[rank])
    assert torch.equal(read_all(tmp_path / "state")["model.w"].double(), full.float().double())
    assert read_full(tmp_path / "state", {"w": [6, 10]})["w"].shape == (6, 10)
    with pytest.raises(CheckpointError, match="holds no model.other"):
        load_tensors(tmp_path / "state", {"model.other": Pieces.whole(placement((2,), None), torch.zeros(2))})


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_metadata_file_is_refused_without_running_it(tmp_path):
    save_tensors(tmp_path / "state", {"model.w": Pieces.whole(placement((3,), None), torch.ones(3))})
    marker = tmp_path / "pwned"
    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="refusing to load .*posix.system"):
        read_all(tmp_path / "state")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no .metadata"):
        read_all(tmp_path / "missing")
