"""results.md and the plots of the LM-quality experiment (memtrain/train/experiment/lm_quality.py)."""
from __future__ import annotations

import json
from pathlib import Path


def _by(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["variant"], int(r["multiple"])): r for r in rows}


def markdown(rows: list[dict], exp, cfg, preset: str) -> str:
    """Perplexity per variant × length, then per position slice at the longest length."""
    by, mults, seq = _by(rows), exp.eval_multiples, cfg.data.seq_len
    variants = [v for v in exp.variants if any((v, m) in by for m in mults)]
    some = next(iter(by.values()), {})
    lines = [
        "# LM quality at equal compute", "",
        f"Preset `{preset}`: every variant trained on the same {some.get('train_tokens', '?')} tokens "
        f"({cfg.schedule.steps} steps of {cfg.data.batch_size} × {seq} tokens) of `{cfg.data.path}`, "
        f"evaluated on the first {exp.eval_sequences} held-out (val) sequences of {seq * mults[-1]:,} tokens, cut into "
        f"shorter sequences for the shorter lengths (the same text at every length).", "",
        "| variant | parameters | train s | " + " | ".join(f"ppl @ {seq * m:,} ({m}×)" for m in mults) + " |",
        "|---|---:|---:|" + "---:|" * len(mults),
    ]
    for v in variants:
        first = next(by[(v, m)] for m in mults if (v, m) in by)
        cells = [f"{float(by[(v, m)]['perplexity']):.2f}" if (v, m) in by else "" for m in mults]
        lines.append(f"| {v} | {int(first['parameters']):,} | {float(first['train_seconds']):.0f} | "
                     + " | ".join(cells) + " |")
    last = mults[-1]
    lines += ["", f"Perplexity by position at {seq * last:,} tokens ({last}×), {exp.buckets} equal slices, first to "
                  f"last (later slices gain where the model uses what came before):", "",
              "| variant | " + " | ".join(f"{i + 1}" for i in range(exp.buckets)) + " |",
              "|---|" + "---:|" * exp.buckets]
    for v in variants:
        if (v, last) in by:
            lines.append(f"| {v} | " + " | ".join(f"{p:.2f}" for p in json.loads(by[(v, last)]["by_position"]))
                         + " |")
    lines += ["", "![perplexity vs length](perplexity.png)", "", "![perplexity by position](by_position.png)", ""]
    return "\n".join(lines)


def plots(rows: list[dict], exp, cfg, out: Path) -> list[Path]:
    """perplexity.png (vs evaluation length) and by_position.png (per position slice at the longest length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, seq, written = _by(rows), cfg.data.seq_len, []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in exp.variants:
        pts = [(seq * m, float(by[(v, m)]["perplexity"])) for m in exp.eval_multiples if (v, m) in by]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.axvline(seq, color="black", linestyle=":", linewidth=1)
    written.append(_finish(plt, fig, ax, "held-out sequence length (tokens; dotted = training length)", "perplexity",
                           out / "perplexity.png"))

    last = exp.eval_multiples[-1]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in exp.variants:
        if (v, last) in by:
            ppl = json.loads(by[(v, last)]["by_position"])
            ax.plot([(i + 0.5) * seq * last / len(ppl) for i in range(len(ppl))], ppl, marker="o", label=v)
    written.append(_finish(plt, fig, ax, f"position in a {seq * last:,}-token sequence", "perplexity of the slice",
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
