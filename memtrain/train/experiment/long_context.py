"""The long-context experiment: train every variant at one length, evaluate needle and qa1-qa3 up to 64× that.

    python -m memtrain.train.experiment long_context --config configs/experiments/long_context.toml [--run-dir DIR]
        [--set key=value ...] [--out DIR]

RUN_DIR (default runs/long_context) gets:
- config.toml — the resolved config of the latest invocation;
- variants/NAME/train.pt — the trained variant (training resumes from it; a finished one is reused), and
  variants/NAME/identity.json — its model and training settings: a later invocation that would train the variant
  differently is refused (its cells would mix two experiments); what is evaluated (variants, tasks, lengths,
  examples, perf) may change freely, and only the missing cells are computed;
- results.csv — one row per finished cell (variant × task × length, and variant × "perf" × length for
  throughput and memory); it is the resume record: a cell already in it is never recomputed;
- results.md (the tables, chance levels, training summary), accuracy.png and perf.png.
`--out DIR` copies results.csv, results.md and the PNGs there as well (e.g. docs/results/long_context).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from memtrain.data.tasks.symbolic import chance
from memtrain.model.memory import memory_kinds, memory_spec

from ..checkpoint import safe_torch_load
from ..configtree import ConfigError, to_toml
from .config import LongContextConfig, one_segment_applies, variant_model
from .evaluate import accuracy, performance
from .report import PERF_TASK, append_row, markdown_table, plots, read_rows
from .training import train_variant

def variant_identity(cfg: LongContextConfig, variant: str) -> dict:
    """Everything that shapes a trained variant and its cells: its model (less the memory sections it does not
    use), the training settings and the data; not what is evaluated (lengths, examples, perf)."""
    import dataclasses
    m = dataclasses.asdict(variant_model(cfg, variant))
    m.pop("max_seq_len")  # raised to the longest evaluation; does not change the weights
    sections = {memory_spec(k).settings for k in memory_kinds()} - {None, memory_spec(m["memory"]).settings}
    for section in sorted(sections):  # the other kinds' settings do not shape this variant
        m.pop(section, None)
    train = dataclasses.asdict(cfg.train)
    del train["one_segment_variants"]  # what it does to this variant is whether one_segment_steps stays below
    if not one_segment_applies(cfg, variant):
        del train["one_segment_steps"]  # it does not shape this variant (and older runs stay valid)
    return {"model": m, "train": train, "train_len": cfg.train_len, "seed": cfg.seed,
            "events": cfg.events, "filler": cfg.filler}


def _check_variant(vdir: Path, cfg: LongContextConfig, variant: str) -> None:
    """Refuse a variant directory trained with other settings (its checkpoint and cells would not match)."""
    saved, now = vdir / "identity.json", variant_identity(cfg, variant)
    now = json.loads(json.dumps(now))
    if saved.is_file():
        before = json.loads(saved.read_text())
        if before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(f"{vdir} was trained with other settings ({', '.join(diff)}); use another --run-dir, "
                              f"or delete {vdir} and its rows of results.csv to redo it")
    else:
        vdir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(now, indent=1, sort_keys=True))


def _fmt_time(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def run_long_context(cfg: LongContextConfig, run_dir: str | Path, out: str | Path | None = None,
                     say=print) -> dict:
    """Run (or resume) the experiment; returns {"cells_computed", "rows", "seconds", "files"}."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    for variant in cfg.variants:
        _check_variant(run / "variants" / variant, cfg, variant)
    (run / "config.toml").write_text(to_toml(cfg))
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    elif not torch.cuda.is_available():
        raise ConfigError("device = \"cuda\" but no CUDA device is available; use --set device=\"cpu\"")
    csv_path = run / "results.csv"
    rows = read_rows(csv_path)
    done = {(r["variant"], r["task"], int(r["length"])) for r in rows}
    todo = [(v, t, n) for v in cfg.variants for t in cfg.tasks for n in cfg.eval_lengths] + \
           [(v, PERF_TASK, n) for v in cfg.variants for n in cfg.perf_lengths]
    remaining = [c for c in todo if c not in done]
    say(f"long_context: {len(cfg.variants)} variants × {len(cfg.tasks)} tasks × {len(cfg.eval_lengths)} lengths "
        f"(+ {len(cfg.perf_lengths)} perf lengths); {len(todo) - len(remaining)} of {len(todo)} cells done, "
        f"run dir {run}")
    t_start, computed = time.perf_counter(), 0
    for vi, variant in enumerate(cfg.variants):
        cells = [c for c in remaining if c[0] == variant]
        vdir = run / "variants" / variant
        if not cells and _trained(vdir, cfg):
            continue
        say(f"[{vi + 1}/{len(cfg.variants)}] {variant}: training ({cfg.train.steps} steps at {cfg.train_len} tokens)")
        model, _ = train_variant(cfg, variant, vdir, say=lambda s: say(s))
        for ci, (_, task, n) in enumerate(cells):
            if (variant, task, n) in {(r["variant"], r["task"], int(r["length"])) for r in read_rows(csv_path)}:
                continue  # written meanwhile by another invocation working on the same run directory
            t0 = time.perf_counter()
            row = {"variant": variant, "task": task, "length": n, "multiple": n // cfg.train_len}
            if task == PERF_TASK:
                row.update(performance(model, cfg, variant, n))
                msg = f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_mib']:.1f} MiB"
            else:
                correct, total = accuracy(model, cfg, variant, task, n)
                row.update(correct=correct, total=total, accuracy=correct / total, chance=round(chance(task), 4))
                msg = f"accuracy {correct}/{total} = {100 * correct / total:.0f}% (chance {100 * chance(task):.0f}%)"
            append_row(csv_path, row)
            computed += 1
            say(f"  {variant} {task} @ {n:,} ({ci + 1}/{len(cells)}): {msg} [{time.perf_counter() - t0:.1f}s, "
                f"total {_fmt_time(time.perf_counter() - t_start)}]")
        del model
    rows = read_rows(csv_path)
    files = write_report(cfg, rows, training_summary(cfg, run), run)
    if out is not None:
        dest = Path(out)
        dest.mkdir(parents=True, exist_ok=True)
        for f in files + [csv_path]:
            shutil.copyfile(f, dest / f.name)
    seconds = time.perf_counter() - t_start
    say(f"done: {computed} cells computed in {_fmt_time(seconds)}; {run / 'results.md'}")
    return {"cells_computed": computed, "rows": rows, "seconds": seconds, "files": files}


def _trained(vdir: Path, cfg: LongContextConfig) -> bool:
    path = vdir / "train.pt"
    return path.is_file() and safe_torch_load(path)["step"] >= cfg.train.steps


def training_summary(cfg: LongContextConfig, run: Path) -> dict:
    """Per trained variant: parameters, training time and the last logged loss / accuracy, read from its checkpoint
    (the record every invocation shares, also when several work on one run directory at once)."""
    out = {}
    for v in cfg.variants:
        path = run / "variants" / v / "train.pt"
        if not path.is_file():
            continue
        p = safe_torch_load(path)
        params = p.get("params") or sum(t.numel() for t in p["model"].values())
        out[v] = {"params": params, "train_seconds": round(p["seconds"], 1), "steps": p["step"],
                  "final": p["log"][-1] if p["log"] else None, "memory": variant_model(cfg, v).memory}
    (run / "training.json").write_text(json.dumps(out, indent=1))
    return out


def write_report(cfg: LongContextConfig, rows: list[dict], train_info: dict, run: Path) -> list[Path]:
    """results.md (chance levels, training summary, tables) and the plots; returns the files written."""
    lines = ["# Long-context experiment", "",
             f"Training length {cfg.train_len} tokens; evaluation at {', '.join(f'{m}×' for m in cfg.eval_multiples)}"
             f" ({cfg.eval_examples} examples per cell, greedy exact match of the one answer token).", "",
             "Chance: " + ", ".join(f"{t} {100 * chance(t):.1f}%" for t in cfg.tasks), ""]
    settings = [f"{v}: {', '.join(getattr(cfg.variant_settings, v))}" for v in cfg.variants
                if getattr(cfg.variant_settings, v)]
    if settings:
        lines += ["Variant settings on top of the shared model: " + "; ".join(settings) + ".", ""]
    segmented = [v for v in cfg.variants if one_segment_applies(cfg, v)]
    if segmented:
        lines += [f"{', '.join(segmented)}: each training example is one segment for the first "
                  f"{cfg.train.one_segment_steps} steps (train.one_segment_steps).", ""]
    lines += ["| variant | memory | parameters | training time | final train loss | final train acc |",
              "|---|---|---:|---:|---:|---:|"]
    for v in cfg.variants:
        i = train_info.get(v)
        if i:
            f = i.get("final") or {}
            lines.append(f"| {v} | {i['memory']} | {i['params']:,} | {_fmt_time(i['train_seconds'])} | "
                         f"{f.get('loss', float('nan')):.3f} | {100 * f.get('acc', float('nan')):.0f}% |")
    lines += ["", markdown_table(rows, cfg.variants, cfg.tasks, cfg.eval_lengths, cfg.train_len)]
    md = run / "results.md"
    md.write_text("\n".join(lines) + "\n")
    return [md] + plots(rows, cfg.variants, cfg.tasks, cfg.train_len, run)


def main_long_context(args) -> int:
    from .config import load_experiment_config
    cfg = load_experiment_config(args.config, args.overrides)
    run_long_context(cfg, args.run_dir, args.out, say=lambda s: print(s, flush=True, file=sys.stdout))
    return 0
