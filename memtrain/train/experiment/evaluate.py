"""Accuracy, throughput and peak memory of a trained variant at one length.

Accuracy at length n: examples 0 .. eval_examples − 1 of the "val" split, generated at n tokens; the answer is
the greedy prediction at the last prompt position (every answer is one token, so this is exact match). Stateless
models (window, meta) run an example in one call; memory models run it in pieces of `eval_piece` tokens with the
state carried (`model(tokens, state=...)`), which equals one call and keeps memory flat in n.

Throughput and memory: the same forward pass over `perf_batch` sequences of n tokens, timed after a warm-up (best
of `perf_repeats`); peak memory is the CUDA allocator's peak above the memory in use before the pass, or on CPU
the process's peak resident set above the resident set before it (Linux VmHWM, reset through
/proc/self/clear_refs; 0 where that file cannot be written).
"""
from __future__ import annotations

import time

import torch

from memtrain.data.tasks.symbolic import symbolic_batch

from .config import LongContextConfig

STATELESS = ("window", "meta")


@torch.no_grad()
def answer_logits(model, variant: str, prompts: torch.Tensor, piece: int) -> torch.Tensor:
    """prompts `[B, n]` -> logits `[B, V]` of the token after the prompt."""
    if variant in STATELESS:
        return model(prompts).logits[:, -1]
    state, out = None, None
    for i in range(0, prompts.shape[1], piece):
        out = model(prompts[:, i:i + piece], state=state)
        state = out.state
    return out.logits[:, -1]


def accuracy(model, cfg: LongContextConfig, variant: str, task: str, length: int) -> tuple[int, int]:
    """(correct, total) over the cell's evaluation examples."""
    device = torch.device(cfg.device)
    batch = cfg.eval_batch if variant not in STATELESS else max(1, min(cfg.eval_batch, cfg.eval_max_tokens // length))
    correct = 0
    for start in range(0, cfg.eval_examples, batch):
        count = min(batch, cfg.eval_examples - start)
        x, y = symbolic_batch(task, length, cfg.seed, "val", start, count, cfg.events, cfg.filler)
        logits = answer_logits(model, variant, torch.from_numpy(x[:, :-1]).to(device), cfg.eval_piece)
        correct += int((logits.argmax(-1).cpu() == torch.from_numpy(y)).sum())
    return correct, cfg.eval_examples


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> bool:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the pass's allocations show
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def performance(model, cfg: LongContextConfig, variant: str, length: int) -> dict:
    """{"tokens_per_s", "seconds", "peak_mib"} of one forward pass over perf_batch × length tokens."""
    device = torch.device(cfg.device)
    x, _ = symbolic_batch("niah_single", length, cfg.seed, "val", 0, cfg.perf_batch, cfg.events, cfg.filler)
    prompts = torch.from_numpy(x).to(device)
    answer_logits(model, variant, prompts, cfg.eval_piece)  # warm-up (allocator, kernel selection)
    best = float("inf")
    peak = 0.0
    for _ in range(cfg.perf_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ok = _reset_cpu_peak()
            base = _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        answer_logits(model, variant, prompts, cfg.eval_piece)
        if device.type == "cuda":
            torch.cuda.synchronize()
            used = torch.cuda.max_memory_allocated() - base
        else:
            used = _status_kib("VmHWM") * 1024 - base if ok else 0
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, used / 2**20)
    return {"tokens_per_s": cfg.perf_batch * length / best, "seconds": best, "peak_mib": peak}
