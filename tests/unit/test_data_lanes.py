"""Data lanes (`data.lanes`, docs/data.md "Lanes"): each DP rank and worker reads only its lanes' shards, the
windows of every optimizer step still do not depend on dp / batch split / workers, and the merged state resumes
exactly at any DP size."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError
from memtrain.data.manifest import load_manifest
from memtrain.data.stream import Piece, build_stream, merge_states, rank_pieces
from memtrain.data.testing import ShardServer, tiny_dataset

B, S = 3, 16


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))  # 13 train shards


def cfg(path: str, batch_size: int = B, **kw) -> DataConfig:
    base = dict(path=path, seq_len=S, batch_size=batch_size, num_workers=0, shuffle_buffer=5, seed=11, lanes=3)
    base.update(kw)
    return DataConfig(**base)


def rows(batch) -> list[tuple[int, ...]]:
    full = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def step(streams) -> list[tuple[int, ...]]:
    return [w for s in streams for w in rows(next(s))]


def test_rank_pieces_cover_every_row_once():
    assert rank_pieces(3, 0, 2, 3) == [Piece(0, 0, 2, 0), Piece(1, 0, 1, 1)]
    assert rank_pieces(3, 1, 2, 3) == [Piece(1, 1, 1, 0), Piece(2, 0, 2, 0)]
    assert rank_pieces(2, 1, 4, 2) == [Piece(0, 2, 2, 0)]  # two ranks share lane 0
    assert rank_pieces(4, 0, 1, 1) == [Piece(0, 0, 4, 0)]  # one lane: the job's one stream
    for b, dp, lanes in ((6, 2, 4), (5, 3, 15), (4, 4, 2), (8, 2, 16)):
        per_lane = b * dp // lanes
        seen = Counter((p.lane, p.before + i) for r in range(dp) for p in rank_pieces(b, r, dp, lanes)
                       for i in range(p.rows))
        assert sorted(seen) == [(lane, i) for lane in range(lanes) for i in range(per_lane)]
        assert set(seen.values()) == {1}


def test_lanes_read_disjoint_shards_and_the_same_windows_whatever_the_split(ds):
    """dp=2 (batch 3), dp=1 (batch 6) and dp=1 (batch 3, two micro-batches) see the same windows every step,
    past every lane's epoch end; the windows differ from the one-lane order."""
    one = build_stream(cfg(ds, 2 * B))
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    accum = build_stream(cfg(ds))
    single_lane = build_stream(cfg(ds, 2 * B, lanes=1))
    steps, differ = 0, 0
    while one.epoch < 1 or steps < 5:
        want = rows(next(one))
        assert sorted(step(two)) == sorted(want)
        assert sorted(rows(next(accum)) + rows(next(accum))) == sorted(want)
        differ += sorted(rows(next(single_lane))) != sorted(want)
        steps += 1
    assert 5 < steps < 400 and differ > 0


@pytest.mark.parametrize("workers,lanes", [(2, 4), (2, 3)])  # W divides the rank's lanes, and it does not
def test_workers_make_the_same_batches(ds, workers, lanes):
    ref = build_stream(cfg(ds, lanes, lanes=lanes))
    got = build_stream(cfg(ds, lanes, lanes=lanes, num_workers=workers, prefetch_batches=2))
    for _ in range(40):
        assert torch.equal(next(got).inputs, next(ref).inputs)
    st = json.loads(json.dumps(got.state_dict()))
    assert st == ref.state_dict()
    again = build_stream(cfg(ds, lanes, lanes=lanes, num_workers=workers))
    again.load_state_dict(st)
    for _ in range(10):
        assert torch.equal(next(again).inputs, next(ref).inputs)


@pytest.mark.parametrize("k", [4, 41])
def test_merged_state_of_dp2_resumes_exactly_at_dp1_and_dp2(ds, k):
    ref = build_stream(cfg(ds, 2 * B))
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(k):
        next(ref)
        step(two)
    parts = [json.loads(json.dumps(s.state_dict())) for s in two]
    assert [lane is None for lane in parts[0]["lanes"]] == [False, False, True]  # rank 0 reads lanes 0 and 1
    merged = merge_states(parts + parts[:1])  # a tensor-parallel peer's copy changes nothing
    assert merged == ref.state_dict() and merged["windows"] == k * 2 * B
    want = [rows(next(ref)) for _ in range(12)]
    resumed_one = build_stream(cfg(ds, 2 * B))
    resumed_one.load_state_dict(merged)
    resumed_two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for s in resumed_two:
        s.load_state_dict(merged)
    for w in want:
        assert rows(next(resumed_one)) == w
        assert step(resumed_two) == w


def test_bad_lane_settings_and_states_are_one_line_errors(ds):
    with pytest.raises(DataError, match=r"data.lanes = 4 must .* divide .* = 6") as e:
        build_stream(cfg(ds, lanes=4), dp_size=2)
    with pytest.raises(DataError, match=r"data.lanes = 14 but split 'train' .* has 13 shards"):
        build_stream(cfg(ds, 14, lanes=14))
    build_stream(cfg(ds, 7, lanes=7), split="val")  # val has 2 shards and is read in one lane
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    step(two)
    fresh = build_stream(cfg(ds, 2 * B))
    with pytest.raises(DataError, match=r"lacks the position of lanes \[2\].*merge_states") as e:
        fresh.load_state_dict(two[0].state_dict())
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"lanes: saved 3, now 2.*lanes"):
        build_stream(cfg(ds, 2 * B, lanes=2)).load_state_dict(two[0].state_dict())


def test_one_lane_state_of_the_previous_format_still_loads(ds):
    a = build_stream(cfg(ds, lanes=1))
    for _ in range(9):
        next(a)
    st = a.state_dict()
    old = {"version": 2, "fingerprint": {k: v for k, v in st["fingerprint"].items() if k != "lanes"},
           "windows": st["windows"], **st["lanes"][0]}
    b = build_stream(cfg(ds, lanes=1))
    b.load_state_dict(old)
    for _ in range(5):
        assert torch.equal(next(b).inputs, next(a).inputs)


def test_each_shard_is_downloaded_by_one_rank(ds):
    """Over HTTP at dp=2: one lane per rank downloads each shard once in the epoch, one lane twice."""
    train = [s.file for s in load_manifest(ds).split("train")]
    for lanes, copies in ((2, 1), (1, 2)):
        fetched = Counter()
        with ShardServer(ds) as srv:
            for rank in range(2):
                srv.requests.clear()
                s = build_stream(cfg(srv.url, 2, lanes=lanes), dp_rank=rank, dp_size=2)
                while s.epoch == 0:
                    next(s)
                mine = [r for r in srv.requests if r.endswith(".tar")]
                own = train[rank::2] if lanes == 2 else train
                assert set(mine) == set(own), "a rank downloads exactly its lanes' shards"
                fetched.update(set(mine))
        assert set(fetched.values()) == {copies} and len(fetched) == len(train)


def test_ranks_sharing_a_lane_report_the_same_cursor_at_every_step(ds):
    """Rank 0 ends its part of lane 1 with a skip, rank 1 with a read: where a document or the lane's epoch ends
    on that boundary both must still name one position (else merging fails at that checkpoint)."""
    two = [build_stream(cfg(ds, seq_len=4), dp_rank=r, dp_size=2) for r in range(2)]
    one = build_stream(cfg(ds, 2 * B, seq_len=4))
    for m in range(7000):  # long enough to cross such boundaries (first at 6633 before the fix)
        step(two)
        next(one)
        if m % 50 == 0 or m > 6600:
            assert merge_states([s.state_dict() for s in two]) == one.state_dict(), m


def test_merge_refuses_states_of_different_jobs_or_steps(ds):
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    step(two)
    a = two[0].state_dict()
    step(two)
    with pytest.raises(DataError, match="differ in windows"):
        merge_states([a, two[1].state_dict()])
    with pytest.raises(DataError, match="one or more data stream states"):
        merge_states([])


def test_a_lane_whose_only_shard_is_bad_names_the_lane(ds, tmp_path):
    import shutil
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    bad = load_manifest(str(copy)).split("train")[4].file
    (copy / bad).write_bytes((copy / bad).read_bytes()[:100])
    s = build_stream(cfg(str(copy), 13, lanes=13, skip_bad_shards=True))
    with pytest.raises(DataError, match=f"data lane 4 of 13 .*{bad}.*lower data.lanes") as e:
        next(s)
    assert "\n" not in str(e.value)
