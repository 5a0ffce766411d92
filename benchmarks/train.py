"""Training throughput and MFU per parallel layout, as ratios to the single-process run measured alongside.

    python benchmarks/train.py [--steps 30] [--data data_cache/stdlib] [--layouts single dp2 tp2 dp2-zero3]
    python benchmarks/train.py --gpu --config configs/gpu_1b.toml     # on a CUDA machine: MFU at ~1B

One JSON line per layout: median tokens/s and MFU over the steps after warm-up (MFU formula in
train/flops.py, stated in each line), and tokens/s relative to `single`. Every run goes through the real
launcher (launch/run.sh), so the numbers include what a user gets.
"""
from __future__ import annotations

import argparse
import json
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
}
SMALL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.num_meta_tokens=16",
         "model.window=128", "model.global_layers=[-1]", "data.seq_len=256", "data.batch_size=4",
         "schedule.warmup_steps=2", "logging.progress=false", "checkpoint.keep=1"]


def run_layout(name: str, args: argparse.Namespace, port: int) -> dict:
    ranks, extra = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [*SMALL, *extra, f"schedule.steps={args.steps}", f"data.path=\"{args.data}\"", "device=\"cpu\""]
        cmd = [str(ROOT / "launch" / "run.sh"), "--nproc", str(ranks), "--master-port", str(port), "--",
               "--config", "configs/demo.toml", "--run-dir", run_dir]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return {"layout": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 3:]  # drop start-up steps (allocation, DeepSpeed set-up)
    return {"layout": name, "ranks": ranks, "steps": len(rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady), "final_loss": rows[-1]["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data", default="data_cache/stdlib")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--gpu", action="store_true", help="one CUDA run of --config, reporting its MFU")
    p.add_argument("--config", default="configs/gpu_1b.toml")
    args = p.parse_args()
    from tests.dist.spawn import free_port
    from train.flops import FORMULA
    if args.gpu:
        return run_gpu(args)
    base = None
    for name in args.layouts:
        result = run_layout(name, args, free_port())
        if name == "single" and "error" not in result:
            base = result["tokens_per_s"]
        if base and "tokens_per_s" in result:
            result["tokens_per_s_vs_single"] = result["tokens_per_s"] / base
        result["mfu_formula"] = FORMULA
        print(json.dumps(result), flush=True)
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    """MFU of --config on this CUDA machine for the baseline and each memory variant the config lists."""
    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"error": "--gpu needs a CUDA device"}))
        return 2
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "train", "--config", args.config, "--run-dir", run_dir,
               "--set", f"schedule.steps={args.steps}", "--set", "logging.progress=false"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(json.dumps({"config": args.config, "error": proc.stderr.strip().splitlines()[-1][:300]}))
            return 1
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 3:]
    print(json.dumps({"config": args.config, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
                      "mfu": statistics.median(r["mfu"] for r in steady)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
