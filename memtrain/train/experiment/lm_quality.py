"""Language-model quality at equal compute: every variant trained on the same tokens, perplexity on held-out text.

    python -m memtrain.train.experiment lm_quality --config configs/experiments/lm_quality.toml \
        --run-dir runs/lm_quality --out docs/results/lm_quality

The CPU-scale analogue of Titans' Table 1. The preset has two tables: `[experiment]` (the variants, the token budget
and the evaluation) and `[train]`, a whole trainer config (the keys of configs/*.toml) every variant starts from.
Each variant changes only the memory and the attention span (`VARIANTS`), so all share width, depth, data order and
optimizer; `schedule.steps` is the budget in tokens over the tokens per step, the same for every variant.

Every (variant, seed) is trained by a `python -m memtrain.train` subprocess into RUN_DIR/<variant>/seed<s>
(`--resume auto`: an interrupted run continues; `experiment.jobs` of them at once, each with cores / jobs threads),
then evaluated on the first `eval_sequences` held-out (val split) sequences of each
length `data.seq_len × m` for m in `eval_multiples` (the same text at every length: the longest sequences cut into
shorter ones): mean next-token loss and perplexity, and the perplexity of each of `buckets` equal slices of
positions (later positions should gain from memory). Stateful models (the memory's
spec says so) read a sequence in pieces of `eval_piece` tokens with their state carried, the others in one call.
RUN_DIR/results.csv is the resume record (a row per variant, seed and length): a cell in it is not computed again.
The seed changes the initialisation and the data order (the trainer's `seed`), the same for every variant.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configtree import ConfigError, build, read_toml

ROOT = Path(__file__).resolve().parents[3]
VARIANTS: dict[str, list[str]] = {
    "full": ["model.window=0", "model.global_layers=[]"],  # every layer attends to the whole sequence
    "window": [],                                           # the [train] model as written: sliding window
    "mac": ['model.memory="mac"'],
    "mag": ['model.memory="mag"'],
    "mal": ['model.memory="mal"'],
    "lmm": ['model.memory="lmm"'],
    "rmt": ['model.memory="rmt"'],
}
"""Variant name -> trainer `--set` overrides on the [train] config."""
FIELDS = ("variant", "seed", "parameters", "multiple", "length", "sequences", "loss", "perplexity", "by_position",
          "train_tokens", "train_seconds")


@dataclass
class LMQualitySettings:
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Variants trained and evaluated, in order (names of `VARIANTS`)."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (each replaces the [train] table's `seed`): every variant is trained once per seed, and the
    report gives the mean and the range over seeds."""

    jobs: int = 1
    """Trainings run at once; each gets max(1, CPU cores // jobs) threads. Evaluation follows each training."""

    tokens: int = 1_000_000
    """Training tokens per variant: schedule.steps = tokens / (data.seq_len × data.batch_size), rounded up."""

    eval_multiples: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Held-out sequence lengths as multiples of data.seq_len (increasing, >= 1)."""

    eval_sequences: int = 8
    """Held-out sequences of the longest length; shorter lengths cut the same text into more sequences."""

    eval_piece: int = 1024
    """Tokens per call for stateful models (the state is carried from piece to piece)."""

    buckets: int = 8
    """Equal slices of positions whose perplexity is reported separately."""

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise ConfigError(f"experiment.variants must name some of {', '.join(VARIANTS)}; unknown: {unknown}")
        m = self.eval_multiples
        if not m or any(x < 1 for x in m) or sorted(set(m)) != m:
            raise ConfigError(f"experiment.eval_multiples must be increasing integers >= 1, got {m}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment.seeds must be distinct integers, at least one, got {self.seeds}")
        for key in ("jobs", "tokens", "eval_sequences", "eval_piece", "buckets"):
            if getattr(self, key) < 1:
                raise ConfigError(f"experiment.{key} must be >= 1, got {getattr(self, key)}")


def load_preset(path: str | Path, overrides: list[str] = ()) -> tuple[LMQualitySettings, dict]:
    """(the [experiment] settings, the [train] config tree) of a preset; `overrides` are `experiment.key=value` or
    `train.section.key=value`. Raises ConfigError (one line)."""
    from ..configtree import apply_override
    tree = read_toml(Path(path), what="experiment preset", where="configs/experiments/")
    if set(tree) != {"experiment", "train"}:
        raise ConfigError(f"{path} must hold exactly the tables [experiment] and [train]")
    for item in overrides:
        apply_override(tree, item)
    exp = build(LMQualitySettings, tree["experiment"], "experiment.")
    exp.validate()
    return exp, tree["train"]


def _base_config(train_tree: dict, exp: LMQualitySettings, path: Path):
    """The [train] table as the trainer config every variant starts from (steps from the token budget, the
    validation loss once at the end), written to `path`. A run directory trained with other settings is refused:
    its variants would not be comparable with new ones."""
    from memtrain.train.config import Config
    from ..configtree import to_toml
    cfg = build(Config, json.loads(json.dumps(train_tree)), "train.")
    per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.optim.grad_accum
    cfg.schedule.steps = max(1, math.ceil(exp.tokens / per_step))
    cfg.logging.eval_every = cfg.schedule.steps
    cfg.logging.progress = False
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"the [train] table of the preset is not a valid config: {e}") from None
    text = to_toml(cfg)
    if path.is_file() and path.read_text() != text:
        raise ConfigError(f"{path.parent} was trained with other [train] settings or experiment.tokens: use another "
                          f"--run-dir (or the settings of {path})")
    path.write_text(text)
    return cfg


def train(base: Path, run: Path, variant: str, seed: int, steps: int, threads: int) -> float:
    """Train `variant` with `seed` into `run` (`threads` torch threads) unless its summary shows `steps` steps done;
    returns training seconds."""
    summary = run / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == steps):
        cmd = [sys.executable, "-m", "memtrain.train", "--config", str(base), "--run-dir", str(run), "--resume", "auto",
               "--set", f"seed={seed}"]
        for s in VARIANTS[variant]:
            cmd += ["--set", s]
        print(f"[lm_quality] training {variant} (seed {seed}): {steps} steps", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise ConfigError(f"training {variant} (seed {seed}) in {run} failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    # config.toml is written when the Trainer starts, summary.json when it ends (a resumed run: the last piece)
    return round(summary.stat().st_mtime - (run / "config.toml").stat().st_mtime, 1)


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor, targets: torch.Tensor, piece: int) -> torch.Tensor:
    """Next-token loss of every position `[B, T]` (fp32). A stateful model reads `piece` tokens per call, its state
    carried; a stateless one reads the whole sequence."""
    from memtrain.model.memory import memory_spec
    stateful = memory_spec(model.cfg.memory).stateful
    spans = range(0, tokens.shape[1], piece) if stateful else [0]
    out, state = [], None
    for start in spans:
        stop = start + piece if stateful else tokens.shape[1]
        result = model(tokens[:, start:stop], state=state) if stateful else model(tokens[:, start:stop])
        state = result.state
        logits = result.logits.float()
        out.append(F.cross_entropy(logits.flatten(0, 1), targets[:, start:stop].flatten(), reduction="none")
                   .view(tokens.shape[0], -1))
    return torch.cat(out, dim=1)


def held_out(cfg, longest: int, length: int, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same held-out text at every length: the first `sequences` val-split sequences of `longest` tokens, cut
    into sequences of `length` tokens (inputs, targets `[sequences · longest / length, length]`). Only the context a
    token sees changes from one length to the next, not the text."""
    import dataclasses

    from memtrain.data.stream import build_stream
    data = dataclasses.replace(cfg.data, seq_len=longest, batch_size=sequences, num_workers=0)
    batch = next(iter(build_stream(data, split="val")))
    return batch.inputs.reshape(-1, length), batch.targets.reshape(-1, length)


def evaluate(run: Path, cfg, exp: LMQualitySettings, multiple: int) -> dict:
    from memtrain.train.inspect.load import load_checkpoint_model
    model = load_checkpoint_model(run).model
    length = cfg.data.seq_len * multiple
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, length)  # a length check only: evaluate past training
    inputs, targets = held_out(cfg, cfg.data.seq_len * exp.eval_multiples[-1], length, exp.eval_sequences)
    losses = token_losses(model, inputs, targets, exp.eval_piece)
    by_position = [round(math.exp(float(chunk.mean())), 3) for chunk in losses.chunk(exp.buckets, dim=1)]
    loss = float(losses.mean())
    return {"parameters": model.num_params(), "multiple": multiple, "length": length, "sequences": inputs.shape[0],
            "loss": round(loss, 5), "perplexity": round(math.exp(loss), 3), "by_position": json.dumps(by_position)}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if tuple(reader.fieldnames or ()) != FIELDS:  # appending would put values under other columns
        raise ConfigError(f"{path} has the columns {reader.fieldnames}, not {list(FIELDS)} (an older version's run): "
                          f"use another --run-dir")
    return rows


def run_experiment(preset: str | Path, run_dir: str | Path, out: str | Path | None = None,
                   overrides: list[str] = ()) -> Path:
    """Train and evaluate every variant and seed (resuming what exists); returns RUN_DIR/results.md."""
    exp, train_tree = load_preset(preset, overrides)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = _base_config(train_tree, exp, run_dir / "base.toml")
    results = run_dir / "results.csv"
    done = {(r["variant"], int(r["seed"]), int(r["multiple"])) for r in read_rows(results)}
    runs = [(v, s) for s in exp.seeds for v in exp.variants  # seed-major: the first seed's table fills first
            if any((v, s, m) not in done for m in exp.eval_multiples)]
    threads = max(1, (os.cpu_count() or 1) // exp.jobs)
    torch.set_num_threads(threads)  # evaluation runs beside the other trainings
    with ThreadPoolExecutor(max_workers=exp.jobs) as pool:
        pending = {pool.submit(train, run_dir / "base.toml", run_dir / v / f"seed{s}", v, s, cfg.schedule.steps,
                               threads): (v, s) for v, s in runs}
        for future in (as_completed(pending) if exp.jobs > 1 else pending):
            variant, seed = pending[future]
            seconds = future.result()  # a failed training raises here; the running ones still finish and are kept
            for m in exp.eval_multiples:
                if (variant, seed, m) not in done:
                    _evaluate_into(results, run_dir / variant / f"seed{seed}", cfg, exp, variant, seed, m, seconds)
    from .lm_quality_report import write_report
    command = " ".join([str(preset), *(f"--set '{o}'" for o in overrides)])  # what the report was made with
    written = write_report(read_rows(results), exp, cfg, run_dir, command)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        for path in (results, *written):
            shutil.copyfile(path, Path(out) / path.name)
    return run_dir / "results.md"


def _evaluate_into(results: Path, run: Path, cfg, exp: LMQualitySettings, variant: str, seed: int, multiple: int,
                   seconds: float) -> None:
    """Evaluate one cell and append its row to `results`."""
    t0 = time.perf_counter()
    row = {"variant": variant, "seed": seed, **evaluate(run, cfg, exp, multiple),
           "train_tokens": cfg.schedule.steps * cfg.data.seq_len * cfg.data.batch_size * cfg.optim.grad_accum,
           "train_seconds": seconds}
    new = not results.is_file()
    with results.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(f"[lm_quality] {variant} (seed {seed}) at {multiple}x: perplexity {row['perplexity']} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main_lm_quality(args) -> int:
    path = run_experiment(args.config, args.run_dir, args.out, args.overrides)
    print(f"[lm_quality] report: {path}")
    return 0
