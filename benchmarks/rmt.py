"""Peak activation memory of RMT training: plain backpropagation through time vs memory replay.

    python benchmarks/rmt.py                    # 16 segments of L = 128, M = 16, d_model 256, 4 layers, B = 2
    python benchmarks/rmt.py --segments 4 8 16  # several segment counts
    python benchmarks/rmt.py --no-rss           # saved-tensor accounting only (faster)

Prints one JSON line per measurement (docs/architecture.md#measuring) and, per segment count, a "ratio" line
(replay / plain, both measured in this run).

Methods.
1. saved-tensor accounting (the headline number; exact and deterministic): every tensor autograd saves for the
   backward passes through `torch.autograd.graph.saved_tensors_hooks`; the meter counts each storage once
   (several saves of one tensor, or views of it, cost nothing extra), leaves out parameters (weights are not
   activations), and frees a storage's bytes when the graph drops its last reference. The peak of the live total
   over forward + backward is the activation memory. Memory replay also keeps the memory state entering each
   segment outside autograd (n × [B, M, D]); those bytes are added to its peak.
2. peak RSS (corroboration, includes everything the allocator touched): each mode runs in a fresh subprocess;
   the peak is reset with `echo 5 > /proc/self/clear_refs` after a warm-up step and read as VmHWM - VmRSS-before.
   MALLOC_MMAP_THRESHOLD_=65536 makes freed large buffers go back to the OS, so reuse inside the heap does not hide
   growth. Gradients of the parameters are allocated in the warm-up, so they are not in the delta.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


class SavedTensorMeter:
    """Live and peak bytes of the storages autograd holds for backward (parameters excluded)."""

    def __init__(self, params):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or t.device.type == "meta":
            return (None, t)
        entry = self.live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        # Keep a detached alias: holding `t` itself would make a reference cycle (node -> saved output -> its
        # grad_fn = node) that outlives the graph on branches the backward never runs (the last write memory).
        return (_Release(self, key), t.detach())

    @staticmethod
    def _unpack(packed):
        return packed[1]

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Release:
    """Dropped by autograd together with the saved tensor: gives its bytes back to the meter."""

    __slots__ = ("meter", "key")

    def __init__(self, meter: SavedTensorMeter, key: int):
        self.meter, self.key = meter, key

    def __del__(self):
        self.meter._release(self.key)


def build(args, segments: int):
    from memtrain.model import ModelConfig, build_model
    from memtrain.model.memory.rmt.config import RMTConfig
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=segments * args.segment_len, attention_backend="sdpa", memory="rmt",
                      rmt=RMTConfig(segment_len=args.segment_len, num_memory=args.memory))
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, segments * args.segment_len), generator=g)
    targets = torch.randint(0, args.vocab, tokens.shape, generator=g)
    return model, tokens, targets


def step(model, tokens, targets, mode: str) -> float:
    if mode == "replay":
        return float(model.replay_backward(tokens, targets))
    loss = model(tokens, targets).loss
    loss.backward()
    return float(loss.detach())


def saved_tensor_peak(args, segments: int, mode: str) -> dict:
    model, tokens, targets = build(args, segments)
    meter = SavedTensorMeter(model.parameters())
    t0 = time.perf_counter()
    with meter.hooks():
        loss = step(model, tokens, targets, mode)
    seconds = time.perf_counter() - t0
    assert meter.current == 0, "every saved tensor is released after backward"
    states = 0
    if mode == "replay":  # memory entering each segment, kept outside autograd: n x [B, M, D]
        states = segments * args.batch * args.memory * args.d_model * 4  # fp32
    return {"method": "saved_tensors", "mode": mode, "segments": segments, "peak_mb": (meter.peak + states) / 2**20,
            "memory_states_mb": states / 2**20, "loss": loss, "seconds": round(seconds, 3)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_child(args, segments: int, mode: str) -> dict:
    torch.set_num_threads(1)
    model, tokens, targets = build(args, segments)
    step(model, tokens, targets, mode)  # warm-up: allocates .grad and one-time buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    step(model, tokens, targets, mode)
    return {"method": "peak_rss", "mode": mode, "segments": segments,
            "peak_mb": (_status_kb("VmHWM") - before) / 1024}


def rss_peak(args, segments: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--segments", str(segments), *args.model_args]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--segments", type=int, nargs="+", default=[16])
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument("--memory", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess peak-RSS corroboration")
    p.add_argument("--child", choices=["plain", "replay"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_args = ["--segment-len", str(args.segment_len), "--memory", str(args.memory), "--d-model",
                       str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads), "--vocab",
                       str(args.vocab), "--batch", str(args.batch)]
    if args.child:
        print(json.dumps(rss_child(args, args.segments[0], args.child)))
        return
    config = {k: getattr(args, k) for k in ("segment_len", "memory", "d_model", "layers", "heads", "vocab", "batch")}
    for n in args.segments:
        res = {m: saved_tensor_peak(args, n, m) for m in ("plain", "replay")}
        for r in res.values():
            print(json.dumps({**r, **config}), flush=True)
        ratio = {"metric": "ratio", "segments": n, "replay_over_plain_saved_tensors":
                 res["replay"]["peak_mb"] / res["plain"]["peak_mb"], "same_loss": abs(res["replay"]["loss"] -
                                                                                      res["plain"]["loss"]) < 1e-4}
        if not args.no_rss:
            rss = {m: rss_peak(args, n, m) for m in ("plain", "replay")}
            for r in rss.values():
                print(json.dumps({**r, **config}), flush=True)
            ratio["replay_over_plain_peak_rss"] = rss["replay"]["peak_mb"] / rss["plain"]["peak_mb"]
        print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
