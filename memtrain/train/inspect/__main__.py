"""`python -m memtrain.train.inspect {registers,attention,registers-experiment} ...` — look inside a trained model.

    python -m memtrain.train.inspect registers --checkpoint CKPT --text FILE --out DIR [--k 10] [--seq-len T] [--max-windows 8]
    python -m memtrain.train.inspect attention --checkpoint CKPT --text FILE --out DIR [--seq-len T] [--segment -1]
    python -m memtrain.train.inspect registers-experiment --config configs/experiments/registers.toml \
        [--run-dir runs/registers] [--out docs/results/registers]

CKPT is a checkpoint directory or a run directory (its newest complete checkpoint); tp=1 checkpoints only. The
text is tokenized with the dataset tokenizer named by the checkpoint's config (data.path's manifest) unless
--tokenizer is given. User errors print one line `error: ...` on stderr and exit with code 2. See docs/inspect.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memtrain.model.memory import memory_spec

from .load import InspectError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train.inspect", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("registers", "hidden-state norms, high-norm outliers and attention shares per layer"),
                        ("attention", "attention maps per layer and head, memory quadrant shares, Titans gates")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest one)")
        s.add_argument("--text", required=True, help="UTF-8 text file to run through the model")
        s.add_argument("--out", required=True, help="output directory (created; files in it are overwritten)")
        s.add_argument("--seq-len", type=int, default=0, help="tokens per window (default: the run's data.seq_len)")
        s.add_argument("--tokenizer", help="sentencepiece model (default: the training dataset's)")
        if name == "registers":
            s.add_argument("--k", type=float, default=10.0, help="outlier: norm > k × the layer's median text norm")
            s.add_argument("--max-windows", type=int, default=8, help="consecutive windows of the text to run")
        else:
            s.add_argument("--segment", type=int, default=-1,
                           help="RMT: which segment pass to draw (default -1: the last); shares average all")
    e = sub.add_parser("registers-experiment", help="train 0/1/4/16 meta tokens, inspect each, summarise")
    e.add_argument("--config", required=True, help="experiment preset, e.g. configs/experiments/registers.toml")
    e.add_argument("--run-dir", default="runs/registers", help="where the training runs go (resumable)")
    e.add_argument("--out", default="docs/results/registers", help="where the summary, tables and plots go")
    return p.parse_args(argv)


def _prepare(args: argparse.Namespace, max_windows: int):
    from .load import load_checkpoint_model, text_windows
    loaded = load_checkpoint_model(Path(args.checkpoint), args.tokenizer)
    seq_len = args.seq_len or loaded.cfg.data.seq_len
    if seq_len > loaded.cfg.model.max_seq_len:
        raise InspectError(f"--seq-len {seq_len} is longer than the model takes (model.max_seq_len="
                           f"{loaded.cfg.model.max_seq_len})")
    ids = text_windows(loaded.tokenizer, Path(args.text), seq_len, max_windows)
    if int(ids.max()) >= loaded.cfg.model.vocab_size:
        raise InspectError(f"the tokenizer gives ids up to {int(ids.max())}, beyond the model's vocabulary "
                           f"{loaded.cfg.model.vocab_size}: pass the training tokenizer with --tokenizer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return loaded, ids, out


def run_registers(args: argparse.Namespace) -> Path:
    """The `registers` subcommand; returns the markdown file written."""
    from . import plots, registers
    from .capture import run_captured
    if args.k <= 0:
        raise InspectError(f"--k must be positive, got {args.k}")
    loaded, ids, out = _prepare(args, args.max_windows)
    kind = loaded.cfg.model.memory
    if "registers" not in memory_spec(kind).inspect:  # e.g. Titans: the capture covers their maps, not registers
        raise InspectError(f"registers is not available for model.memory={kind!r} yet (the attention "
                           f"subcommand is)")
    trace = run_captured(loaded.model, ids)
    rep = registers.analyse(trace, ids, lambda t: loaded.tokenizer.decode([t]), k=args.k)
    title = f"Registers: {loaded.ckpt} (step {loaded.step})"
    (out / "registers.md").write_text(registers.markdown(rep, title))
    (out / "registers.json").write_text(json.dumps(
        {"checkpoint": str(loaded.ckpt), "step": loaded.step, **rep.to_json()}, indent=1))
    plots.plot_norms(rep, out / "norms.png", f"Hidden-state norms, {rep.num_meta} meta tokens")
    plots.plot_shares(rep, out / "attention_share.png", f"Attention shares, {rep.num_meta} meta tokens")
    return out / "registers.md"


def _gates_section(model, ids, out: Path, kind: str) -> list[str]:
    """Titans gates θ, η, α along the text: writes gates.png and gates.json to `out`; returns markdown lines."""
    from . import plots
    from .gates import titans_gates
    gates = titans_gates(model, ids)
    mean = {name: g[:, 0].mean(1) for name, g in gates.items()}  # [L, T], mean over memory heads
    plots.plot_gates(mean, out / "gates.png", f"Titans {kind} gates along the text")
    table = {name: [{"layer": layer, "mean": float(g[layer].mean()), "min": float(g[layer].min()),
                     "max": float(g[layer].max())} for layer in range(g.shape[0])] for name, g in gates.items()}
    (out / "gates.json").write_text(json.dumps(table, indent=1))
    lines = ["## Memory gates", "", "Mean over heads and text:", "",
             "| layer | θ (step) | η (momentum) | α (forget) |", "|---|---|---|---|"]
    for layer in range(len(table["theta"])):
        lines.append(f"| {layer} | " + " | ".join(f"{table[n][layer]['mean']:.3f}" for n in ("theta", "eta", "alpha"))
                     + " |")
    return lines + ["", "![gates](gates.png)"]


def run_attention(args: argparse.Namespace) -> Path:
    """The `attention` subcommand; returns the markdown file written."""
    from . import attention_maps, plots
    loaded, ids, out = _prepare(args, 1)
    model, kind = loaded.model, loaded.cfg.model.memory
    lines = [f"# Attention: {loaded.ckpt} (step {loaded.step})", "",
             f"Text: {args.text}, {ids.shape[1]} tokens; model.memory = {kind!r}, "
             f"{loaded.cfg.model.num_meta_tokens} meta tokens.", ""]
    gates = "gates" in memory_spec(kind).inspect  # Titans-style memories: their gates go with the maps
    if gates:
        from .titans_capture import no_attention_reason
        reason = no_attention_reason(model)
        if reason:  # LMM: the memory alone, nothing to draw but the gates
            print(f"attention maps: {reason}; writing gates only")
            lines += [f"No attention maps: {reason}.", "", *_gates_section(model, ids, out, kind)]
            (out / "attention.md").write_text("\n".join(lines) + "\n")
            return out / "attention.md"
    from .capture import run_captured
    trace = run_captured(model, ids)
    if not -len(trace.passes) <= args.segment < len(trace.passes):
        raise InspectError(f"--segment {args.segment} is out of range: the text ran in {len(trace.passes)} pass(es)")
    shown = trace.passes[args.segment]
    info = {"checkpoint": str(loaded.ckpt), "regions": shown.regions, "passes": len(trace.passes)}
    if shown.key_regions:  # Titans MAC: keys [persistent ‖ retrieved ‖ segment], see titans_capture.py
        rows = attention_maps.key_shares(trace)
        note = (f"Titans MAC: per segment, text queries attend to [persistent ‖ retrieved ‖ segment]; maps show "
                f"queries {shown.regions} against keys {shown.key_regions} (retrieved column j is token j's memory "
                f"read h_j, segment column j is token j).")
        info.update(key_regions=shown.key_regions, shares=attention_maps.key_shares_json(rows))
        text = attention_maps.key_shares_markdown(rows, lines[0][2:], "\n".join(lines[2:]) + note)
    else:
        rows = attention_maps.quadrants(trace)
        memory = " + ".join(name for name in shown.regions if name != "text")  # e.g. meta + read + write
        note = (f"Memory = {memory}. {len(trace.passes)} pass(es) (RMT: one per segment); maps show pass "
                f"{args.segment % len(trace.passes)} with regions {shown.regions}.")
        if gates:
            note += f" Titans {kind.upper()}: attention over the meta-token prefix + a sliding window of text."
        info.update(quadrants=attention_maps.to_json(rows))
        text = attention_maps.markdown(rows, lines[0][2:], "\n".join(lines[2:]) + note)
    for layer, probs in enumerate(shown.probs):
        keys = f", keys {shown.key_regions}" if shown.key_regions else ""
        plots.plot_attention_layer(probs[0], shown.regions, layer, out / f"attention_layer{layer}.png",
                                   f"block {layer}: attention probabilities, regions {shown.regions}{keys}",
                                   key_regions=shown.key_regions or None)
    (out / "attention.json").write_text(json.dumps(info, indent=1))
    text += "\n" + "\n".join(f"![block {i}](attention_layer{i}.png)" for i in range(len(shown.probs))) + "\n"
    if gates:
        text += "\n" + "\n".join(_gates_section(model, ids, out, kind)) + "\n"
    (out / "attention.md").write_text(text)
    return out / "attention.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from memtrain.data.errors import DataError
    from memtrain.train.configtree import ConfigError
    try:
        if args.command == "registers":
            print(f"wrote {run_registers(args)}")
        elif args.command == "attention":
            print(f"wrote {run_attention(args)}")
        else:
            from .experiment import run_experiment
            print(f"wrote {run_experiment(Path(args.config), Path(args.run_dir), Path(args.out))}")
    except (InspectError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
