"""Sharded checkpoints: save time, load time and bytes written per rank vs world size and layout.

    python benchmarks/checkpoint.py --data /tmp/ckbench_data              # all layouts, 3 repeats
    python benchmarks/checkpoint.py --data DIR --layouts dp2-z3 tp2 --repeats 2 --json out.json

The dataset: `python -m memtrain.data.prepare --source stdlib --max-files 40 --vocab-size 512 --out DIR --quiet
--val-every 10`. Each layout runs a real `Trainer` on N gloo ranks on the CPU (tests/dist/spawn.py `run_ranks`;
one spawn per world size, layouts of the same size run one after the other in it): one training step (so the
AdamW moments exist and are non-zero), then `--repeats` checkpoints, then `--repeats` loads of the last one.

* save: `Trainer.save()` (DCP tensors + rank files + meta.json, rank 0's fsync and rename), barrier before and
  after, the maximum over ranks; each repeat writes a new step directory.
* load: `trainer.engine.load(path, state)` (the sharded tensors read into this rank's rectangles and the small
  engine state restored), barrier before and after, the maximum over ranks. The files were just written, so they
  are read from the page cache: this is the CPU/DCP cost of a load, not the disk's.
* bytes per rank: the size of the rank's `state/__<rank>_0.distcp` (its rectangles of weights and moments) and,
  separately, of its `rank<NNNNN>.pt` (stream, RNG, schedule).
* rectangles: the chunks the checkpoint's metadata lists (a whole tensor, a TP shard, or up to three pieces of
  each ZeRO flat partition; each is its own record in a .distcp file).
* full replica: 12 bytes x parameters (fp32 weights + two AdamW moments), what every data-parallel rank wrote
  before checkpoints were sharded; "logical" is the same count read from the checkpoint's own metadata.

Times are medians of the repeats. Ranks share the machine's cores (one thread each), so times at 4 ranks on 2
cores include waiting for a core.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name: (world size, overrides)
LAYOUTS = {
    "dp1": (1, []),
    "dp2-z0": (2, ["parallel.zero_stage=0"]),
    "dp2-z1": (2, ["parallel.zero_stage=1"]),
    "dp2-z3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp4-z0": (4, ["parallel.zero_stage=0"]),
    "dp4-z1": (4, ["parallel.zero_stage=1"]),
    "dp4-z3": (4, ["parallel.zero_stage=3"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


def _overrides(args: dict, layout: str) -> list[str]:
    return [f"model.d_model={args['d_model']}", f"model.n_layers={args['layers']}", f"model.n_heads={args['heads']}",
            f"model.n_kv_heads={args['kv_heads']}", "model.vocab_size=512", "data.seq_len=64", "data.batch_size=2",
            "optim.grad_accum=1", "schedule.warmup_steps=1", "schedule.steps=100", "logging.progress=false",
            'device="cpu"', "checkpoint.keep=100", f'data.path="{args["data"]}"', *LAYOUTS[layout][1]]


def _max(value: float) -> float:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def _one_layout(rank: int, world: int, layout: str, args: dict) -> dict:
    from memtrain.train.checkpoint import load_checkpoint
    from memtrain.train.config import load_config
    from memtrain.train.sharded import _reader, saved_names
    from memtrain.train.trainer import Trainer

    cfg = load_config(None, _overrides(args, layout))
    run = Path(args["root"]) / layout
    trainer = Trainer(cfg, run)
    stream = iter(trainer.stream)
    trainer.train_step([next(stream) for _ in range(cfg.optim.grad_accum)])
    saves, path = [], None
    for i in range(args["repeats"]):
        trainer.step = 1 + i
        _barrier()
        t0 = time.perf_counter()
        path = trainer.save()
        _barrier()
        saves.append(_max(time.perf_counter() - t0))
    engine_state = load_checkpoint(path, trainer.layout.rank)[0]["engine"]
    loads = []
    for _ in range(args["repeats"]):
        _barrier()
        t0 = time.perf_counter()
        trainer.engine.load(path, engine_state)
        _barrier()
        loads.append(_max(time.perf_counter() - t0))
    out = {"distcp": (path / "state" / f"__{rank}_0.distcp").stat().st_size,
           "rank_file": (path / f"rank{rank:05d}.pt").stat().st_size,
           "layout": {k: getattr(trainer.layout, k) for k in ("world", "dp", "tp", "pp")}}
    if rank == 0:
        sizes = saved_names(path / "state")
        metadata = _reader(path / "state").read_metadata()
        out.update(save_s=saves, load_s=loads, engine=type(trainer.engine).__name__,
                   params=sum(r * c for n, (r, c) in sizes.items() if n.startswith("model.")),
                   logical_bytes=4 * sum(r * c for r, c in sizes.values()),
                   metadata_bytes=(path / "state" / ".metadata").stat().st_size,
                   rectangles=sum(len(md.chunks) for md in metadata.state_dict_metadata.values()),
                   files={p.name: p.stat().st_size for p in sorted((path / "state").iterdir())})
    if trainer.writer is not None:
        trainer.writer.close()
    return out


def _group(rank: int, world: int, layouts: list[str], args: dict) -> dict:
    """Every layout of this world size, one after the other in the same ranks."""
    from megatron.core import parallel_state
    results = {}
    for layout in layouts:
        results[layout] = _one_layout(rank, world, layout, args)
        gc.collect()
        _barrier()
        if parallel_state.model_parallel_is_initialized():  # the next layout builds its own TP/PP groups
            parallel_state.destroy_model_parallel()
    return results


def _single(args: dict) -> dict:
    """dp1 in this process (no process group: the one-process trainer)."""
    return {"dp1": _one_layout(0, 1, "dp1", args)}


def measure(args: dict) -> dict[str, dict]:
    from tests.dist.spawn import run_ranks
    by_world: dict[int, list[str]] = {}
    for name in args["layouts"]:
        by_world.setdefault(LAYOUTS[name][0], []).append(name)
    rows = {}
    for world, names in sorted(by_world.items()):
        t0 = time.perf_counter()
        if world == 1:
            per_rank = [_single(args)]
        else:
            per_rank = run_ranks(_group, world, names, args)
        print(f"# world {world}: {', '.join(names)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for name in names:
            row = dict(per_rank[0][name])
            row["distcp_per_rank"] = [r[name]["distcp"] for r in per_rank]
            row["rank_file_per_rank"] = [r[name]["rank_file"] for r in per_rank]
            row["world"] = world
            rows[name] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    mb = 1e6
    lines = ["| layout | ranks | engine | save s (median) | load s (median) | .distcp MB per rank | max / full replica "
             "| sum .distcp MB | rectangles | rank file KB per rank |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for name, r in rows.items():
        full = 12 * r["params"]
        per = r["distcp_per_rank"]
        lines.append(f"| {name} | {r['world']} | {r['engine']} | {statistics.median(r['save_s']):.2f} | "
                     f"{statistics.median(r['load_s']):.2f} | {' / '.join(f'{b / mb:.1f}' for b in per)} | "
                     f"{max(per) / full:.2f} | {sum(per) / mb:.1f} | {r['rectangles']} | "
                     f"{' / '.join(f'{b / 1e3:.1f}' for b in r['rank_file_per_rank'])} |")
    return "\n".join(lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} CPUs (os.cpu_count), {platform.system()} {platform.release()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared dataset (see the module docstring)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", help="where the runs are written (default: a temporary directory, removed after)")
    p.add_argument("--json", help="also write every measurement (per repeat, per rank) to this file")
    a = p.parse_args()
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ckbench-") as tmp:
        args = {"data": str(Path(a.data).resolve()), "layouts": a.layouts, "d_model": a.d_model, "layers": a.layers,
                "heads": a.heads, "kv_heads": a.kv_heads, "repeats": a.repeats, "root": a.root or tmp}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        rows = measure(args)
        total = time.perf_counter() - t0
    params = next(iter(rows.values()))["params"]
    head = (f"model: d_model {a.d_model}, {a.layers} layers, {a.heads} heads ({a.kv_heads} kv), vocab 512: "
            f"{params:,} parameters; full replica (12 B x params) = {12 * params / 1e6:.1f} MB; "
            f"{a.repeats} repeats; {machine()}; torch {torch.__version__}; {total:.0f} s in all; "
            f"1-minute load average at the start {load:.1f}")
    print(head)
    print()
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "args": {k: v for k, v in args.items() if k != "root"},
                                            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
