"""The global order of windows: the same sequences at every step whatever the DP size, and a state that carries
across DP sizes (dp=2 -> 1 and 1 -> 2) and is JSON."""
from __future__ import annotations

import json

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.stream import build_stream
from memtrain.data.testing import tiny_dataset

B, S = 3, 16


@pytest.fixture(scope="session")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))


def cfg(path: str, batch_size: int = B, **kw) -> DataConfig:
    base = dict(path=path, seq_len=S, batch_size=batch_size, num_workers=0, shuffle_buffer=5, seed=11)
    base.update(kw)
    return DataConfig(**base)


def rows(batch) -> list[tuple[int, ...]]:
    """A micro-batch's windows (inputs plus the last target), as hashable rows."""
    full = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def dp2_step(streams) -> list[tuple[int, ...]]:
    return [w for s in streams for w in rows(next(s))]


def test_dp2_and_dp1_with_double_batch_see_the_same_windows_every_step(ds):
    one = build_stream(cfg(ds, 2 * B))
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    steps = 0
    while one.epoch < 1 or steps < 5:  # until a few steps past the end of the first epoch
        assert sorted(dp2_step(two)) == sorted(rows(next(one)))
        steps += 1
    assert 5 < steps < 400


def test_dp1_with_double_grad_accum_sees_the_same_windows_per_step(ds):
    one = build_stream(cfg(ds))  # batch B, two micro-batches per optimizer step
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(20):
        assert sorted(dp2_step(two)) == sorted(rows(next(one)) + rows(next(one)))


@pytest.mark.parametrize("k", [3, 37])
def test_state_saved_at_dp2_resumes_at_dp1(ds, k):
    ref = build_stream(cfg(ds, 2 * B))  # the uninterrupted run, at dp=1
    for _ in range(k):
        next(ref)
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(k):
        dp2_step(two)
    states = [json.loads(json.dumps(s.state_dict())) for s in two]
    assert states[0] == states[1], "every DP rank saves the same global position"
    assert states[0]["windows"] == k * 2 * B
    for batch_size, accum in ((2 * B, 1), (B, 2)):
        resumed = build_stream(cfg(ds, batch_size))
        resumed.load_state_dict(states[0])
        check = build_stream(cfg(ds, 2 * B))
        check.load_state_dict(ref.state_dict())
        for _ in range(15):
            got = [w for _ in range(accum) for w in rows(next(resumed))]
            assert got == rows(next(check))


def test_state_saved_at_dp1_resumes_at_dp2(ds):
    one = build_stream(cfg(ds, 2 * B))
    for _ in range(29):
        next(one)
    state = json.loads(json.dumps(one.state_dict()))
    ref = [rows(next(one)) for _ in range(15)]
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    for want in ref:
        assert dp2_step(two) == want


def test_state_is_small_json_of_ints_and_strings(ds):
    s = build_stream(cfg(ds))
    for _ in range(5):
        next(s)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    flat = ([v for v in state.values() if not isinstance(v, (dict, list))] + list(state["fingerprint"].values())
            + [v for lane in state["lanes"] for v in lane.values()])
    assert all(isinstance(v, (int, str)) for v in flat) and len(json.dumps(state)) < 400


def test_val_split_position_carries_across_dp_sizes(ds):
    a = build_stream(cfg(ds, 2 * B), split="val")
    next(a)
    st = a.state_dict()
    want = rows(next(a))
    two = [build_stream(cfg(ds), dp_rank=r, dp_size=2, split="val") for r in range(2)]
    for s in two:
        s.load_state_dict(st)
    assert dp2_step(two) == want
