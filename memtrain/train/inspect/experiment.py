"""The registers experiment: one tiny model trained with several meta-token counts, each inspected.

    python -m memtrain.train.inspect registers-experiment --config configs/experiments/registers.toml \
        --run-dir runs/registers --out docs/results/registers

The preset has two tables: `[experiment]` (meta_tokens = [0, 1, 4, 16], k, inspect_windows) and `[train]`, a full
training config (the keys of configs/*.toml). Every variant is trained by a `python -m memtrain.train` subprocess with
`--set model.num_meta_tokens=P` into RUN_DIR/meta_PP (same seed, data order and steps for all), evaluated on the val
split at the end (`logging.eval_every = schedule.steps`), then inspected by the `registers` command on the first
`inspect_windows` val windows (decoded to RUN_DIR/val_text.txt). A variant whose summary.json shows all steps done
is not trained again (rerunning resumes). OUT gets results.md / results.json, a comparison plot and, per variant,
the registers table and plots.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

from ..configtree import ConfigError, read_toml
from .load import InspectError

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENT_KEYS = {"meta_tokens", "k", "inspect_windows"}


def load_preset(path: Path) -> tuple[dict, dict]:
    """(experiment table, train config tree) of a preset file; InspectError for a missing or malformed one."""
    try:
        tree = read_toml(path, what="experiment preset", where="configs/experiments/")
    except ConfigError as e:
        raise InspectError(str(e)) from None
    exp, train = tree.get("experiment"), tree.get("train")
    if not isinstance(exp, dict) or not isinstance(train, dict) or set(tree) - {"experiment", "train"}:
        raise InspectError(f"{path} must hold exactly the tables [experiment] and [train]")
    if set(exp) - EXPERIMENT_KEYS:
        raise InspectError(f"{path}: unknown [experiment] keys {sorted(set(exp) - EXPERIMENT_KEYS)}")
    metas = exp.get("meta_tokens")
    if not isinstance(metas, list) or not metas or not all(isinstance(m, int) and m >= 0 for m in metas):
        raise InspectError(f"{path}: experiment.meta_tokens must be a list of ints >= 0, got {metas!r}")
    return {"meta_tokens": metas, "k": float(exp.get("k", 10.0)),
            "inspect_windows": int(exp.get("inspect_windows", 8))}, train


def write_base_config(train_tree: dict, path: Path):
    """Validate the [train] table as a trainer Config and write it as a config file `python -m memtrain.train` reads."""
    from memtrain.train.config import Config
    from memtrain.train.configtree import ConfigError, build, to_toml
    try:
        cfg = build(Config, json.loads(json.dumps(train_tree)))
        cfg.logging.eval_every = cfg.schedule.steps  # validation loss once, at the end of every run
        cfg.validate()
    except (ConfigError, ValueError) as e:
        raise InspectError(f"the [train] table of the preset is not a valid config: {e}") from None
    path.write_text(to_toml(cfg))
    return cfg


def val_text(cfg, windows: int, path: Path) -> None:
    """Decode the first `windows` + 1 val-split windows of `data.seq_len` tokens into `path` (the text inspected;
    one window more than needed, since re-encoding the decoded text can give a few tokens fewer)."""
    from memtrain.data.stream import build_stream
    from memtrain.data.tokenizer import Tokenizer
    stream = iter(build_stream(cfg.data, split="val"))
    rows = []
    while len(rows) < windows + 1:
        rows += [r.tolist() for r in next(stream).inputs]
    from memtrain.data.manifest import load_manifest
    tok = Tokenizer(load_manifest(cfg.data.path).tokenizer_path)  # a local directory or a manifest URL
    path.write_text("".join(tok.decode(r) for r in rows[: windows + 1]))


def train_variant(base: Path, run: Path, meta: int, steps: int) -> dict:
    """Train one variant (skipped when its summary shows `steps` steps); returns its summary.json."""
    summary = run / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done.get("steps") == steps and not done.get("interrupted") and done.get("eval_loss") is not None:
            return done
    cmd = [sys.executable, "-m", "memtrain.train", "--config", str(base), "--set", f"model.num_meta_tokens={meta}",
           "--set", "logging.progress=false", "--run-dir", str(run), "--resume", "auto"]
    print(f"[registers] training {meta} meta tokens: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InspectError(f"training {run} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    print(f"[registers]   done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary.read_text())


def run_experiment(preset: Path, run_dir: Path, out: Path) -> Path:
    """Train, inspect and summarise every variant of the preset; returns OUT/results.md."""
    from . import plots
    from .__main__ import run_registers
    from .registers import Row
    exp, train_tree = load_preset(preset)
    run_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_base_config(train_tree, run_dir / "base.toml")
    text = run_dir / "val_text.txt"
    if not text.is_file():
        val_text(cfg, exp["inspect_windows"], text)
    results, reports, t0 = [], [], time.perf_counter()
    for meta in exp["meta_tokens"]:
        name = f"meta_{meta:02d}"
        summary = train_variant(run_dir / "base.toml", run_dir / name, meta, cfg.schedule.steps)
        args = Namespace(checkpoint=str(run_dir / name), text=str(text), out=str(run_dir / name / "registers"),
                         seq_len=0, tokenizer=None, k=exp["k"], max_windows=exp["inspect_windows"])
        run_registers(args)
        rep = json.loads((run_dir / name / "registers" / "registers.json").read_text())
        for f in ("registers.md", "norms.png", "attention_share.png"):
            (out / name).mkdir(exist_ok=True)
            shutil.copyfile(run_dir / name / "registers" / f, out / name / f)
        # training wall time: config.toml is written when the Trainer starts, summary.json when it ends
        secs = (run_dir / name / "summary.json").stat().st_mtime - (run_dir / name / "config.toml").stat().st_mtime
        results.append({"meta_tokens": meta, "val_loss": summary["eval_loss"], "train_loss_last10": summary[
            "last10_loss"], "train_seconds": round(secs, 1), "rows": rep["rows"], "num_windows": rep["num_windows"],
            "tokens_per_window": rep["tokens_per_window"]})
        reports.append(rep)
    from .registers import RegistersReport
    reps = [RegistersReport(r["k"], r["num_meta"], r["num_windows"], r["tokens_per_window"],
                            [Row(**row) for row in r["rows"]], []) for r in reports]
    plots.plot_experiment([f"{m} meta" for m in exp["meta_tokens"]], reps, out / "registers")
    (out / "results.json").write_text(json.dumps({"preset": str(preset), "steps": cfg.schedule.steps,
                                                  "results": results}, indent=1))
    md = summary_markdown(preset, run_dir, out, cfg, exp, results, time.perf_counter() - t0)
    (out / "results.md").write_text(md)
    return out / "results.md"


def _mean_pct(rows: list[dict], key: str) -> str:
    return f"{100 * sum(x[key] for x in rows) / len(rows):.1f}%"


def summary_markdown(preset: Path, run_dir: Path, out: Path, cfg, exp: dict, results: list[dict],
                     seconds: float) -> str:
    m = cfg.model
    L = m.n_layers
    head = " | ".join(f"blk {i}" for i in range(L))
    per_variant = ", ".join(f"{r['train_seconds']:.0f} s" for r in results)
    lines = ["# Registers experiment: 0, 1, 4, 16 meta tokens", "",
             f"Command: `python -m memtrain.train.inspect registers-experiment --config {preset} --run-dir {run_dir} "
             f"--out {out}`. Training took {sum(r['train_seconds'] for r in results) / 60:.1f} min in all on 2 shared "
             f"CPU cores (per variant: {per_variant}); "
             f"this invocation {seconds / 60:.1f} min (trained variants are not retrained).", "",
             f"Model: d_model={m.d_model}, n_layers={L}, n_heads={m.n_heads}, window={m.window or 'none (global)'}, "
             f"tied embeddings={m.tie_embeddings}; data: {cfg.data.path}, seq_len={cfg.data.seq_len}, "
             f"batch={cfg.data.batch_size}; {cfg.schedule.steps} steps, lr={cfg.optim.lr}, seed={cfg.seed}. "
             f"Val loss: mean over the first {cfg.logging.eval_batches} val batches after the last step. Inspected "
             f"text: {results[0]['num_windows']} val window(s) of {results[0]['tokens_per_window']} tokens; outlier "
             f"= text token with hidden-state norm > {exp['k']:g}× the layer's median text norm.", "",
             "| meta tokens | val loss | outliers (all rows) | max/median norm (max over rows) | "
             "attn → first text, mean over blocks (uniform baseline) | attn → meta, mean over blocks (uniform) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        att = [x for x in rows if x["share_first"] is not None]
        lines.append(f"| {r['meta_tokens']} | {r['val_loss']:.4f} | {sum(x['num_outliers'] for x in rows)} | "
                     f"{max(x['text_max'] / x['text_median'] for x in rows):.2f} | "
                     f"{_mean_pct(att, 'share_first')} ({_mean_pct(att, 'uniform_first')}) | "
                     f"{_mean_pct(att, 'share_meta')} ({_mean_pct(att, 'uniform_meta')}) |")
    lines += ["", "Per block (attention of block l; outliers of the stream block l reads):", "",
              f"| meta tokens | quantity | {head} |", "|---|---|" + "---|" * L]
    for r in results:
        att = [x for x in r["rows"] if x["share_first"] is not None]
        lines.append(f"| {r['meta_tokens']} | attn → first text | " +
                     " | ".join(f"{100 * x['share_first']:.1f}%" for x in att) + " |")
        lines.append(f"| {r['meta_tokens']} | attn → meta | " +
                     " | ".join(f"{100 * x['share_meta']:.1f}%" for x in att) + " |")
        lines.append(f"| {r['meta_tokens']} | outliers | " + " | ".join(str(x['num_outliers']) for x in att) + " |")
        lines.append(f"| {r['meta_tokens']} | max/median norm | " +
                     " | ".join(f"{x['text_max'] / x['text_median']:.2f}" for x in att) + " |")
    lines += ["", "![by layer](registers_by_layer.png)", "",
              "Per variant: " + ", ".join(f"[{r['meta_tokens']} meta](meta_{r['meta_tokens']:02d}/registers.md)"
                                          for r in results) + "."]
    return "\n".join(lines) + "\n"
