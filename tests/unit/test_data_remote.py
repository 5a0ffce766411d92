"""Shards streamed over HTTP from a real localhost server: the same tokens as from disk, exact resume that opens
no earlier shard, manifests of URLs / brace patterns / pipe: commands, retries, bad and missing shards."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError, DataWarning
from memtrain.data.manifest import load_manifest
from memtrain.data.order import epoch_plan
from memtrain.data.stream import build_stream
from memtrain.data.testing import ShardServer, tiny_dataset


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path / "cache"))  # the remote tokenizer lands here


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    return tiny_dataset(str(tmp_path_factory.getbasetemp()))


@pytest.fixture()
def srv(ds, tmp_path):
    copy = str(tmp_path / "served")
    shutil.copytree(ds, copy)
    with ShardServer(copy) as server:
        server.dir = copy
        yield server


def cfg(path: str, **kw) -> DataConfig:
    base = dict(path=path, seq_len=16, batch_size=3, num_workers=0, shuffle_buffer=5, seed=5, retries=2,
                retry_delay=0.01)
    base.update(kw)
    return DataConfig(**base)


def inputs(stream, n: int) -> list[torch.Tensor]:
    return [next(stream).inputs for _ in range(n)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dp_size", [1, 2])
def test_http_stream_is_token_identical_to_local(ds, srv, dp_size):
    for rank in range(dp_size):
        local = inputs(build_stream(cfg(ds), dp_rank=rank, dp_size=dp_size), 40)
        remote = inputs(build_stream(cfg(srv.url + "manifest.json"), dp_rank=rank, dp_size=dp_size), 40)
        assert same(local, remote)
    assert any(r.endswith(".tar") for r in srv.requests) and "tokenizer.model" in srv.requests


@pytest.mark.parametrize("dp_size", [1, 2])
def test_http_resume_is_exact_and_opens_no_earlier_shard(ds, srv, dp_size):
    k = 200 // dp_size  # deep into the first epoch (about 460 windows), past several shards
    saved = []
    for rank in range(dp_size):
        a = build_stream(cfg(ds), dp_rank=rank, dp_size=dp_size)
        inputs(a, k)
        saved.append((json.loads(json.dumps(a.state_dict())), inputs(a, 10)))
    state = saved[0][0]
    assert all(st == state for st, _ in saved) and state["epoch"] == 0
    m = load_manifest(ds)
    shards = m.split("train")
    plan = epoch_plan(shards, "train", 5, 0, 5, True)
    pos, _ = plan.locate(state["ordinal"] // 5 * 5)  # the shard holding the first document of the block
    assert pos >= 2, "the resume point must lie past some shards for this test to mean anything"
    srv.requests.clear()
    for rank in range(dp_size):
        b = build_stream(cfg(srv.url), dp_rank=rank, dp_size=dp_size)  # the dataset URL, manifest.json implied
        b.load_state_dict(state)
        assert same(inputs(b, 10), saved[rank][1])
    tars = [r for r in srv.requests if r.endswith(".tar")]
    assert tars[0] == shards[plan.order[pos]].file
    earlier = {shards[i].file for i in plan.order[:pos]}
    assert not earlier & set(tars), "resuming must not re-read shards before the resume point"


def test_manifest_of_urls_brace_patterns_and_pipe_commands(ds, srv, tmp_path):
    raw = json.load(open(os.path.join(ds, "manifest.json")))
    train = [s for s in raw["shards"] if s["split"] == "train"]
    rest = [s for s in raw["shards"] if s["split"] != "train"]
    assert len(train) >= 4
    first, second, tail = train[0], train[1], train[2:]
    entries = [dict(first, file=srv.url + first["file"]),
               dict(second, file=f"pipe:cat {os.path.join(ds, second['file'])}"),
               {"file": srv.url + "train-{%s..%s}.tar" % (tail[0]["file"][6:12], tail[-1]["file"][6:12]),
                "split": "train", **{k: [s[k] for s in tail] for k in ("docs", "tokens", "bytes", "sha256")}}]
    raw["shards"] = entries + rest
    raw["tokenizer"]["file"] = srv.url + "tokenizer.model"
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(raw))
    assert [s.file for s in load_manifest(str(out)).split("train")][2:] == [srv.url + s["file"] for s in tail]
    assert same(inputs(build_stream(cfg(str(out))), 60), inputs(build_stream(cfg(ds)), 60))


def test_failed_downloads_are_retried_and_the_stream_is_unchanged(ds, srv):
    shards = load_manifest(ds).split("train")
    name = shards[epoch_plan(shards, "train", 5, 0, 5, True).order[1]].file  # read within the first batches
    srv.fail[name] = 2  # two HTTP 503s, then the file
    assert same(inputs(build_stream(cfg(srv.url, retries=2)), 60), inputs(build_stream(cfg(ds)), 60))
    assert srv.requests.count(name) == 3


def test_a_shard_that_never_downloads_is_one_line_error_or_skipped(ds, srv):
    name = load_manifest(ds).split("train")[1].file
    srv.fail[name] = 1000
    with pytest.raises(DataError, match=f"{name} could not be read after 3 tries") as e:
        inputs(build_stream(cfg(srv.url)), 200)
    assert srv.url in str(e.value) and "\n" not in str(e.value) and "skip_bad_shards" in str(e.value)
    s = build_stream(cfg(srv.url, skip_bad_shards=True))
    with pytest.warns(DataWarning, match=name):
        got = inputs(s, 200)
    assert s.skipped_shards >= 1 and len(got) == 200


def test_checksum_mismatch_is_found_when_the_shard_ends(ds, srv):
    m = load_manifest(ds)
    target = m.split("train")[0]
    raw = json.load(open(os.path.join(srv.dir, "manifest.json")))
    for s in raw["shards"]:
        if s["file"] == target.file:
            s["sha256"] = "0" * 64  # the bytes are fine; the manifest disagrees
    json.dump(raw, open(os.path.join(srv.dir, "manifest.json"), "w"))
    with pytest.raises(DataError, match=f"{target.file} has sha256 .* manifest says 000000000000"):
        inputs(build_stream(cfg(srv.url, shuffle_buffer=0)), 200)
    s = build_stream(cfg(srv.url, shuffle_buffer=0, skip_bad_shards=True))
    with pytest.warns(DataWarning, match="sha256"):
        got = inputs(s, 30)
    # documented semantics: the shard's documents were streamed before its end, so they were used
    assert same(got, inputs(build_stream(cfg(ds, shuffle_buffer=0)), 30))


def test_pipe_command_that_fails_names_the_command(ds, tmp_path):
    raw = json.load(open(os.path.join(ds, "manifest.json")))
    for s in raw["shards"]:
        s["file"] = f"pipe:cat {tmp_path / 'missing'}/{s['file']}"
    raw["tokenizer"]["file"] = os.path.join(ds, raw["tokenizer"]["file"])
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="pipe:cat .*could not be read after 1 tries"):
        inputs(build_stream(cfg(str(tmp_path / "manifest.json"), retries=0)), 5)


def test_unreachable_manifest_url_is_one_line_error(ds):
    with ShardServer(ds) as server:
        url = server.url
    with pytest.raises(DataError, match="manifest .*could not be read after 2 tries.*data.path") as e:
        build_stream(cfg(url + "manifest.json", retries=1))
    assert "\n" not in str(e.value)


def test_workers_stream_over_http_like_in_process(ds, srv):
    got = inputs(build_stream(cfg(srv.url, num_workers=2)), 12)
    assert same(got, inputs(build_stream(cfg(ds)), 12))
