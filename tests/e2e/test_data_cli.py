"""The data CLIs as a user runs them: the stdlib corpus end to end, and one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_stdlib_prepare_verify_and_stream(tmp_path):
    out = str(tmp_path / "stdlib")
    p = run("memtrain.data.prepare", "--source", "stdlib", "--out", out, "--max-files", "40", "--vocab-size", "1024",
            "--shard-tokens", "20000", "--val-every", "10", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "prepared" in p.stdout and "vocab 1024 uint16" in p.stdout
    v = run("memtrain.data.verify", out)
    assert v.returncode == 0 and "0 bad" in v.stdout, v.stderr

    from memtrain.data.config import DataConfig
    from memtrain.data.stream import build_stream
    s = build_stream(DataConfig(path=out, seq_len=64, batch_size=2))
    b = next(s)
    assert b.inputs.shape == (2, 64) and s.vocab_size == 1024
    assert next(build_stream(DataConfig(path=out, seq_len=64, batch_size=2), split="val")).inputs.shape == (2, 64)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_prepare_glob_matching_nothing_exits_2(tmp_path):
    assert_one_line_error(run("memtrain.data.prepare", "--input", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "o")),
                          "none*.txt", "matches no files")


def test_verify_missing_dataset_exits_2_naming_prepare(tmp_path):
    assert_one_line_error(run("memtrain.data.verify", str(tmp_path / "absent")),
                          "python -m memtrain.data.prepare --source stdlib --out")


def test_verify_bad_shard_exits_1_naming_it(tmp_path):
    from memtrain.data.testing import tiny_dataset
    ds = tiny_dataset(str(tmp_path))
    with open(os.path.join(ds, "train-000002.tar"), "r+b") as f:
        f.truncate(100)
    p = run("memtrain.data.verify", ds)
    assert p.returncode == 1 and "BAD train-000002.tar" in p.stderr and "1 bad" in p.stdout


def test_verify_a_dataset_served_over_http(tmp_path, monkeypatch):
    from memtrain.data.testing import ShardServer, tiny_dataset
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path / "cache"))
    ds = tiny_dataset(str(tmp_path))
    with ShardServer(ds) as srv:
        v = run("memtrain.data.verify", srv.url + "manifest.json")
    assert v.returncode == 0 and "0 bad" in v.stdout, v.stderr
