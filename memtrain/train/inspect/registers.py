"""Meta tokens as registers: hidden-state norms, high-norm outliers and where attention goes, per layer.

Rows. Row l < L describes the residual stream entering block l — the stream block l's attention reads its keys
from — and block l's attention; row L ("out") is the stream after the last block (norms only). Row 0 is the
embedding output. Hidden-state norm = the L2 norm of a position's residual-stream vector (before the block's RMSNorm).

Definitions (per row, over every window of the batch and, for the RMT, every segment pass):
* text norms / meta norms: the norms of text positions / meta-token positions;
* outliers: text positions whose norm exceeds k × the row's median text norm (k = `--k`, default 10); meta tokens
  above the same threshold are counted separately (`meta_outliers`), since meta tokens are expected to differ;
* attention shares (rows l < L): for every head h and every text query i except the first text position of its
  window (that query sees only itself among text keys, so its share is trivially 1 or 0), the probability mass
  block l puts on (a) the first text position of the window, (b) the outlier positions of this row in the same
  window, (c) the meta tokens (and, for the RMT, (d) the read memory). Each reported share is the plain mean of
  that mass over all (window, pass, head, query) — every query of every head weighs the same. In sliding-window
  layers the first text token is visible only to the first W queries, so its share there is small by construction.
* uniform baselines: the same shares if every query spread its mass evenly over the keys it can see (1 / visible
  keys each). A first-token share far above its baseline is an attention sink; near it, there is none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .capture import Trace


@dataclass
class Outlier:
    row: int
    window: int
    segment: int
    position: int
    """Text position within the window (RMT: within the segment), 0-based."""
    token_id: int
    token: str
    norm: float
    ratio: float
    """norm / the row's median text norm."""


@dataclass
class Row:
    row: int
    name: str
    text_median: float
    text_p95: float
    text_max: float
    meta_norms: list[float]
    """Meta-token norms of this row (window 0, first pass). In the plain model meta queries see only the prefix, so
    meta states do not depend on the text at all; in the RMT they depend on the read memory."""
    num_text: int
    num_outliers: int
    meta_outliers: int
    share_first: float | None = None
    share_outliers: float | None = None
    share_meta: float | None = None
    share_memory: float | None = None
    uniform_first: float | None = None
    """share_first if every query spread its mass evenly over the keys it can see (the no-sink baseline)."""
    uniform_meta: float | None = None
    """share_meta under the same uniform baseline."""
    text_norm_hist: list[float] = field(default_factory=list)
    """Quantiles 0, 5, 25, 50, 75, 95, 100 % of the text norms (for plots)."""


@dataclass
class RegistersReport:
    k: float
    num_meta: int
    num_windows: int
    tokens_per_window: int
    rows: list[Row]
    outliers: list[Outlier]

    def to_json(self) -> dict:
        return asdict(self)


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def analyse(trace: Trace, ids: torch.Tensor, decode, k: float = 10.0) -> RegistersReport:
    """The registers report of a captured forward of `ids` `[B, T]`; `decode(id) -> str` names tokens."""
    passes = trace.passes
    L = len(passes[0].hidden) - 1
    num_meta = passes[0].regions["meta"][1]
    rows: list[Row] = []
    outliers: list[Outlier] = []
    text_offset = 0
    offsets = []  # position in ids of each pass's first text token (RMT segments follow each other)
    for p in passes:
        offsets.append(text_offset)
        a, b = p.regions["text"]
        text_offset += b - a
    for r in range(L + 1):
        norms_text = [p.hidden[r][:, slice(*p.regions["text"])].norm(dim=-1) for p in passes]  # [B, t] each
        all_text = torch.cat([n.flatten() for n in norms_text])
        median = float(all_text.median())
        thresh = k * median
        meta_norms = passes[0].hidden[r][0, :num_meta].norm(dim=-1)
        meta_out = sum(int((p.hidden[r][:, :num_meta].norm(dim=-1) > thresh).sum()) for p in passes)
        out_masks = []
        for s, (p, n) in enumerate(zip(passes, norms_text)):
            mask = n > thresh  # [B, t]
            out_masks.append(mask)
            for w, t in mask.nonzero().tolist():
                tok = int(ids[w, offsets[s] + t])
                outliers.append(Outlier(r, w, s, t, tok, decode(tok), float(n[w, t]), float(n[w, t]) / median))
        q = torch.quantile(all_text.double(), torch.tensor(QUANTILES, dtype=torch.float64))
        row = Row(r, f"block {r} input" if r < L else "out", median, float(q[5]), float(all_text.max()),
                  [float(x) for x in meta_norms], int(all_text.numel()), int(sum(int(m.sum()) for m in out_masks)),
                  meta_out, text_norm_hist=[float(x) for x in q])
        if r < L and passes[0].probs:
            (row.share_first, row.share_outliers, row.share_meta, row.share_memory, row.uniform_first,
             row.uniform_meta) = _shares(passes, r, out_masks)
        rows.append(row)
    return RegistersReport(k, num_meta, int(ids.shape[0]), int(ids.shape[1]), rows, outliers)


def query_shares(probs: torch.Tensor, regions: dict, outlier_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query shares `[B, H, t - 1]` of one block's probabilities `[B, H, N, N]` for the text queries after the
    first: mass on the first text key, on outlier keys (`outlier_mask` `[B, t]` over text positions), on meta keys,
    on read-memory keys, and on all text keys."""
    a, b = regions["text"]
    pq = probs[:, :, a + 1:b]  # [B, H, t-1, N]: text queries except the first
    keymask = torch.zeros(probs.shape[0], probs.shape[-1], dtype=probs.dtype)
    keymask[:, a:b] = outlier_mask.to(probs.dtype)
    m0, m1 = regions["meta"]
    r0, r1 = regions.get("read", (0, 0))
    visible = (pq > 0).to(pq.dtype)  # float64 softmax: a visible key never underflows to exactly 0 here
    uniform = visible / visible.sum(-1, keepdim=True)
    return {"first": pq[..., a], "outliers": (pq * keymask[:, None, None, :]).sum(-1),
            "meta": pq[..., m0:m1].sum(-1), "memory": pq[..., r0:r1].sum(-1), "text": pq[..., a:b].sum(-1),
            "uniform_first": uniform[..., a], "uniform_meta": uniform[..., m0:m1].sum(-1)}


def _shares(passes, r: int, out_masks) -> tuple:
    sums = {"first": 0.0, "outliers": 0.0, "meta": 0.0, "memory": 0.0, "uniform_first": 0.0, "uniform_meta": 0.0}
    count = 0
    for p, mask in zip(passes, out_masks):
        if p.regions["text"][1] - p.regions["text"][0] < 2:
            continue  # a pass with one text token has no query to count
        s = query_shares(p.probs[r], p.regions, mask)
        for key in sums:
            sums[key] += float(s[key].sum())
        count += s["first"].numel()
    if count == 0:
        return None, None, None, None, None, None
    has_memory = "read" in passes[0].regions
    return (sums["first"] / count, sums["outliers"] / count, sums["meta"] / count,
            sums["memory"] / count if has_memory else None, sums["uniform_first"] / count, sums["uniform_meta"] / count)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def markdown(rep: RegistersReport, title: str = "Registers", max_outliers: int = 20) -> str:
    """The report as a markdown table (one row per layer) plus the strongest outliers."""
    mem = any(r.share_memory is not None for r in rep.rows)
    lines = [f"# {title}", "",
             f"{rep.num_windows} window(s) of {rep.tokens_per_window} text tokens; {rep.num_meta} meta tokens; "
             f"outlier = text norm > k × the row's median text norm, k = {rep.k:g}. Row *block l input* is the "
             f"residual stream block l's attention reads; shares are block l's attention mass, averaged over "
             f"windows, heads and text queries (the first text query excluded); (uniform) = the share if every query "
             f"spread its mass evenly over the keys it sees.", "",
             "| row | median text norm | p95 / max text norm | meta norms (min–max) | outliers (text) | meta > k·median "
             "| attn → first text (uniform) | attn → outliers | attn → meta (uniform) |"
             + (" attn → read memory |" if mem else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if mem else "")]
    for r in rep.rows:
        meta = f"{min(r.meta_norms):.3g}–{max(r.meta_norms):.3g}" if r.meta_norms else "–"
        pct = 100 * r.num_outliers / max(1, r.num_text)
        lines.append(f"| {r.name} | {r.text_median:.3g} | {r.text_p95:.3g} / {r.text_max:.3g} | {meta} | "
                     f"{r.num_outliers} ({pct:.1f}%) | {r.meta_outliers} | {_fmt(r.share_first, True)} "
                     f"({_fmt(r.uniform_first, True)}) | {_fmt(r.share_outliers, True)} | {_fmt(r.share_meta, True)} "
                     f"({_fmt(r.uniform_meta, True)}) |"
                     + (f" {_fmt(r.share_memory, True)} |" if mem else ""))
    lines += ["", f"## Outliers (strongest {max_outliers} of {len(rep.outliers)})", ""]
    if not rep.outliers:
        lines.append(f"No text token exceeds {rep.k:g}× its row's median norm.")
    else:
        lines += ["| row | window | segment | position | token | norm | × median |", "|---|---|---|---|---|---|---|"]
        for o in sorted(rep.outliers, key=lambda o: -o.ratio)[:max_outliers]:
            lines.append(f"| {o.row} | {o.window} | {o.segment} | {o.position} | `{o.token!r}` | {o.norm:.3g} | "
                         f"{o.ratio:.1f} |")
    return "\n".join(lines) + "\n"
