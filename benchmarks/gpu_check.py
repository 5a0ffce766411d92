"""GPU acceptance check: kernel parity, training MFU and long-context memory on one CUDA device, in one JSON file.

    python benchmarks/gpu_check.py --out docs/results/gpu_check_<device>.json    # one H100: under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json           # CPU, tiny sizes (CI)
    python benchmarks/gpu_check.py --only attention titans [--data DIR] [--config configs/gpu_1b.toml]

Prints one JSON line per measurement as it goes and writes them all, with the device name and the torch /
flash-attn / triton versions, to --out. Every entry has a "status": pass / fail (where a tolerance applies),
ok (measured, no tolerance), oom, "skipped: <why>" or "error: <message>". Exit code 0 unless an entry failed or
errored. Timings are only compared as ratios within the same run (medians after a warm-up call, synchronized).

Checks:
1. attention  sdpa, flex and flash-attn (bf16) against the reference (fp64, the spec) for the prefix + sliding-window
              mask at several (N, P, W), odd sizes included: max abs / relative errors of out, dq, dk, dv, and the
              forward + backward time of each backend as a ratio to sdpa.
2. titans     the Triton linear-memory kernel and the fused deep memory (fp32) against the naive chunk loop of
              memtrain/kernels/titans/reference.py (fp64), forward (y and state) and backward (every input and the
              initial state), odd T, chunk sizes 16 and 64; forward + backward time as a ratio to the chunked torch path.
3. training   30 bf16 steps (DeepSpeed engine) of configs/gpu_1b.toml per memory kind (none, mac, mag) through
              `python -m memtrain.train`: median tokens/s and MFU of the steps after the first third (the trainer's
              metrics.jsonl; MFU formula in memtrain/train/flops.py). Data: --data, else a small stdlib dataset
              prepared on the fly with memtrain.data.prepare.
4. memory     peak torch.cuda.max_memory_allocated of one forward + backward of a MAC model (fp32, the training step
              of benchmarks/scaling.py) at 8k, 32k and 128k tokens; an out-of-memory is recorded as "oom".

--dry-run runs the same code paths on CPU at tiny sizes in well under 2 minutes: fp32 instead of bf16, the Triton
kernel under TRITON_INTERPRET=1, flash and flex (no CPU backward) "skipped: needs CUDA", two steps of a tiny model
per memory kind (fp32, torch engine), and for memory the growth of the process's peak RSS (ru_maxrss).
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # Triton picks interpreted vs compiled when a kernel is decorated, i.e. at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType, SimpleNamespace  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SKIP_CUDA = "skipped: needs CUDA"
KINDS = ("none", "mac", "mag")
# Max relative error (max |got - ref| / max |ref|) allowed against the fp64 reference. bf16 keeps 8 significant
# bits (unit roundoff 2^-8 = 3.9e-3): the output may be off by a few roundings of its largest value, the gradients
# go through more bf16 products (P, dS) and sums over up to N positions. fp32: the tests' bound (tests/kernels/).
ATTN_TOL = {torch.bfloat16: {"out": 2e-2, "grad": 5e-2}, torch.float32: {"out": 2e-5, "grad": 2e-5}}
# Titans fp32 vs fp64: the tests allow 1e-5 at T = 50 (max(1, max|ref|)-relative); the carried state accumulates
# rounding over the chunks, so ~1e3 tokens get 10x more.
TITANS_TOL = 1e-4
# Dry-run training model: gpu_1b.toml's structure shrunk to seconds on 2 CPU cores.
TINY_TRAIN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.num_meta_tokens=4", "model.window=16", "model.global_layers=[-1]", "data.seq_len=64",
              "data.batch_size=2", "model.titans.segment_len=32", "schedule.warmup_steps=1"]


def emit(row: dict) -> dict:
    """One JSON line per measurement, as the other benchmarks/ scripts print them."""
    print(json.dumps(row), flush=True)
    return row


def load_benchmark(name: str) -> ModuleType:
    """Another benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    """Return cached blocks between cases, so one case's peak does not count against the next."""
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def median_seconds(fn: Callable[[], Any], dev: str, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (compilation, autotuning and allocator growth excluded)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs error, and that over max |ref| (a relative error that does not blow up at tiny entries)."""
    diff = (got.double() - ref.double()).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(ref.abs().max().item(), 1e-30)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for dist in ("flash-attn", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def check_attention(args: argparse.Namespace, dev: str) -> list[dict]:
    """Every backend against the fp64 reference on the same (bf16-rounded) inputs, values and q/k/v gradients."""
    from memtrain.kernels.attention import attention, available_backends
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    # GPU: gpu_1b.toml's head dim and a GQA group of 4; N = 4096 keeps the fp64 reference's N x N scores ~2 GB
    B, Hq, Hkv, D = (1, 4, 2, 16) if args.dry_run else (2, 8, 2, 128)
    cases = ([(67, 5, 16), (40, 0, None), (33, 3, 1)] if args.dry_run else
             [(4096, 128, 1024), (4096, 128, None), (2999, 37, 257), (130, 5, 1)])
    have, tol = available_backends(), ATTN_TOL[dtype]
    rows = []
    for n, p, w in cases:
        g = torch.Generator().manual_seed(n)
        q, k, v, dout = (torch.randn(B, h, n, D, generator=g).to(dev, dtype) for h in (Hq, Hkv, Hkv, Hq))

        def run(backend: str, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            xs = tuple(x.detach().requires_grad_(True) for x in xs)
            out = attention(*xs, num_prefix=p, window=w, backend=backend)
            return [out.detach(), *torch.autograd.grad(out, xs, dout.to(out.dtype))]

        ref = run("reference", (q.double(), k.double(), v.double()))
        case, seconds = [], {}
        for backend in ("sdpa", "flex", "flash"):
            row = {"check": "attention", "N": n, "P": p, "W": w, "B": B, "Hq": Hq, "Hkv": Hkv, "D": D,
                   "backend": backend, "dtype": str(dtype).removeprefix("torch."), "tolerance": tol}
            if dev == "cpu" and backend != "sdpa":
                row["status"] = SKIP_CUDA + (" (flex has no CPU backward)" if backend == "flex" else "")
            elif backend not in have:
                row["status"] = f"skipped: {'flash-attn not installed' if backend == 'flash' else 'no flex in torch'}"
            else:
                try:
                    got = run(backend, (q, k, v))
                    errs = {name: errors(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
                    ok = errs["out"]["max_rel"] <= tol["out"] and all(
                        errs[x]["max_rel"] <= tol["grad"] for x in ("dq", "dk", "dv"))
                    del got
                    seconds[backend] = median_seconds(lambda: run(backend, (q, k, v)), dev, args.repeats)
                    row.update(errors=errs, fwd_bwd_ms=round(seconds[backend] * 1e3, 3),
                               status="pass" if ok else "fail")
                except Exception as e:  # noqa: BLE001  one broken backend must not hide the others' numbers
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            case.append(row)
        for row in case:
            if row["backend"] in seconds and "sdpa" in seconds:
                row["time_vs_sdpa"] = round(seconds[row["backend"]] / seconds["sdpa"], 3)
            rows.append(emit(row))
        del q, k, v, dout, ref
        free(dev)
    return rows


def check_titans(args: argparse.Namespace, dev: str) -> list[dict]:
    """Triton linear memory, fused and Triton deep memory (fp32) against the fp64 naive chunk loop, forward and
    backward."""
    from memtrain.kernels.titans import deep_memory, linear_memory
    from memtrain.kernels.titans.reference import deep_memory_naive_chunks, linear_memory_naive_chunks
    from memtrain.kernels.titans.testing import (flatten, make_deep_state, make_inputs, make_linear_state,
                                                 max_rel_err, random_projection_loss)
    try:
        from memtrain.kernels.titans import triton_linear
        triton_mode = "interpreted" if type(triton_linear._fwd_kernel).__name__ == "InterpretedFunction" else "compiled"
    except ImportError as e:
        triton_linear, triton_mode = None, f"skipped: {e}"
    # T not a multiple of 16 or 64 (a partial last chunk); the spec loops per token, so its T stays ~1e3 on a GPU.
    # Timings use a longer T_time, fast paths only.
    B, H, D, T_lin, T_deep, T_time = (1, 2, 8, 37, 29, 37) if args.dry_run else (2, 4, 64, 1000, 333, 8191)

    def fwd_bwd(fn: Callable, tensors: list[torch.Tensor], timed: bool = False) -> tuple[list, list]:
        """(outputs, gradients of a random projection of all outputs w.r.t. every input and initial state).
        Timed calls use the plain sum instead: the projection draws its directions on the CPU."""
        ins = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(ins)
        loss = sum(o.sum() for o in flatten(out)) if timed else random_projection_loss(out)
        return [o.detach() for o in flatten(out)], list(torch.autograd.grad(loss, ins))

    def inputs(T: int, deep: bool, dtype: torch.dtype, d: int = D) -> list[torch.Tensor]:
        x = make_inputs(B, H, T, d, d, dtype=dtype, device=dev, seed=T)
        st = make_deep_state(B, H, d, d, dtype=dtype, device=dev) if deep else make_linear_state(B, H, d, d, dtype=dtype, device=dev)
        return [*x, *flatten(st)]

    def op(deep: bool, backend: str, b: int) -> Callable:
        if deep:  # depth 2: state ((W1, W2), (S1, S2))
            if backend == "reference":
                return lambda t: deep_memory_naive_chunks(*t[:6], ((t[6], t[7]), (t[8], t[9])), chunk_size=b)
            return lambda t: deep_memory(*t[:6], chunk_size=b, state=((t[6], t[7]), (t[8], t[9])), backend=backend)
        if backend == "reference":
            return lambda t: linear_memory_naive_chunks(*t[:6], chunk_size=b, state=(t[6], t[7]))
        return lambda t: linear_memory(*t[:6], chunk_size=b, state=(t[6], t[7]), backend=backend)

    rows = []
    # the deep Triton kernel keeps every layer's state on chip: heads of 32 at chunk 16 fit an H100's shared memory,
    # 64 do not (docs/titans_kernels.md); tl.dot needs dims of at least 16, also interpreted
    for kind, fast, d, chunks in (("linear", "triton", D, (16, 64)), ("deep", "fused", D, (16, 64)),
                                  ("deep", "triton", 16 if args.dry_run else 32, (16,))):
        deep, T = kind == "deep", T_deep if kind == "deep" else T_lin
        for b in chunks:
            row = {"check": "titans", "memory": kind, "backend": fast, "chunk_size": b, "B": B, "H": H, "Dk": d,
                   "Dv": d, "T": T, "dtype": "float32", "reference": "naive chunk loop, float64",
                   "tolerance": TITANS_TOL}
            if fast == "triton":
                row["triton"] = triton_mode
                if triton_linear is None or (dev == "cpu" and triton_mode != "interpreted"):
                    rows.append(emit({**row, "status": triton_mode if triton_linear is None else
                                      SKIP_CUDA + " (or TRITON_INTERPRET=1 before triton is imported)"}))
                    continue
            try:
                x32 = inputs(T, deep, torch.float32, d)
                out, grads = fwd_bwd(op(deep, fast, b), x32)
                ref_out, ref_grads = fwd_bwd(op(deep, "reference", b), [t.double() for t in x32])
                fwd = max(max_rel_err(a, r) for a, r in zip(out, ref_out))
                bwd = max(max_rel_err(a, r) for a, r in zip(grads, ref_grads))
                xt = x32 if T_time == T else inputs(T_time, deep, torch.float32, d)
                t_fast = median_seconds(lambda: fwd_bwd(op(deep, fast, b), xt, True), dev, args.repeats)
                t_chunked = median_seconds(lambda: fwd_bwd(op(deep, "chunked", b), xt, True), dev, args.repeats)
                row.update(forward_max_rel=fwd, backward_max_rel=bwd, T_time=T_time,
                           fwd_bwd_ms=round(t_fast * 1e3, 3), chunked_fwd_bwd_ms=round(t_chunked * 1e3, 3),
                           time_vs_chunked=round(t_fast / t_chunked, 3),
                           status="pass" if max(fwd, bwd) <= TITANS_TOL else "fail")
            except Exception as e:  # noqa: BLE001
                row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            rows.append(emit(row))
            free(dev)
    return rows


def prepare_data(args: argparse.Namespace, workdir: Path) -> str:
    """--data, or a small stdlib dataset: enough tokens for the run (the stream loops over epochs anyway)."""
    if args.data:
        return args.data
    out = workdir / "data"
    small = ["--max-files", "20", "--vocab-size", "512"] if args.dry_run else ["--max-files", "200"]
    subprocess.run([sys.executable, "-m", "memtrain.data.prepare", "--source", "stdlib", "--out", str(out),
                    "--quiet", "--val-every", "10", *small], cwd=ROOT, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    return str(out)


def check_training(args: argparse.Namespace, dev: str, workdir: Path) -> dict[str, dict]:
    """`python -m memtrain.train` per memory kind, as benchmarks/train.py --gpu runs it, plus explicit precision,
    engine, device and data overrides (that script takes neither --set nor a data path)."""
    data = prepare_data(args, workdir)
    # precision and engine explicitly: bf16 needs the DeepSpeed engine, and "auto" means fp32 in the torch engine
    precision, engine = ("fp32", "torch") if args.dry_run else ("bf16", "deepspeed")
    steps = 2 if args.dry_run else args.steps
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # train as a user would
    results = {}
    for kind in KINDS:
        run_dir = workdir / f"run_{kind}"
        sets = [*(TINY_TRAIN if args.dry_run else []), f"schedule.steps={steps}", "logging.progress=false",
                f"model.memory=\"{kind}\"", f"precision=\"{precision}\"", f"parallel.engine=\"{engine}\"",
                f"device=\"{dev}\"", f"data.path=\"{data}\"", "checkpoint.keep=1"]
        cmd = [sys.executable, "-m", "memtrain.train", "--config", args.config, "--run-dir", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        row = {"check": "training", "memory": kind, "config": args.config, "precision": precision,
               "engine": engine, "steps": steps}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                                  timeout=300 if args.dry_run else 900)
            error = None if proc.returncode == 0 else ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            error = "timed out"
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if error is not None:
            results[kind] = emit({**row, "status": f"error: {error[:300]}"})
            continue
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = [m for m in metrics if "tokens_per_s" in m]
        steady = metrics[len(metrics) // 3:]  # drop start-up steps (allocation, DeepSpeed set-up), as train.py
        # the trainer's "# MFU: FLOPs/token = ...; peak X TFLOP/s per device from <source>" line
        peak = [line[line.rfind("; peak ") + 2:] for line in proc.stdout.splitlines() if line.startswith("# MFU:")]
        row.update(steps_logged=len(metrics), tokens_per_s=statistics.median(m["tokens_per_s"] for m in steady),
                   mfu=statistics.median(m["mfu"] for m in steady), first_loss=metrics[0]["loss"],
                   final_loss=metrics[-1]["loss"], mfu_peak=peak[0] if peak else None, status="ok")
        if kind != "none" and "tokens_per_s" in results.get("none", {}):  # what the memory costs, same run
            row["tokens_per_s_vs_none"] = round(row["tokens_per_s"] / results["none"]["tokens_per_s"], 3)
        results[kind] = emit(row)
    return results


def check_memory(args: argparse.Namespace, dev: str) -> list[dict]:
    """One MAC training step (benchmarks/scaling.py's build + measure) per length; OOM is a result, not a crash."""
    scaling = load_benchmark("scaling")
    # GPU: a 2-layer MAC model of width 1024 (activations dominate at these lengths, not the weights)
    size = (dict(d_model=32, layers=2, heads=4, segment=32, vocab=256) if args.dry_run else
            dict(d_model=1024, layers=2, heads=8, segment=512, vocab=8192))
    lengths = [64, 128, 256] if args.dry_run else [8192, 32768, 131072]
    ns = SimpleNamespace(**size, window=size["segment"], memory=16, batch=1, repeats=1, device=dev)
    meter_cls = scaling._meter_class()
    rows = []
    for n in lengths:
        row = {"check": "memory", "model": "mac", "n": n, **size, "batch": 1, "dtype": "float32"}
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            m = scaling.measure("mac", ns, n, meter_cls)
            row.update(seconds=m["seconds"], saved_tensors_mib=m["saved_mib"], status="ok")
            if dev == "cuda":  # measure() resets the peak before its last step: the peak of one step, weights included
                row.update(peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                           peak_above_start_mib=m["cuda_peak_mib"])
            else:  # a lifetime high-water mark: only growth past any earlier peak shows (0 = stayed below it)
                row["peak_rss_growth_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", message=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        rows.append(emit(row))
        free(dev)
    return rows


def failures(node: Any) -> list[str]:
    """Statuses anywhere in the results that fail the acceptance (fail or error; skipped and oom do not)."""
    if isinstance(node, dict):
        own = [node["status"]] if str(node.get("status", "")).startswith(("fail", "error")) else []
        return own + [f for v in node.values() for f in failures(v)]
    if isinstance(node, list):
        return [f for v in node for f in failures(v)]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written at the end")
    p.add_argument("--dry-run", action="store_true", help="every code path at tiny sizes on CPU (CI)")
    p.add_argument("--data", help="a prepared dataset (default: a small stdlib one prepared on the fly)")
    p.add_argument("--config", default="configs/gpu_1b.toml", help="training config of the training check")
    p.add_argument("--steps", type=int, default=30, help="training steps per memory kind")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per kernel measurement (median)")
    p.add_argument("--only", nargs="+", choices=["attention", "titans", "training", "memory"],
                   default=["attention", "titans", "training", "memory"])
    args = p.parse_args(argv)
    if args.dry_run:  # its timings mean nothing (interpreted Triton, tiny shapes): one call exercises the path
        args.repeats = 1
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device (use --dry-run on CPU)"}), flush=True)
        return 2
    dev = "cpu" if args.dry_run else "cuda"
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "device": torch.cuda.get_device_name(0) if dev == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.only:
            t0 = time.perf_counter()
            try:
                if name == "attention":
                    result: Any = check_attention(args, dev)
                elif name == "titans":
                    result = check_titans(args, dev)
                elif name == "training":
                    result = check_training(args, dev, Path(tmp))
                else:
                    result = check_memory(args, dev)
            except Exception as e:  # noqa: BLE001  a broken check is reported; the others still run
                result = emit({"check": name, "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
            report["checks"][name] = result
            report.setdefault("wall_s", {})[name] = round(time.perf_counter() - t0, 1)
    report["wall_s"]["total"] = round(time.perf_counter() - t_start, 1)
    report["failures"] = failures(report["checks"])
    report["passed"] = not report["failures"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    emit({"summary": "gpu_check", "passed": report["passed"], "failures": len(report["failures"]),
          "wall_s": report["wall_s"], "out": str(args.out)})
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
