"""Titans model benchmark (MAC): one JSON line per measurement, ratios taken within the same run.

    python benchmarks/titans_model.py --peer-python /tmp/peer/bin/python      # both parts
    python benchmarks/titans_model.py --only memory                            # (a) only
    python benchmarks/titans_model.py --only speed --peer-python PATH          # (b) only

(a) memory: peak memory of one MAC forward + backward (B=1) at T = 1k .. 32k. Every T runs in a fresh subprocess,
    which reports the peak RSS growth during the step (VmHWM after, reset through /proc/self/clear_refs, minus
    VmRSS before; glibc's mmap threshold is set to 64 KiB so frees return memory and RSS tracks live memory).
    Linear growth <=> bytes/token roughly constant. With --peer-python the peer's MAC is measured the same way
    for T <= --peer-max-len.
(b) speed: MAC training step (forward + backward + AdamW step) tokens/s of this project against the peer
    `titans-pytorch` (`MemoryAsContextTransformer`) at the same width, depth, attention heads, memory heads, segment
    length, memory chunk size, memory depth, memory MLP expansion, batch and sequence length, and with the peer's
    memory gradients taken at each chunk's start memory as ours are (`neural_memory_batch_size` = chunk size;
    `--peer-ttt-batch 0` for the peer's default); both configurations are printed. The peer is never a project
    dependency: it runs in its own interpreter (`--peer-python`, a venv with torch + titans-pytorch), through this
    same file in `--worker peer` mode, which imports nothing of the project. Each implementation runs in a fresh
    subprocess per round, alternating (ours, peer, ours, peer, ...), so machine load drifts hit both; the best step
    of each is reported, and their ratio (wall clock), plus the ratio of best per-step CPU time of the process (1
    thread: the work done, less distorted by other processes on a shared machine) and the matrix-product GFLOP of
    one forward + backward of each. Peak RSS growth of each worker from the built model on (first step, gradients
    and AdamW state included) is reported too.
    The dense-only floor is measured in the same rounds (a third worker, `floor`): our model with the memory op
    replaced by an elementwise one of the same inputs and outputs, so every dense layer (projections, attention,
    SwiGLU, the memory's own projections) runs as in `ours` and only the memory's chunk loop is gone. peer / floor
    is the most any memory kernel could reach against the peer with these dense layers (`--no-floor` skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# issue 22's targets for MAC vs titans-pytorch (training step, same memory semantics), by memory chunk size
SPEEDUP_TARGETS = {16: ">= 3x", 64: ">= 2x"}


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---- this project's MAC ------------------------------------------------------------------------------

def _our_model(a: dict):
    sys.path.insert(0, ROOT)
    from memtrain.model import ModelConfig, build_model
    from memtrain.model.memory.titans.config import TitansConfig
    cfg = ModelConfig(vocab_size=a["vocab"], d_model=a["dim"], n_layers=a["depth"], n_heads=a["heads"],
                      max_seq_len=max(a["seq_len"], 1024), num_meta_tokens=a["persist"], memory="mac",
                      attention_backend="auto",
                      titans=TitansConfig(segment_len=a["segment_len"], chunk_size=a["chunk_size"],
                                          memory_depth=a["mem_depth"], memory_heads=a["mem_heads"],
                                          memory_expansion=a["mem_expansion"]))
    return cfg, build_model(cfg)


def _free_memory(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0, act="gelu",
                 backend="auto"):
    """The dense-only floor's stand-in for the memory op: y `[B, H, T, Dv]` from every input by one elementwise
    expression (so every projection feeding the memory keeps its gradient), the state handed on unchanged."""
    y = q * theta.unsqueeze(-1) + k * eta.unsqueeze(-1) + v * alpha.unsqueeze(-1)
    if state is None:  # linear memory: (W, S) zeros [B, H, Dv, Dk]
        import torch
        W = torch.zeros(*q.shape[:2], v.shape[-1], q.shape[-1], dtype=q.dtype)
        return y, (W, torch.zeros_like(W), W)
    weights, momenta = state[0], state[1] if len(state) > 1 else None
    if momenta is None:
        momenta = tuple(w.new_zeros(w.shape) for w in weights)
    return y, (weights, momenta, weights)


def _peer_model(a: dict):
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP
    dh = a["dim"] // a["mem_heads"]
    model = MemoryAsContextTransformer(
        num_tokens=a["vocab"], dim=a["dim"], depth=a["depth"], segment_len=a["segment_len"],
        num_persist_mem_tokens=a["persist"], num_longterm_mem_tokens=0, dim_head=a["dim"] // a["heads"],
        heads=a["heads"], ff_mult=4, num_residual_streams=1, neural_memory_segment_len=a["peer_chunk_size"],
        neural_memory_batch_size=a["peer_ttt_batch"] or None,
        neural_memory_model=MemoryMLP(dim=dh, depth=a["mem_depth"], expansion_factor=a["mem_expansion"]),
        neural_memory_kwargs=dict(heads=a["mem_heads"], dim_head=dh))
    for p in model.parameters():  # some of its parameters are broadcast views (stride 0): AdamW cannot update them
        if 0 in p.stride():
            p.data = p.data.clone()
    return model


def worker(which: str, a: dict) -> None:
    """One fresh process: build `which` model, time `steps` training steps, print one JSON line."""
    import torch
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    if which in ("ours", "floor"):
        if which == "floor":
            from memtrain.model.factory import SequenceOps
            SequenceOps.linear_memory = SequenceOps.deep_memory = staticmethod(_free_memory)
        cfg, model = _our_model(a)
        config = dict(cfg.titans.__dict__, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                      ffn=cfg.ffn_width, num_meta_tokens=cfg.num_meta_tokens, memory="mac",
                      **({"memory_op": "elementwise stand-in (dense-only floor)"} if which == "floor" else {}))

        def loss_of(tokens):
            return model(tokens[:, :-1], tokens[:, 1:]).loss
    else:
        model = _peer_model(a)
        config = dict(model="titans_pytorch.MemoryAsContextTransformer", dim=a["dim"], depth=a["depth"],
                      heads=a["heads"], dim_head=a["dim"] // a["heads"], segment_len=a["segment_len"],
                      num_persist_mem_tokens=a["persist"], num_longterm_mem_tokens=0, ff_mult=4,
                      num_residual_streams=1, neural_memory_segment_len=a["peer_chunk_size"],
                      neural_memory_batch_size=a["peer_ttt_batch"] or None,
                      neural_memory_model=f"MemoryMLP(dim={a['dim'] // a['mem_heads']}, depth={a['mem_depth']}, "
                                          f"expansion_factor={a['mem_expansion']})",
                      neural_memory_heads=a["mem_heads"], version=_peer_version())

        def loss_of(tokens):
            return model(tokens, return_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, a["vocab"], (a["batch"], a["seq_len"] + 1))
    params = sum(p.numel() for p in model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(tokens)
        loss.backward()
        opt.step()
        return float(loss)

    # Peak RSS growth from the built model on (warm-up step included: activations, gradients, AdamW state).
    # Measured from before the warm-up because glibc keeps freed memory: later steps reuse it and show no growth.
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    step()  # warm-up: allocator, optimizer state
    times, cpu = [], []
    for _ in range(a["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of this process: less sensitive to a loaded machine
    peak = _status_bytes("VmHWM") - base
    print(json.dumps(dict(which=which, step_s=times, cpu_s=cpu, params=params,
                          peak_step_mib=round(peak / 2**20, 1), matmul_gflop=_matmul_gflop(lambda: loss_of(tokens).backward()), config=config,
                          load_avg=_load_avg())), flush=True)


def _matmul_gflop(fwd_bwd) -> float:
    """GFLOP of one forward + backward in matrix products (mm, bmm, addmm, baddbmm, attention), counted by
    torch.utils.flop_counter on an extra untimed step. Convolutions are left out: the counter charges the
    depthwise (grouped) conv backward as if it were dense."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    ops = counter.get_flop_counts().get("Global", {})
    return round(sum(n for op, n in ops.items() if "conv" not in str(op)) / 1e9, 2)


def _peer_version() -> str:
    from importlib.metadata import version
    return version("titans-pytorch")


def _run(python: str, args: list[str], small_mmap: bool = False) -> dict:
    # glibc: serve every allocation >= 64 KiB by mmap so a free returns it at once and RSS tracks live memory.
    # Only for the memory scan: the page faults of fresh mmaps slow a training step several-fold.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if small_mmap else dict(os.environ)
    out = subprocess.run([python, os.path.abspath(__file__), *args], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"worker failed ({' '.join(args[:2])}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_speed(a: dict, peer_python: str | None, rounds: int, floor: bool = True) -> None:
    shape = dict(batch=a["batch"], seq_len=a["seq_len"], dim=a["dim"], depth=a["depth"], heads=a["heads"],
                 segment_len=a["segment_len"], chunk_size=a["chunk_size"],
                 peer_chunk_size=a["peer_chunk_size"], peer_ttt_batch=a["peer_ttt_batch"], mem_depth=a["mem_depth"], mem_heads=a["mem_heads"], mem_expansion=a["mem_expansion"], persist=a["persist"],
                 threads=a["threads"], steps_per_round=a["steps"], rounds=rounds)
    wargs = ["--worker-args", json.dumps(a)]
    per_round, best_cpu, flops = {}, {}, {}  # per_round[impl]: best step of each round
    for r in range(rounds):
        for which, py in (("ours", sys.executable), ("floor", sys.executable if floor else None),
                          ("peer", peer_python)):
            if py is None:
                continue
            res = _run(py, ["--worker", which, *wargs])
            tok = a["batch"] * a["seq_len"]
            s, c = min(res["step_s"]), min(res["cpu_s"])
            emit(bench="mac_train_step", impl=which, round=r, best_step_s=round(s, 4),
                 tokens_per_s=round(tok / s, 1), all_step_s=[round(x, 3) for x in res["step_s"]],
                 best_cpu_s=round(c, 4), tokens_per_cpu_s=round(tok / c, 1), matmul_gflop=res["matmul_gflop"],
                 peak_step_mib=res["peak_step_mib"], params=res["params"], load_avg=res["load_avg"],
                 **({"config": res["config"]} if r == 0 else {}))
            per_round.setdefault(which, []).append(s)
            best_cpu[which] = min(best_cpu.get(which, float("inf")), c)
            flops[which] = res["matmul_gflop"]
    best = {which: min(steps) for which, steps in per_round.items()}
    if "peer" in best:
        tok = a["batch"] * a["seq_len"]
        emit(bench="mac_train_step_ratio", **shape, ours_tokens_per_s=round(tok / best["ours"], 1),
             peer_tokens_per_s=round(tok / best["peer"], 1),
             speedup_vs_titans_pytorch=round(best["peer"] / best["ours"], 2),
             cpu_time_speedup=round(best_cpu["peer"] / best_cpu["ours"], 2),
             speedup_per_round=[round(p / o, 2) for o, p in zip(per_round["ours"], per_round["peer"])],
             matmul_gflop_ours=flops["ours"], matmul_gflop_peer=flops["peer"],
             target=SPEEDUP_TARGETS.get(a["chunk_size"], "none at this b (issue 22 sets b = 16 and 64)"),
             **_floor_fields(best, best_cpu, flops))
    else:
        emit(bench="mac_train_step_ratio", **shape, peer="not run: pass --peer-python (a venv with titans-pytorch)",
             **_floor_fields(best, best_cpu, flops))


def _floor_fields(best: dict, best_cpu: dict, flops: dict) -> dict:
    """The dense-only floor against ours and the peer: what the memory costs, and the bound on ours / peer."""
    if "floor" not in best:
        return {}
    out = dict(floor_step_s=round(best["floor"], 4), matmul_gflop_floor=flops["floor"],
               memory_share_of_ours=round(1 - best["floor"] / best["ours"], 3))
    if "peer" in best:
        out.update(ceiling_vs_titans_pytorch=round(best["peer"] / best["floor"], 2),
                   cpu_time_ceiling=round(best_cpu["peer"] / best_cpu["floor"], 2))
    return out


# ---- (a) memory ----------------------------------------------------------------------------------------

def memory_child(a: dict) -> None:
    """Fresh process: peak RSS growth of one forward + backward of `a["which"]` ("ours" or "peer") at seq_len."""
    import torch
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    if a.get("which", "ours") == "ours":
        _, model = _our_model(a)

        def loss_of(tokens):
            return model(tokens[:, :-1], tokens[:, 1:]).loss
    else:
        model = _peer_model(a)

        def loss_of(tokens):
            return model(tokens, return_loss=True)
    tokens = torch.randint(0, a["vocab"], (1, a["seq_len"] + 1))
    loss_of(tokens[:, : a["segment_len"] + 1]).backward()  # warm-up at one segment: library set-up not counted
    model.zero_grad(set_to_none=True)
    _reset_peak_rss()
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    loss_of(tokens).backward()
    sec = time.perf_counter() - t0
    peak = _status_bytes("VmHWM") - base
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(peak_bytes=peak, seconds=sec, param_grad_bytes=grads, load_avg=_load_avg())))


def bench_memory(a: dict, lengths: list[int], peer_python: str | None, peer_max_len: int) -> None:
    prev = None
    for T in lengths:
        r = _run(sys.executable, ["--memory-child", json.dumps(dict(a, seq_len=T))], small_mmap=True)
        peak = r["peak_bytes"]
        emit(bench="mac_peak_memory", B=1, T=T, d_model=a["dim"], n_layers=a["depth"], heads=a["heads"],
             segment_len=a["segment_len"], chunk_size=a["chunk_size"], memory_depth=a["mem_depth"],
             memory_heads=a["mem_heads"], dtype="float32", pass_="forward+backward",
             measure="peak RSS growth during the step (fresh process per T)", peak_mib=round(peak / 2**20, 1),
             bytes_per_token=round(peak / T), growth_vs_previous_T=None if prev is None else round(peak / prev, 2),
             param_grads_mib=round(r["param_grad_bytes"] / 2**20, 1), seconds=round(r["seconds"], 2),
             load_avg=r["load_avg"])
        prev = peak
        if peer_python and T <= peer_max_len:
            rp = _run(peer_python, ["--memory-child", json.dumps(dict(a, seq_len=T, which="peer"))], small_mmap=True)
            emit(bench="mac_peak_memory_peer", impl="titans-pytorch", B=1, T=T, peak_mib=round(rp["peak_bytes"] / 2**20, 1),
                 bytes_per_token=round(rp["peak_bytes"] / T), seconds=round(rp["seconds"], 2),
                 peer_over_ours=round(rp["peak_bytes"] / peak, 2), load_avg=rp["load_avg"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["speed", "memory"], default=None)
    ap.add_argument("--peer-python", default=None, help="interpreter of a venv with titans-pytorch installed")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mem-heads", type=int, default=4)
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--peer-chunk-size", type=int, default=None,
                    help="the peer's neural_memory_segment_len (default: --chunk-size): the chunk its momentum, "
                         "forgetting and read-out weights are grouped by")
    ap.add_argument("--peer-ttt-batch", type=int, default=None,
                    help="the peer's neural_memory_batch_size: how many tokens share the weights their memory "
                         "gradients are taken at (default: the peer's chunk size, i.e. the paper's chunk-start "
                         "memory of docs/titans_kernels.md, what ours computes); 0 = the peer's default None, every gradient "
                         "of a call at the call's initial weights (no sequential dependence between chunks: "
                         "cheaper, and not the same model)")
    ap.add_argument("--mem-depth", type=int, default=2)
    ap.add_argument("--mem-expansion", type=float, default=2.0)
    ap.add_argument("--persist", type=int, default=4, help="persistent (meta) tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per worker")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (fresh processes) per impl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--peer-max-len", type=int, default=8192, help="longest T of the peer's memory runs")
    ap.add_argument("--no-floor", action="store_true", help="skip the dense-only floor (ours without the memory op)")
    ap.add_argument("--worker", choices=["ours", "floor", "peer"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.worker_args))
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    a = dict(dim=args.dim, depth=args.depth, heads=args.heads, mem_heads=args.mem_heads,
             segment_len=args.segment_len, chunk_size=args.chunk_size, mem_depth=args.mem_depth,
             peer_chunk_size=args.peer_chunk_size or args.chunk_size,
             peer_ttt_batch=(args.peer_chunk_size or args.chunk_size) if args.peer_ttt_batch is None
             else args.peer_ttt_batch,
             mem_expansion=args.mem_expansion,
             persist=args.persist, batch=args.batch, seq_len=args.seq_len,
             vocab=args.vocab, steps=args.steps, threads=args.threads)
    emit(bench="environment", load_avg_1min=_load_avg(), cpus=os.cpu_count(), python=sys.executable,
         peer_python=args.peer_python)
    if args.only in (None, "speed"):
        bench_speed(a, args.peer_python, args.rounds, floor=not args.no_floor)
    if args.only in (None, "memory"):
        bench_memory(a, [int(x) for x in args.lengths.split(",")], args.peer_python, args.peer_max_len)


if __name__ == "__main__":
    main()
