"""Training throughput and MFU per parallel layout, as ratios to the single-process run measured alongside.

    python benchmarks/train.py [--steps 30] [--data data_cache/stdlib] [--layouts single dp2 tp2 pp2 cp2 dp2-zero3]
                               [--memory none mac]
    python benchmarks/train.py --gpu --config configs/gpu_1b.toml     # on a CUDA machine: MFU at ~1B,
                                                                      # baseline, MAC and MAG (--memory)

One JSON line per model and layout: median tokens/s and MFU over the steps after warm-up (MFU formula in
memtrain/train/flops.py, stated in each line), and tokens/s relative to `single` of the same model. Every CPU run goes
through the real launcher (memtrain/launch/run.sh), so the numbers include what a user gets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {  # name: (ranks, extra --set overrides)
    "single": (1, ["parallel.engine=\"torch\""]),
    "dp2": (2, ["parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "optim.grad_accum=2", "data.batch_size=2"]),  # same 4 sequences a step
    "cp2": (2, ["parallel.cp=2"]),  # each rank half of every sequence: the same 4 sequences a step
}
MEMORY = {  # model.memory: extra --set overrides (MAC segments of 64 on the 256-token sequences)
    "none": [],
    "mac": ["model.memory=\"mac\"", "model.titans.segment_len=64"],
    "mag": ["model.memory=\"mag\""],
    "rmt": ["model.memory=\"rmt\"", "model.rmt.segment_len=64", "model.rmt.num_memory=8"],
}
SMALL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.num_meta_tokens=16",
         "model.window=128", "model.global_layers=[-1]", "data.seq_len=256", "data.batch_size=4",
         "schedule.warmup_steps=2", "optim.lr=5e-4",  # demo.toml's 2e-3 sends MAC to NaN within 3 steps here
         "logging.progress=false", "checkpoint.keep=1"]


def run_layout(name: str, memory: str, args: argparse.Namespace, port: int) -> dict:
    ranks, extra = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [*SMALL, *MEMORY[memory], *extra, f"schedule.steps={args.steps}", f"data.path=\"{args.data}\"",
                "device=\"cpu\""]
        cmd = [str(ROOT / "memtrain" / "launch" / "run.sh"), "--nproc", str(ranks), "--master-port", str(port), "--",
               "--config", "configs/demo.toml", "--run-dir", run_dir]
        for s in sets:
            cmd += ["--set", s]
        # one thread per rank by default: layouts compare by ranks, and an intra-op thread pool on a busy
        # (shared) machine stalls on every parallel region, which would slow the single process most
        threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            return {"memory": memory, "layout": name,
                    "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 3:]  # drop start-up steps (allocation, DeepSpeed set-up)
    return {"memory": memory, "layout": name, "ranks": ranks, "threads_per_rank": threads, "steps": len(rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady), "final_loss": rows[-1]["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data", default="data_cache/stdlib")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="OMP_NUM_THREADS of every rank (0: the machine's cores divided by the ranks)")
    p.add_argument("--memory", nargs="+", choices=list(MEMORY), default=None,
                   help="model.memory variants (default: none on CPU; none, mac, mag with --gpu)")
    p.add_argument("--gpu", action="store_true", help="CUDA runs of --config (one per --memory), reporting MFU")
    p.add_argument("--config", default="configs/gpu_1b.toml")
    args = p.parse_args()
    from tests.dist.spawn import free_port
    from memtrain.train.flops import FORMULA
    if args.gpu:
        return run_gpu(args)
    for memory in args.memory or ["none"]:
        base = None
        for name in args.layouts:
            result = run_layout(name, memory, args, free_port())
            if name == "single" and "error" not in result:
                base = result["tokens_per_s"]
            if base and "tokens_per_s" in result:
                result["tokens_per_s_vs_single"] = result["tokens_per_s"] / base
            result["mfu_formula"] = FORMULA
            print(json.dumps(result), flush=True)
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    """MFU of --config on this CUDA machine for the baseline and each --memory variant (default none, mac, mag)."""
    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"error": "--gpu needs a CUDA device"}))
        return 2
    failed = 0
    for memory in args.memory or ["none", "mac", "mag"]:
        with tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, "-m", "memtrain.train", "--config", args.config, "--run-dir", run_dir,
                   "--set", f"schedule.steps={args.steps}", "--set", "logging.progress=false",
                   "--set", f"model.memory=\"{memory}\""]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"config": args.config, "memory": memory,
                                  "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}), flush=True)
                failed = 1
                continue
            rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        steady = rows[len(rows) // 3:]
        print(json.dumps({"config": args.config, "memory": memory,
                          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
                          "mfu": statistics.median(r["mfu"] for r in steady)}), flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
