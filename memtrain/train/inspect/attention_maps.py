"""Attention maps and the Memory Transformer quadrant analysis (Burtsev et al. 2020, §4 / Fig. 4).

Positions split into "memory" and "text". Memory = the meta tokens for the plain model; for the RMT, meta tokens
plus read memory plus write memory. Per block and head, the attention mass (each query's probabilities sum to 1)
falls into four quadrants, named by query → key:

    memory → memory   "processing"      memory → text   "write" (memory reads the text)
    text   → memory   "read"            text   → text

`quadrants` reports each quadrant's mass as a share of all mass (the four sum to 1: total mass = number of
queries), and also per query group (`read_of_text` = text queries' mass on memory / number of text queries; `write
_of_memory` = memory queries' mass on text / number of memory queries). With the reference mask, meta tokens (and
RMT read memory) cannot see text, so the plain model's "write" quadrant is 0 by construction; only RMT write
tokens can write. For the RMT the shares are averaged over segment passes (each pass weighs the same).

Titans MAG / MAL maps have the plain layout (memory = meta tokens) and get the same quadrants. Titans MAC maps have
their own key axis, [persistent ‖ retrieved ‖ segment] (`Pass.key_regions`, titans_capture.py): `key_shares`
reports how text queries split their mass over those three (the shares sum to 1); meta queries see the persistent
keys only, so theirs is 1 on persistent by construction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .capture import Pass, Trace

MEMORY_REGIONS = ("meta", "read", "write")


def memory_positions(regions: dict, n: int) -> torch.Tensor:
    """Boolean `[N]`: True at memory positions (meta, read and write memory)."""
    mem = torch.zeros(n, dtype=torch.bool)
    for name in MEMORY_REGIONS:
        if name in regions:
            mem[slice(*regions[name])] = True
    return mem


@dataclass
class Quadrants:
    layer: int
    head: int | None
    """None: the mean over heads."""
    processing: float
    write: float
    read: float
    text_text: float
    read_of_text: float
    write_of_memory: float | None


def pass_quadrants(probs: torch.Tensor, regions: dict) -> torch.Tensor:
    """Quadrant masses of one block's probabilities `[B, H, N, N]` -> `[H, 2, 2]` shares of all mass, averaged over
    the batch; index [query group, key group] with group 0 = memory, 1 = text."""
    n = probs.shape[-1]
    mem = memory_positions(regions, n)
    groups = [mem, ~mem]
    out = torch.zeros(probs.shape[1], 2, 2, dtype=torch.float64)
    for qi, qg in enumerate(groups):
        for ki, kg in enumerate(groups):
            out[:, qi, ki] = probs[:, :, qg][..., kg].sum(dim=(-1, -2)).mean(0) / n
    return out


def quadrants(trace: Trace) -> list[Quadrants]:
    """Per block: one `Quadrants` per head, then the mean over heads (head=None)."""
    passes: list[Pass] = trace.passes
    if any(p.key_regions for p in passes):
        raise ValueError("these maps have their own key axis (Titans MAC): use key_shares, not quadrants")
    L, H = len(passes[0].probs), passes[0].probs[0].shape[1]
    result = []
    for layer in range(L):
        q = torch.stack([pass_quadrants(p.probs[layer], p.regions) for p in passes]).mean(0)  # [H, 2, 2]
        n_mem = torch.tensor([float(memory_positions(p.regions, p.probs[layer].shape[-1]).sum()) for p in passes])
        n_all = torch.tensor([float(p.probs[layer].shape[-1]) for p in passes])
        f_mem = float((n_mem / n_all).mean())  # fraction of queries that are memory (mean over passes)
        for head in [*range(H), None]:
            x = q.mean(0) if head is None else q[head]
            text_frac = 1.0 - f_mem
            result.append(Quadrants(layer, head, float(x[0, 0]), float(x[0, 1]), float(x[1, 0]), float(x[1, 1]),
                                    float(x[1, 0]) / text_frac if text_frac > 0 else 0.0,
                                    float(x[0, 1]) / f_mem if f_mem > 0 else None))
    return result


def markdown(rows: list[Quadrants], title: str, note: str = "") -> str:
    lines = [f"# {title}", "", note, "",
             "Shares of all attention mass (the four sum to 1), then per query group: *read* = text queries' mass on "
             "memory ÷ text queries, *write* = memory queries' mass on text ÷ memory queries.", "",
             "| layer | head | memory→memory (processing) | memory→text (write) | text→memory (read) | text→text "
             "| read, per text query | write, per memory query |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = "mean" if r.head is None else str(r.head)
        w = "–" if r.write_of_memory is None else f"{100 * r.write_of_memory:.1f}%"
        lines.append(f"| {r.layer} | {head} | {100 * r.processing:.1f}% | {100 * r.write:.1f}% | {100 * r.read:.1f}% "
                     f"| {100 * r.text_text:.1f}% | {100 * r.read_of_text:.1f}% | {w} |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[Quadrants]) -> list[dict]:
    return [asdict(r) for r in rows]


@dataclass
class KeyShares:
    """Titans MAC: where the text queries of one block (and head) put their attention mass."""

    layer: int
    head: int | None
    """None: the mean over heads."""
    shares: dict[str, float]
    """Key region (persistent, retrieved, segment) -> share of the text queries' mass (the shares sum to 1)."""


def key_shares(trace: Trace) -> list[KeyShares]:
    """Per block: one `KeyShares` per head, then the mean over heads (head=None). A share is the mass of all text
    queries on a key region ÷ the number of text queries (batch mean; passes averaged, each weighing the same)."""
    passes: list[Pass] = trace.passes
    names = list(passes[0].key_regions)
    result = []
    for layer in range(len(passes[0].probs)):
        per_pass = []
        for p in passes:
            text = p.probs[layer][:, :, slice(*p.regions["text"])]  # [B, H, n, Nk]
            per_pass.append(torch.stack([text[..., slice(*p.key_regions[k])].sum(-1).mean(dim=(0, 2))
                                         for k in names], dim=-1))  # [H, regions]
        x = torch.stack(per_pass).mean(0)
        for head in [*range(x.shape[0]), None]:
            row = x.mean(0) if head is None else x[head]
            result.append(KeyShares(layer, head, {k: float(v) for k, v in zip(names, row)}))
    return result


def key_shares_markdown(rows: list[KeyShares], title: str, note: str = "") -> str:
    names = list(rows[0].shares) if rows else []
    lines = [f"# {title}", "", note, "",
             "Text queries' attention mass per key region, as a share of all their mass (each row sums to 1); meta "
             "queries attend to the persistent keys only.", "",
             "| layer | head | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        head = "mean" if r.head is None else str(r.head)
        lines.append(f"| {r.layer} | {head} | " + " | ".join(f"{100 * r.shares[k]:.1f}%" for k in names) + " |")
    return "\n".join(lines) + "\n"


def key_shares_json(rows: list[KeyShares]) -> list[dict]:
    return [{"layer": r.layer, "head": r.head, **r.shares} for r in rows]
