"""`python -m memtrain.train.experiment long_context` end to end on a tiny config, resume included; every preset loads."""
from __future__ import annotations

import csv
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "experiments").glob("*.toml"))

TINY = ['variants=["window", "rmt", "lmm"]', 'tasks=["niah_single", "qa1"]', "train_len=64",
        "eval_multiples=[1, 2]", "perf_multiples=[1, 2]", "eval_examples=4", "eval_batch=4", "eval_piece=64",
        "perf_repeats=1", "model.d_model=32", "model.n_layers=1", "model.rmt.segment_len=32",
        "model.titans.segment_len=32", "train.steps=3", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=2", "train.warmup_steps=1", "train.curriculum=[[0, 48], [2, 64]]"]


def run(run_dir: Path, *extra: str, out: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "memtrain.train.experiment", "long_context", "--config",
            str(ROOT / "configs" / "experiments" / "long_context.toml"), "--run-dir", str(run_dir)]
    args += ["--out", str(out)] if out else []
    for s in TINY + list(extra):
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_long_context_runs_and_resumes(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = run(run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    # 3 variants × (2 tasks × 2 lengths + 2 perf lengths)
    assert len(rows) == 3 * (2 * 2 + 2)
    acc = [r for r in rows if r["task"] != "perf"]
    assert all(int(r["total"]) == 4 and 0 <= float(r["accuracy"]) <= 1 for r in acc)
    assert {r["length"] for r in rows} == {"64", "128"}
    perf = [r for r in rows if r["task"] == "perf"]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["peak_mib"]) >= 0 for r in perf)
    for name in ("results.md", "accuracy.png", "perf.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "chance 6.2%" in (run_dir / "results.md").read_text()
    assert "rmt step 3/3" in first.stdout and "accuracy" in first.stdout  # progress is shown
    for v in ("window", "rmt", "lmm"):
        assert (run_dir / "variants" / v / "train.pt").is_file()

    # Second invocation: nothing trained, no cell recomputed; --out copies the report.
    second = run(run_dir, out=out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "done: 0 cells computed" in second.stdout and "step " not in second.stdout
    assert len(list(csv.DictReader((run_dir / "results.csv").open()))) == len(rows)
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.md", "accuracy.png", "perf.png"}

    # A longer evaluation reuses the trained variants and computes only the new cells.
    third = run(run_dir, "eval_multiples=[1, 2, 4]")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "done: 6 cells computed" in third.stdout and "step " not in third.stdout

    # Other training settings in the same run directory are refused with one line.
    bad = run(run_dir, "train.steps=5")
    assert bad.returncode == 2 and "trained with other settings (train)" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_experiment_preset_loads(preset):
    tree = tomllib.loads(preset.read_text())
    if "experiment" in tree:  # the registers experiment of memtrain.train.inspect
        from memtrain.train.inspect.experiment import load_preset, write_base_config
        _, train_tree = load_preset(preset)
        write_base_config(train_tree, Path("/dev/null"))
    else:
        from memtrain.train.experiment.config import load_experiment_config
        cfg = load_experiment_config(preset)
        assert cfg.variants and cfg.eval_lengths
