"""Shards streamed over HTTP from a real localhost server: the same tokens as from disk, exact resume that opens
no earlier shard, manifests of URLs / brace patterns / pipe: commands, retries, bad and missing shards, and a
stalled source that does not stall training while prefetched batches remain."""
from __future__ import annotations

import functools
import json
import os
import shutil
import threading

import pytest
import torch

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError, DataWarning
from memtrain.data.manifest import load_manifest
from memtrain.data.order import epoch_plan
from memtrain.data.shards import read_shard
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
        _add_hold(server)
        try:
            yield server
        finally:
            server.release.set()  # never leave a handler thread (or a DataLoader worker) waiting


def _add_hold(server: ShardServer) -> None:
    """Requests for the names in `server.hold` get no answer until `server.release` is set (a stalled source);
    `server.held` lists them as they arrive, and `server.arrived` is notified for each."""
    server.hold, server.held = set(), []
    server.release, server.arrived = threading.Event(), threading.Condition()
    base = server._httpd.RequestHandlerClass  # functools.partial(ShardServer's handler, directory=...)

    class Holding(base.func):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/").split("?")[0]
            if name in server.hold and not server.release.is_set():
                with server.arrived:
                    server.held.append(name)
                    server.arrived.notify_all()
                server.release.wait()
            super().do_GET()

    server._httpd.RequestHandlerClass = functools.partial(Holding, *base.args, **base.keywords)


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
    assert all(st == state for st, _ in saved) and state["lanes"][0]["epoch"] == 0
    m = load_manifest(ds)
    shards = m.split("train")
    plan = epoch_plan(shards, "train", 5, 0, 5, True)
    pos, _ = plan.locate(state["lanes"][0]["ordinal"] // 5 * 5)  # the shard holding the first document of the block
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


WATCHDOG_S = 60.0  # not a performance bound: only what turns a stalled stream into a failure instead of a hang


def guarded(fn, what: str, release: threading.Event):
    """`fn()` in a thread; fail the test if it has not returned after WATCHDOG_S (releasing the held source so
    the stuck reader and the process can end)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WATCHDOG_S)
    if t.is_alive():
        release.set()
        pytest.fail(f"{what} blocked for {WATCHDOG_S:.0f} s: the stream stalled although its data was there")
    if "error" in box:
        raise box["error"]
    return box["value"]


def to_epoch_end(stream, release: threading.Event, what: str) -> list:
    """Batches up to and including the last one holding tokens of the stream's current epoch."""
    out, epoch = [], stream.epoch
    while stream.epoch == epoch:
        out.append(guarded(lambda: next(stream), f"{what} batch {len(out)}", release))
    return out


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
                                    for f in ("inputs", "targets", "doc_start"))


def test_stalled_source_does_not_stall_prefetched_batches_and_changes_nothing(ds, srv):
    workers, prefetch = 2, 3
    c = cfg(srv.url, num_workers=workers, prefetch_batches=prefetch)
    per_batch = c.batch_size * c.seq_len  # tokens a micro-batch moves the stream on (dp_size 1)
    unstalled = build_stream(c)
    reference = to_epoch_end(unstalled, srv.release, "unstalled reference")
    unstalled.close()  # its workers are joined: no request below is theirs

    # Hold every shard after the first shuffle block's: from then on no worker gets a byte of a new shard.
    m = load_manifest(ds)
    shards = m.split("train")
    plan = epoch_plan(shards, "train", c.seed, 0, c.shuffle_buffer, True)
    cut = next(p for p, start in enumerate(plan.starts) if start >= plan.block)
    held = {shards[i].file for i in plan.order[cut:]}
    # What the downloaded shards cover: a block is read whole, so the first window that needs a held document
    # starts the first block holding one, and a batch is made once its last target (the token after it) is read.
    first_held_block = plan.starts[cut] // plan.block
    lengths = [len(s.tokens) for i in plan.order[:cut] for s in read_shard(m.path(shards[i]))]
    covered = sum(n + 1 for n in lengths[:first_held_block * plan.block] if n)  # + EOS; empty docs are skipped
    ready = (covered - 1) // per_batch  # batches 0 .. ready-1 need no held byte
    assert ready >= workers * prefetch, "the unheld data must cover more than the prefetch depth to mean anything"
    srv.fail.update({name: 10 ** 6 for name in held})  # cross-check: a reader without the held shards stops there
    alone = build_stream(cfg(srv.url, retries=0))
    for i in range(ready):
        guarded(lambda: next(alone), f"in-process batch {i}", srv.release)
    with pytest.raises(DataError, match="could not be read after 1 tries"):
        next(alone)
    srv.fail.clear()

    srv.hold, srv.requests[:] = held, []

    stream = build_stream(c)
    got = [guarded(lambda: next(stream), f"batch {i} (source not stalled yet)", srv.release)
           for i in range(ready - workers * (prefetch - 1))]
    # The DataLoader has now asked every worker for a batch past `ready`: each one opens a held shard and stalls.
    with srv.arrived:
        assert srv.arrived.wait_for(lambda: len(srv.held) >= workers, WATCHDOG_S), \
            f"only {len(srv.held)} of {workers} workers reached the held shard"
    assert not srv.release.is_set() and not srv.hold & set(srv.requests), "no byte of a held shard was served"
    # Every worker is blocked on the source; what is left of `ready` comes from the prefetch buffer.
    got += [guarded(lambda: next(stream), f"prefetched batch {i} while every worker stalled", srv.release)
            for i in range(len(got), ready)]
    assert not srv.release.is_set() and len(srv.held) == workers and not srv.hold & set(srv.requests)
    state = json.loads(json.dumps(stream.state_dict()))  # saved mid-stall
    assert state["windows"] == ready * c.batch_size
    assert same_batches(got, reference[:ready])

    srv.release.set()  # the source recovers: the rest of the epoch, and the same tokens as without the stall
    got += to_epoch_end(stream, srv.release, "after the stall")
    assert same_batches(got, reference)
    resumed = build_stream(c)
    resumed.load_state_dict(state)
    assert same_batches(to_epoch_end(resumed, srv.release, "resumed"), reference[ready:])
