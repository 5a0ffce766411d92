"""results.csv, the markdown table and the PNG plots of the long-context experiment."""
from __future__ import annotations

import csv
from pathlib import Path

from memtrain.data.tasks.symbolic import chance

FIELDS = ("variant", "task", "length", "multiple", "correct", "total", "accuracy", "chance",
          "tokens_per_s", "seconds", "peak_mib")
ACC_FIELDS = ("correct", "total", "accuracy", "chance")
PERF_FIELDS = ("tokens_per_s", "seconds", "peak_mib")
PERF_TASK = "perf"
"""Rows of task "perf" hold the throughput and memory of one forward pass at that length (no accuracy)."""


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one finished cell (the file is the resume record: a cell in it is never recomputed)."""
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()


def _fmt_acc(row: dict) -> str:
    return f"{100 * float(row['accuracy']):.0f}"


def markdown_table(rows: list[dict], variants: list[str], tasks: list[str], lengths: list[int],
                   train_len: int) -> str:
    """Accuracy (%) per variant × length for each task, then tokens/s and peak MiB per variant × length."""
    by = {(r["variant"], r["task"], int(r["length"])): r for r in rows}
    head = "| variant | " + " | ".join(f"{n:,} ({n // train_len}×)" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    out = []
    for task in tasks:
        out += [f"**{task}** accuracy (%), chance {100 * chance(task):.1f}%", "", head, rule]
        for v in variants:
            cells = [_fmt_acc(by[(v, task, n)]) if (v, task, n) in by else "" for n in lengths]
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    perf_lengths = sorted({int(r["length"]) for r in rows if r["task"] == PERF_TASK})
    if perf_lengths:
        for key, title, fmt in (("tokens_per_s", "forward throughput (tokens/s)", "{:,.0f}"),
                                ("peak_mib", "peak memory of the forward pass (MiB)", "{:,.1f}")):
            out += [f"**{title}**", "",
                    "| variant | " + " | ".join(f"{n:,}" for n in perf_lengths) + " |",
                    "|---|" + "---:|" * len(perf_lengths)]
            for v in variants:
                cells = [fmt.format(float(by[(v, PERF_TASK, n)][key])) if (v, PERF_TASK, n) in by else ""
                         for n in perf_lengths]
                out.append(f"| {v} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def plots(rows: list[dict], variants: list[str], tasks: list[str], train_len: int, out: Path) -> list[Path]:
    """accuracy.png (one panel per task, accuracy vs length per variant, chance dashed) and perf.png (time and
    memory vs length, log-log). Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for v in variants:
            pts = sorted((int(r["length"]), float(r["accuracy"]))
                         for r in rows if r["variant"] == v and r["task"] == task)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=v)
        ax.axhline(100 * chance(task), color="gray", linestyle="--", linewidth=1, label="chance")
        ax.axvline(train_len, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        ax.set_xlabel("sequence length (tokens; dotted = training length)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    perf = [r for r in rows if r["task"] == PERF_TASK]
    if perf:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "seconds", "forward time (s)"), (axes[1], "peak_mib", "peak memory (MiB)")):
            for v in variants:
                pts = sorted((int(r["length"]), float(r[key])) for r in perf if r["variant"] == v)
                pts = [p for p in pts if p[1] > 0]  # log axes: a 0 (unmeasured) point cannot be drawn
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / "perf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
