"""PNG plots of the inspectors (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .registers import RegistersReport  # noqa: E402

REGION_COLORS = {"meta": "tab:orange", "read": "tab:green", "write": "tab:purple", "gate": "tab:red",
                 "persistent": "tab:orange", "retrieved": "tab:green"}
UNMARKED = ("text", "segment")  # the text itself: its regions are not outlined


def plot_norms(rep: RegistersReport, path: Path, title: str = "") -> None:
    """Text-norm quantiles per row (band 5-95 %, median, max), the outlier threshold and every meta token's norm."""
    x = np.arange(len(rep.rows))
    q = np.array([r.text_norm_hist for r in rep.rows])  # [rows, 7] quantiles 0, 5, 25, 50, 75, 95, 100 %
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, q[:, 1], q[:, 5], alpha=0.25, color="tab:blue", label="text 5–95 %")
    ax.plot(x, q[:, 3], "o-", color="tab:blue", label="text median")
    ax.plot(x, q[:, 6], "^--", color="tab:blue", label="text max")
    ax.plot(x, rep.k * q[:, 3], ":", color="gray", label=f"outlier threshold ({rep.k:g}× median)")
    for i, r in enumerate(rep.rows):
        if r.meta_norms:
            ax.scatter([i] * len(r.meta_norms), r.meta_norms, marker="s", s=14, color=REGION_COLORS["meta"],
                       label="meta tokens" if i == 0 else None, zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x, [str(r.row) if r.row < len(rep.rows) - 1 else "out" for r in rep.rows])
    ax.set_xlabel("residual stream entering block (out = after the last block)")
    ax.set_ylabel("hidden-state L2 norm")
    ax.set_title(title or "Hidden-state norms per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(rep: RegistersReport, path: Path, title: str = "") -> None:
    """Attention share per block to the first text token, to outliers and to meta tokens (and read memory)."""
    rows = [r for r in rep.rows if r.share_first is not None]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r.share_first for r in rows], "o-", label="first text token")
    ax.plot(x, [r.share_outliers for r in rows], "^-", label=f"outliers (> {rep.k:g}× median norm)")
    ax.plot(x, [r.share_meta for r in rows], "s-", color=REGION_COLORS["meta"], label="meta tokens")
    ax.plot(x, [r.uniform_first for r in rows], ":", color="tab:blue", label="first text, uniform baseline")
    if rep.num_meta:
        ax.plot(x, [r.uniform_meta for r in rows], ":", color=REGION_COLORS["meta"], label="meta, uniform baseline")
    if any(r.share_memory is not None for r in rows):
        ax.plot(x, [r.share_memory for r in rows], "d-", color=REGION_COLORS["read"], label="read memory")
    ax.set_xticks(x, [str(r.row) for r in rows])
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("share of attention mass (mean over heads, text queries)")
    ax.set_title(title or "Where attention goes, per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention_layer(probs: torch.Tensor, regions: dict, layer: int, path: Path, title: str = "",
                         key_regions: dict | None = None) -> None:
    """One block's maps `[H, N, Nk]` (one panel per head), colour on a log scale, memory regions outlined, masked
    keys white.

    Boundaries of each non-text region are drawn as coloured lines: `regions` on the query axis (rows) and, unless
    `key_regions` names the key axis separately (Titans MAC: persistent, retrieved, segment), on the key axis too."""
    H, N = probs.shape[0], probs.shape[-1]
    keys = key_regions or regions
    cols = min(H, 4)
    rws = (H + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(3.2 * cols + 1.0, 3.2 * rws + 0.9), squeeze=False,
                             constrained_layout=True)
    # masked (invisible) keys have probability exactly 0: drawn white, apart from visible-but-tiny ones
    p = np.ma.masked_where(probs.numpy() == 0, probs.double().clamp_min(1e-12).log10().numpy())
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("white")
    for h in range(rws * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(p[h], cmap=cmap, vmin=-4, vmax=0, interpolation="nearest")
        for axis, named in ((ax.axhline, regions), (ax.axvline, keys)):
            for name, (a, b) in sorted(named.items(), key=lambda kv: kv[0] == "meta"):  # meta last, on top
                if name in UNMARKED or b <= a:
                    continue
                for edge in (a - 0.5, b - 0.5):
                    axis(edge, color=REGION_COLORS.get(name, "white"), lw=0.8)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=7)
    named = {**regions, **keys} if key_regions is None else {
        **{f"{n} (queries)": r for n, r in regions.items()}, **{f"{n} (keys)": r for n, r in keys.items()}}
    handles = [plt.Line2D([], [], color=REGION_COLORS.get(n.split(" ")[0], "white"), label=f"{n} [{a}, {b})")
               for n, (a, b) in named.items() if n.split(" ")[0] not in UNMARKED and b > a]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="log10 probability")
    fig.suptitle(title or f"block {layer} attention (N = {N})", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gates(gates: dict[str, torch.Tensor], path: Path, title: str = "") -> None:
    """Titans gates along the text: `{name: [L, T]}` (mean over heads), one panel per gate, one line per layer."""
    fig, axes = plt.subplots(len(gates), 1, figsize=(8, 2.2 * len(gates)), sharex=True, squeeze=False)
    for ax, (name, g) in zip(axes[:, 0], gates.items()):
        for layer, row in enumerate(g):
            ax.plot(row.numpy(), lw=0.9, label=f"block {layer}")
        ax.set_ylabel(name)
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("text position")
    fig.suptitle(title or "Titans gates along the text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_experiment(labels: Sequence[str], reports: Sequence[RegistersReport], path_prefix: Path) -> list[Path]:
    """Registers experiment: first-token share and max norm ratio per block, one line per variant."""
    out = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, rep in zip(labels, reports):
        rows = [r for r in rep.rows if r.share_first is not None]
        axes[0].plot([r.row for r in rows], [r.share_first for r in rows], "o-", label=label)
        axes[1].plot([r.row for r in rows], [r.share_meta for r in rows], "s-", label=label)
        axes[2].plot(range(len(rep.rows)), [r.text_max / r.text_median for r in rep.rows], "^-", label=label)
    axes[0].set_title("attention share → first text token")
    axes[1].set_title("attention share → meta tokens")
    axes[2].set_title("max / median text norm (residual stream)")
    axes[2].axhline(reports[0].k, ls=":", color="gray", label=f"outlier threshold {reports[0].k:g}×")
    axes[2].set_yscale("log")
    for ax in axes[:2]:
        ax.set_ylim(0, 1)
        ax.set_xlabel("block")
    axes[2].set_xlabel("stream entering block (last = out)")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(f"{path_prefix}_by_layer.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out
