"""`python -m memtrain.train.plan` (= `memtrain plan`): print the per-rank memory of a config's layout, or with
--search every layout that fits, best first. Bad input: one line on stderr, exit code 2 (docs/planner.md)."""
from __future__ import annotations

import argparse
import sys

from . import activations
from .memory import GiB, Plan, plan_layout, search_layouts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train.plan",
                                description="Per-rank memory of a training step, before launching it.")
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--world", required=True, type=int, help="number of ranks (GPUs) the run would use")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GIB", help="memory of one GPU in GiB")
    p.add_argument("--reserve", type=float, default=0.1, metavar="FRACTION",
                   help="fraction of --gpu-mem kept for the CUDA context, NCCL and allocator fragmentation "
                        "(default 0.1)")
    p.add_argument("--search", action="store_true",
                   help="rank every layout (tp, pp, ZeRO stage, activation checkpointing) that fits --gpu-mem")
    p.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set parallel.tp=4 (repeatable)")
    return p.parse_args(argv)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if abs(x) >= GiB / 4 or x == 0 else f"{x / 2**20:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(plan: Plan, cfg, usable: float | None = None, gpu_mem: float | None = None) -> str:
    """The plan as a table: one column per distinct rank (pipeline stage)."""
    lay, m = plan.layout, cfg.model
    w = "fp32" if plan.precision == "fp32" else "bf16"
    head = [f"layout: {lay}", f"engine: {plan.engine}, {plan.precision}, on {plan.device}",
            f"model: memory={m.memory}, {_count(plan.total_params)} parameters; micro-batch {cfg.data.batch_size} × "
            f"{cfg.data.seq_len} tokens, grad_accum {cfg.optim.grad_accum}"]
    rows: list[tuple[str, list[str]]] = [
        ("parameters / rank", [_count(r.params) for r in plan.ranks]),
        (f"weights ({'fp32' if plan.engine in ('torch', 'own pipeline') else w})", [_gib(r.weights) for r in plan.ranks]),
        ("gradients", [_gib(r.gradients) for r in plan.ranks]),
        ("fp32 master weights", [_gib(r.master) for r in plan.ranks]),
        ("AdamW moments (fp32)", [_gib(r.optimizer) for r in plan.ranks]),
        ("ZeRO reduce bucket", [_gib(r.buckets) for r in plan.ranks]),
        ("activations / micro-batch", [_gib(r.per_micro_batch) for r in plan.ranks]),
        ("micro-batches in flight", [str(r.in_flight) for r in plan.ranks]),
        ("activations held", [_gib(r.activations) for r in plan.ranks]),
    ]
    label = activations.estimate(m).STATE_LABEL  # the kind's own (memtrain/model/memory/<kind>/plan.py)
    if label:
        rows.append((f"  of which {label}", [_gib(r.memory_state) for r in plan.ranks]))
    rows += [("gradients held in backward", [_gib(r.grads_in_backward) for r in plan.ranks]),
             ("backward transient", [_gib(r.transient_backward) for r in plan.ranks]),
             ("optimizer-step transient", [_gib(r.transient_step) for r in plan.ranks]),
             ("peak", [_gib(r.peak) for r in plan.ranks])]
    if usable is not None:
        rows.append((f"fits {gpu_mem:g} GiB ({_gib(usable)} usable)",
                     [("yes" if r.peak <= usable else "NO") + f", headroom {(usable - r.peak) / GiB:+.2f} GiB"
                      for r in plan.ranks]))
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(len(r.label), *(len(v[i]) for _, v in rows)) + 2 for i, r in enumerate(plan.ranks)]
    lines = head + ["", " " * width + "".join(r.label.rjust(c) for r, c in zip(plan.ranks, cols))]
    lines += [name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cols)) for name, values in rows]
    return "\n".join(lines + [f"note: {n}" for n in plan.notes])


def _load(args):
    from memtrain.train.config import load_config
    from memtrain.train.configtree import ConfigError
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:  # as the trainer does: the prepared dataset's vocabulary
        try:
            from memtrain.data.manifest import load_manifest
            cfg.model.vocab_size = load_manifest(cfg.data.path, retries=1, retry_delay=0.0).vocab_size
        except Exception:  # any failure to read it means the same fix
            raise ConfigError(f"model.vocab_size is 0 and data.path={cfg.data.path!r} has no prepared dataset to take "
                              f"it from: set model.vocab_size (e.g. --set model.vocab_size=32000)") from None
    return cfg


def run(args) -> int:
    from memtrain.train.configtree import ConfigError
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        raise ConfigError(f"--gpu-mem={args.gpu_mem} must be a positive number of GiB, e.g. --gpu-mem 80")
    if not 0 <= args.reserve < 1:
        raise ConfigError(f"--reserve={args.reserve} must lie in [0, 1), e.g. 0.1")
    if args.search and args.gpu_mem is None:
        raise ConfigError("--search ranks the layouts that fit a GPU: give its memory with --gpu-mem GIB")
    if args.world < 1:
        raise ConfigError(f"--world={args.world} must be >= 1 (the number of ranks)")
    cfg = _load(args)
    usable = None if args.gpu_mem is None else args.gpu_mem * GiB * (1 - args.reserve)
    if not args.search:
        plan = plan_layout(cfg, args.world)
        print(f"memtrain plan: {args.config} on {args.world} ranks")
        print(format_plan(plan, cfg, usable, args.gpu_mem))
        return 0 if usable is None or plan.peak <= usable else 1
    plans = search_layouts(cfg, args.world, usable)
    if not plans:
        print(f"memtrain plan: no layout of {args.world} ranks fits {args.gpu_mem:g} GiB (reserve {args.reserve:g}); "
              f"use more ranks, a shorter data.seq_len or a smaller data.batch_size", file=sys.stderr)
        return 1
    print(f"memtrain plan: {len(plans)} layouts of {args.world} ranks fit {args.gpu_mem:g} GiB "
          f"({_gib(usable)} usable), best first (docs/planner.md#search)")
    print(f"{'#':>3}  {'tp':>3} {'pp':>3} {'cp':>3} {'dp':>4}  {'ZeRO':>4}  {'checkpoint':<10} {'peak':>11} "
          f"{'headroom':>11}")
    for i, p in enumerate(plans[: args.top], 1):
        lay = p.layout
        print(f"{i:>3}  {lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {lay.dp:>4}  {lay.zero_stage:>4}  {lay.checkpoint:<10} "
              f"{_gib(p.peak):>11} {_gib(usable - p.peak):>11}")
    print()
    print(format_plan(plans[0], cfg, usable, args.gpu_mem))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from memtrain.launch.config import LayoutError
    from memtrain.model.errors import ModelConfigError
    from memtrain.train.configtree import ConfigError
    try:
        return run(args)
    except (ConfigError, LayoutError, ModelConfigError) as e:
        print(f"memtrain plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
