"""The packed stream: the trainer contract, packing and document starts, epoch coverage, DP split, resume."""
from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError
from memtrain.data.manifest import load_manifest
from memtrain.data.shards import read_shard
from memtrain.data.stream import build_stream
from memtrain.data.testing import tiny_dataset

EOS = 2


@pytest.fixture(scope="session")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))


def cfg(path: str, **kw) -> DataConfig:
    base = dict(path=path, seq_len=16, batch_size=3, num_workers=0, shuffle_buffer=5, seed=7)
    base.update(kw)
    return DataConfig(**base)


def flat_inputs(stream, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bs = [next(stream) for _ in range(n)]
    return (torch.cat([b.inputs.flatten() for b in bs]), torch.cat([b.targets.flatten() for b in bs]),
            torch.cat([b.doc_start.flatten() for b in bs]))


def all_docs(path: str, split: str = "train") -> list[tuple[int, ...]]:
    m = load_manifest(path)
    return [tuple(s.tokens.tolist()) for sh in m.split(split) for s in read_shard(m.path(sh))]


def split_docs(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in tokens.tolist():
        if t == EOS:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_contract_shapes_dtypes_and_metadata(ds):
    s = build_stream(cfg(ds), dp_rank=0, dp_size=1, split="train")
    b = next(iter(s))
    assert b.inputs.shape == b.targets.shape == b.doc_start.shape == (3, 16)
    assert b.inputs.dtype == b.targets.dtype == torch.long and b.doc_start.dtype == torch.bool
    assert s.vocab_size == 320 and s.eos_id == EOS
    assert int(b.inputs.max()) < s.vocab_size
    pickle.loads(pickle.dumps(s.state_dict()))


def test_targets_shift_and_doc_start_marks_positions_after_eos(ds):
    x, y, start = flat_inputs(build_stream(cfg(ds)), 60)
    assert torch.equal(y[:-1], x[1:]), "windows overlap by one token: each target is the next input"
    expected = torch.zeros_like(start)
    expected[0] = True
    expected[1:] = x[:-1] == EOS
    assert torch.equal(start, expected)
    assert int(start.sum()) > 5


def test_one_epoch_reads_every_train_document_once(ds):
    docs = all_docs(ds)
    n_tokens = sum(len(d) + 1 for d in docs)
    s = build_stream(cfg(ds, shuffle_buffer=4))
    x, _, _ = flat_inputs(s, n_tokens // (3 * 16) + 2)
    seen = split_docs(x)[: len(docs)]
    assert Counter(seen) == Counter(docs)
    assert seen != docs, "shard order and the shuffle buffer must change the order"


def test_epochs_differ_and_seed_changes_order(ds):
    docs = all_docs(ds)
    n = len(docs)
    x, _, _ = flat_inputs(build_stream(cfg(ds)), 2 * sum(len(d) + 1 for d in docs) // 48 + 4)
    got = split_docs(x)
    assert Counter(got[n:2 * n]) == Counter(docs) and got[:n] != got[n:2 * n]
    other, _, _ = flat_inputs(build_stream(cfg(ds, seed=8)), 5)
    assert not torch.equal(other, x[: len(other)])


def test_dp_ranks_split_each_global_micro_batch_into_row_blocks(ds):
    """DP rank r takes rows [r*B, (r+1)*B) of the job's micro-batch: together the ranks read one stream."""
    one = build_stream(cfg(ds, batch_size=6))
    ranks = [build_stream(cfg(ds), dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(30):
        whole = next(one)
        parts = [next(s) for s in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert torch.equal(torch.cat([p.doc_start for p in parts]), whole.doc_start)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_val_split_is_held_out_and_fixed(ds):
    val = build_stream(cfg(ds), split="val")
    x, _, _ = flat_inputs(val, 8)
    assert set(split_docs(x)) <= set(all_docs(ds, "val"))
    assert not set(all_docs(ds, "val")) & set(all_docs(ds, "train"))
    x2, _, _ = flat_inputs(build_stream(cfg(ds), split="val"), 8)
    assert torch.equal(x, x2)


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_resume_in_process_is_bit_exact(ds, shuffle_buffer):
    c = cfg(ds, shuffle_buffer=shuffle_buffer)
    a = build_stream(c)
    for _ in range(37):  # past the first epoch (about 25 batches of 48 tokens)
        next(a)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    ref = [next(a) for _ in range(40)]
    b = build_stream(c)
    b.load_state_dict(state)
    for r, g in zip(ref, (next(b) for _ in range(40))):
        assert torch.equal(r.inputs, g.inputs) and torch.equal(r.targets, g.targets)
        assert torch.equal(r.doc_start, g.doc_start)


def test_state_from_other_settings_is_refused(ds):
    a = build_stream(cfg(ds))
    next(a)
    with pytest.raises(DataError, match="seq_len"):
        build_stream(cfg(ds, seq_len=8)).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="shuffle_buffer"):
        build_stream(cfg(ds, shuffle_buffer=6)).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="split"):
        build_stream(cfg(ds), split="val").load_state_dict(a.state_dict())
    # the position is global: other DP sizes, batch sizes and worker counts take it
    build_stream(cfg(ds, batch_size=5, num_workers=2), dp_rank=1, dp_size=2).load_state_dict(a.state_dict())


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError, match=r"python -m memtrain.data\.prepare --source stdlib --out .*nope"):
        build_stream(cfg(str(tmp_path / "nope")))


def test_no_val_split_names_the_fix(tmp_path_factory):
    path = tiny_dataset(str(tmp_path_factory.getbasetemp()), "noval", val_every=0)
    with pytest.raises(DataError, match="--val-every"):
        build_stream(cfg(path), split="val")


@pytest.mark.parametrize("kw,msg", [({"seq_len": 0}, "seq_len"), ({"batch_size": 0}, "batch_size"),
                                    ({"num_workers": -1}, "num_workers")])
def test_bad_config_is_a_data_error(ds, kw, msg):
    with pytest.raises(DataError, match=msg):
        build_stream(cfg(ds, **kw))


def test_many_dp_ranks_on_a_small_split_share_its_windows(ds):
    """No rank runs dry however many there are: every rank walks the same stream and takes its rows."""
    streams = [build_stream(cfg(ds, batch_size=1), dp_rank=r, dp_size=64, split="val") for r in range(0, 64, 21)]
    rows = [next(s).inputs for s in streams]
    one = build_stream(cfg(ds, batch_size=64), split="val")
    whole = next(one).inputs
    for r, got in zip(range(0, 64, 21), rows):
        assert torch.equal(got[0], whole[r])
