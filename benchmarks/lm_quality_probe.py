"""Probe a stateful variant of the LM-quality experiment past its training length (issue 21: why MAG's held-out
perplexity rises with length).

    .venv/bin/python benchmarks/lm_quality_probe.py RUN_DIR --variant mag [--seeds 0 1 2] [--json OUT.json]

RUN_DIR is a `python -m memtrain.train.experiment lm_quality --run-dir RUN_DIR` directory (RUN_DIR/base.toml and
RUN_DIR/VARIANT/seedS). On the experiment's held-out text at its longest length (data.seq_len × the last
eval multiple, the same sequences as its results.csv), the model reads each sequence three ways:

- `carried_piece`: pieces of experiment.eval_piece tokens (`--eval-piece`, the preset's 1,024 by default) with the state carried (what results.csv reports);
- `carried_train`: pieces of data.seq_len tokens (the training length) with the state carried;
- `reset_train`: pieces of data.seq_len tokens, each from a fresh state: nothing crosses a training-length
  boundary, so every token sees at most what it saw in training (the text is the same).

For each it prints the perplexity of every training-length slice of positions (slice i = tokens
i·seq_len .. (i+1)·seq_len − 1). If the carried readings rise from slice to slice and the reset reading stays flat,
what degrades is the state carried past the training length. Titans models also report, after each training-length
piece of `carried_train`, the Frobenius norm of every layer's memory weights (mean over batch and heads; a deep
memory: its first layer), which shows whether the carried memory grows past the range training saw, and the mean
gates θ, η, α per layer over the first training-length piece (fresh state), with what forgetting alone keeps of
the memory over one training length.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_norms(state) -> list[float] | None:
    """Per layer: ‖W‖_F of the memory weights (first memory layer), mean over batch and heads; None if the model
    has no Titans memory state."""
    layers = getattr(state, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        mem = getattr(layer, "memory", None)
        if mem is None:
            return None
        W = mem.memory[0]
        W = W[0] if isinstance(W, (tuple, list)) else W  # deep memory: its first layer `[B, H, out, in]`
        out.append(round(float(W.float().flatten(2).norm(dim=-1).mean()), 4))
    return out


@torch.no_grad()
def read(model, tokens: torch.Tensor, targets: torch.Tensor, piece: int, carry: bool):
    """Next-token losses `[B, T]`, and the memory norms after each piece (when carrying a Titans state)."""
    losses, norms, state = [], [], None
    for start in range(0, tokens.shape[1], piece):
        result = model(tokens[:, start:start + piece], state=state if carry else None)
        state = result.state
        losses.append(F.cross_entropy(result.logits.float().flatten(0, 1), targets[:, start:start + piece].flatten(),
                                      reduction="none").view(tokens.shape[0], -1))
        if carry:
            norms.append(memory_norms(state))
    return torch.cat(losses, dim=1), norms


def probe(run_dir: Path, variant: str, seed: int, eval_piece: int) -> dict:
    from memtrain.model.memory import memory_spec
    from memtrain.train.experiment.lm_quality import held_out, read_rows
    from memtrain.train.inspect.load import load_checkpoint_model
    from memtrain.train.configtree import build, read_toml
    from memtrain.train.config import Config

    cfg = build(Config, read_toml(run_dir / "base.toml", what="config", where=str(run_dir)), "")
    model = load_checkpoint_model(run_dir / variant / f"seed{seed}").model
    if not memory_spec(model.cfg.memory).stateful:
        raise SystemExit(f"error: {variant} carries no state between calls: nothing to probe")
    rows, seq = read_rows(run_dir / "results.csv"), cfg.data.seq_len
    exp_longest = max(int(r["length"]) for r in rows)  # the experiment's longest evaluation and its sequences
    sequences = min(int(r["sequences"]) for r in rows if int(r["length"]) == exp_longest)
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, exp_longest)
    tokens, targets = held_out(cfg, exp_longest, exp_longest, sequences)
    out = {"variant": variant, "seed": seed, "length": exp_longest, "sequences": tokens.shape[0], "slice": seq}
    for name, piece, carry in (("carried_piece", eval_piece, True), ("carried_train", seq, True),
                               ("reset_train", seq, False)):
        losses, norms = read(model, tokens, targets, piece, carry)
        out[name] = {"piece": piece, "perplexity": round(math.exp(float(losses.mean())), 3),
                     "by_slice": [round(math.exp(float(c.mean())), 2) for c in losses.split(seq, dim=1)]}
        if name == "carried_train" and norms and norms[0] is not None:
            out["memory_norm_after_piece"] = norms  # [piece][layer]
    gates = gate_means(model, tokens[:, :seq])
    if gates is not None:
        out["gates_first_train_piece"] = gates
    return out


def gate_means(model, tokens: torch.Tensor) -> dict | None:
    """Titans gates over `tokens` `[B, seq]` read from a fresh state (the regime training saw), per layer: the mean
    θ, η, α over batch, heads and tokens, the geometric mean of 1 − α (the share of the memory forgetting keeps per
    token) and its power seq (what forgetting alone keeps of the memory over one training length). None for a
    model without Titans gates."""
    from memtrain.train.inspect.gates import titans_gates
    from memtrain.train.inspect.load import InspectError
    try:
        g = titans_gates(model, tokens)  # name -> [L, B, H, T]
    except InspectError:
        return None
    log_keep = torch.log1p(-g["alpha"].double().clamp(max=1 - 1e-12)).mean(dim=(1, 2, 3))  # [L]
    def sig(t: torch.Tensor, digits: int = 4) -> list[float]:
        return [float(f"{float(x):.{digits}g}") for x in t]
    return {name: sig(g[name].mean(dim=(1, 2, 3))) for name in ("theta", "eta", "alpha")} | {
        "keep_per_token": sig(log_keep.exp(), 6), "keep_over_train_length": sig((log_keep * tokens.shape[1]).exp())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-piece", type=int, default=1024, help="the experiment's experiment.eval_piece")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    found = [probe(args.run_dir, args.variant, s, args.eval_piece) for s in args.seeds]
    for r in found:
        print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
