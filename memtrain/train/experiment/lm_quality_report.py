"""results.md and the plots of the LM-quality experiment (memtrain/train/experiment/lm_quality.py)."""
from __future__ import annotations

import json
from pathlib import Path


def _by(rows: list[dict], seeds: list[int]) -> dict[tuple[str, int], list[dict]]:
    """(variant, multiple) -> its rows of the preset's seeds, in seed order."""
    by: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if int(r["seed"]) in seeds:
            by.setdefault((r["variant"], int(r["multiple"])), []).append(r)
    return by


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cell(rows: list[dict]) -> str:
    """Mean perplexity over seeds, with the range when there are several."""
    ppl = [float(r["perplexity"]) for r in rows]
    return f"{ppl[0]:.2f}" if len(ppl) == 1 else f"{_mean(ppl):.2f} ({min(ppl):.2f}–{max(ppl):.2f})"


def _by_position(rows: list[dict]) -> list[float]:
    """Per-slice perplexity, the mean over seeds."""
    per_seed = [json.loads(r["by_position"]) for r in rows]
    return [_mean(list(col)) for col in zip(*per_seed)]


def markdown(rows: list[dict], exp, cfg, preset: str) -> str:
    """Perplexity per variant × length (mean and range over seeds), then per position slice at the longest
    length (mean over seeds)."""
    by, mults, seq = _by(rows, exp.seeds), exp.eval_multiples, cfg.data.seq_len
    variants = [v for v in exp.variants if any((v, m) in by for m in mults)]
    some = next(iter(by.values()), [{}])[0]
    seeds = ", ".join(map(str, exp.seeds))
    lines = [
        "# LM quality at equal compute", "",
        f"Preset `{preset}`: every variant trained on the same {some.get('train_tokens', '?')} tokens "
        f"({cfg.schedule.steps} steps of {cfg.data.batch_size} × {seq} tokens) of `{cfg.data.path}`, "
        f"evaluated on the first {exp.eval_sequences} held-out (val) sequences of {seq * mults[-1]:,} tokens, cut into "
        f"shorter sequences for the shorter lengths (the same text at every length). Seeds {seeds}: each cell is "
        f"the mean perplexity over the seeds, (min–max) in brackets; `seeds` counts the seeds a row has; "
        f"`train s` is the mean wall time of a training (with experiment.jobs = {exp.jobs} at once).", "",
        "| variant | parameters | seeds | train s | " + " | ".join(f"ppl @ {seq * m:,} ({m}×)" for m in mults) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(mults),
    ]
    for v in variants:
        first = next(by[(v, m)] for m in mults if (v, m) in by)
        cells = [_cell(by[(v, m)]) if (v, m) in by else "" for m in mults]
        lines.append(f"| {v} | {int(first[0]['parameters']):,} | {len(first)} | "
                     f"{_mean([float(r['train_seconds']) for r in first]):.0f} | " + " | ".join(cells) + " |")
    last = mults[-1]
    lines += ["", f"Perplexity by position at {seq * last:,} tokens ({last}×), {exp.buckets} equal slices, first to "
                  f"last, mean over seeds (later slices gain where the model uses what came before):", "",
              "| variant | " + " | ".join(f"{i + 1}" for i in range(exp.buckets)) + " |",
              "|---|" + "---:|" * exp.buckets]
    for v in variants:
        if (v, last) in by:
            lines.append(f"| {v} | " + " | ".join(f"{p:.2f}" for p in _by_position(by[(v, last)])) + " |")
    lines += ["", "![perplexity vs length](perplexity.png)", "", "![perplexity by position](by_position.png)", ""]
    return "\n".join(lines)


def plots(rows: list[dict], exp, cfg, out: Path) -> list[Path]:
    """perplexity.png (vs evaluation length) and by_position.png (per position slice at the longest length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, seq, written = _by(rows, exp.seeds), cfg.data.seq_len, []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in exp.variants:
        cells = [(seq * m, [float(r["perplexity"]) for r in by[(v, m)]]) for m in exp.eval_multiples if (v, m) in by]
        if cells:
            mean = [_mean(p) for _, p in cells]
            # error bars: the range over seeds
            ax.errorbar([x for x, _ in cells], mean, yerr=[[m - min(p) for m, (_, p) in zip(mean, cells)],
                                                            [max(p) - m for m, (_, p) in zip(mean, cells)]],
                        marker="o", capsize=3, label=v)
    ax.set_xscale("log", base=2)
    ax.axvline(seq, color="black", linestyle=":", linewidth=1)
    written.append(_finish(plt, fig, ax, "held-out sequence length (tokens; dotted = training length)",
                           "perplexity (mean; bars: range over seeds)",
                           out / "perplexity.png"))

    last = exp.eval_multiples[-1]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in exp.variants:
        if (v, last) in by:
            ppl = _by_position(by[(v, last)])
            ax.plot([(i + 0.5) * seq * last / len(ppl) for i in range(len(ppl))], ppl, marker="o", label=v)
    written.append(_finish(plt, fig, ax, f"position in a {seq * last:,}-token sequence",
                           "perplexity of the slice (mean over seeds)",
                           out / "by_position.png"))
    return written


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], exp, cfg, run_dir: Path, preset: str) -> list[Path]:
    """RUN_DIR/results.md and the plots; returns the files written."""
    (run_dir / "results.md").write_text(markdown(rows, exp, cfg, preset))
    return [run_dir / "results.md", *plots(rows, exp, cfg, run_dir)]
