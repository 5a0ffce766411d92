"""`python -m memtrain.train.experiment long_context` end to end on a tiny config, resume included; every preset loads."""
from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "experiments").glob("*.toml"))

TINY = ['variants=["window", "rmt", "lmm"]', 'tasks=["niah_single", "qa1"]', "train_len=64",
        "eval_multiples=[1, 2]", "perf_multiples=[1, 2]", "eval_examples=4", "eval_batch=4", "eval_piece=64",
        "perf_repeats=1", "model.d_model=32", "model.n_layers=1", "model.rmt.segment_len=32",
        "model.titans.segment_len=32", "train.steps=3", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=2", "train.warmup_steps=1", "train.curriculum=[[0, 48], [2, 64]]",
        "train.one_segment_steps=1"]


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
    if "experiment" in tree and "tokens" in tree["experiment"]:  # lm_quality: [experiment] and [train]
        from memtrain.train.experiment.lm_quality import _base_config, load_preset as load_lm_quality
        exp, train_tree = load_lm_quality(preset)
        cfg = _base_config(train_tree, exp, Path(tempfile.mkdtemp()) / "base.toml")
        assert cfg.schedule.steps * cfg.data.seq_len * cfg.data.batch_size >= exp.tokens
    elif "experiment" in tree:  # the registers experiment of memtrain.train.inspect
        from memtrain.train.inspect.experiment import load_preset, write_base_config
        _, train_tree = load_preset(preset)
        write_base_config(train_tree, Path("/dev/null"))
    else:
        from memtrain.train.experiment.config import load_experiment_config
        cfg = load_experiment_config(preset)
        assert cfg.variants and cfg.eval_lengths


LM_TINY = ['experiment.variants=["window", "mag", "rmt"]', "experiment.seeds=[0]", "experiment.jobs=1",
           "experiment.tokens=2048", "experiment.eval_multiples=[1, 2]",
           "experiment.eval_sequences=2", "experiment.eval_piece=64", "experiment.buckets=4", "train.model.d_model=32",
           "train.model.n_layers=1", "train.model.window=16", "train.model.titans.segment_len=32",
           "train.model.rmt.segment_len=32", "train.model.rmt.num_memory=2", "train.data.seq_len=64",
           "train.data.batch_size=4", "train.schedule.warmup_steps=1"]


def run_lm_quality(run_dir: Path, data: Path, *extra: str, out: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "memtrain.train.experiment", "lm_quality", "--config",
            str(ROOT / "configs" / "experiments" / "lm_quality.toml"), "--run-dir", str(run_dir)]
    args += ["--out", str(out)] if out else []
    for s in [*LM_TINY, f'train.data.path="{data}"', *extra]:
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_lm_quality_runs_and_resumes(tiny_dataset, tmp_path):
    """Three variants on the same 2048 tokens, held-out perplexity at 1x and 2x by position; a rerun trains and
    evaluates nothing, a longer evaluation computes only the new cells, other training settings are refused."""
    import json
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = run_lm_quality(run_dir, tiny_dataset)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [(r["variant"], r["seed"], r["multiple"]) for r in rows] == [(v, "0", m) for v in ("window", "mag", "rmt")
                                                                       for m in "12"]
    for r in rows:
        by_position = json.loads(r["by_position"])
        assert len(by_position) == 4 and all(p > 1 for p in by_position)
        assert int(r["train_tokens"]) == 2048 and int(r["length"]) == 64 * int(r["multiple"])
        assert abs(float(r["perplexity"]) - 2.718281828 ** float(r["loss"])) < 1e-2 * float(r["perplexity"])
    assert len({r["parameters"] for r in rows}) == 3  # the memories add their own parameters
    for v in ("window", "mag", "rmt"):
        assert json.loads((run_dir / v / "seed0" / "summary.json").read_text())["steps"] == 8  # 2048 / (4 × 64)
    assert "ppl @ 128 (2×)" in (run_dir / "results.md").read_text()

    mtimes = {v: (run_dir / v / "seed0" / "summary.json").stat().st_mtime for v in ("window", "mag", "rmt")}
    second = run_lm_quality(run_dir, tiny_dataset, "experiment.eval_multiples=[1, 2, 4]", out=out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "training" not in second.stdout and second.stdout.count("perplexity") == 3  # only the 4x cells
    assert mtimes == {v: (run_dir / v / "seed0" / "summary.json").stat().st_mtime for v in mtimes}
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.md", "perplexity.png", "by_position.png"}

    # a second seed, two trainings at once: only seed 1 is trained and evaluated, the table gives mean and range
    third = run_lm_quality(run_dir, tiny_dataset, "experiment.eval_multiples=[1, 2, 4]", "experiment.seeds=[0, 1]",
                           "experiment.jobs=2")
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("training") == 3 and third.stdout.count("(seed 1) at") == 9
    assert "(seed 0)" not in third.stdout and mtimes == {v: (run_dir / v / "seed0" / "summary.json").stat().st_mtime
                                                         for v in mtimes}
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert sorted((r["variant"], r["seed"], r["multiple"]) for r in rows) == sorted(
        (v, s, m) for v in ("window", "mag", "rmt") for s in "01" for m in "124")
    assert len({(r["variant"], r["multiple"], r["loss"]) for r in rows}) == 18  # the seeds differ
    report = (run_dir / "results.md").read_text()
    window = next(line for line in report.splitlines() if line.startswith("| window | "))
    ppl = [float(r["perplexity"]) for r in rows if r["variant"] == "window" and r["multiple"] == "4"]
    assert f"{sum(ppl) / 2:.2f} ({min(ppl):.2f}–{max(ppl):.2f})" in window and window.split(" | ")[2] == "2"

    # the stateful-variant probe reads this run: three readings of the longest text, MAG's memory norms and gates
    probe = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_quality_probe.py"), str(run_dir),
                            "--variant", "mag", "--json", str(tmp_path / "probe.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    (found,) = json.loads((tmp_path / "probe.json").read_text())
    assert found["length"] == 256 and found["slice"] == 64
    assert all(len(found[k]["by_slice"]) == 4 for k in ("carried_piece", "carried_train", "reset_train"))
    assert found["carried_train"]["by_slice"][0] == found["reset_train"]["by_slice"][0]  # same first piece
    assert len(found["memory_norm_after_piece"]) == 4
    gates = found["gates_first_train_piece"]
    assert all(0 < a < 1 for a in gates["alpha"]) and all(0 <= k <= 1 for k in gates["keep_over_train_length"])
    assert all(abs(k ** 64 - t) <= 1e-3 * max(t, 1e-9) + 1e-6
               for k, t in zip(gates["keep_per_token"], gates["keep_over_train_length"]))
    stateless = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_quality_probe.py"), str(run_dir),
                                "--variant", "window"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert stateless.returncode != 0 and "carries no state" in stateless.stderr

    bad = run_lm_quality(run_dir, tiny_dataset, "train.optim.lr=0.5")
    assert bad.returncode == 2 and "other [train] settings" in bad.stderr and bad.stderr.count("\n") == 1
