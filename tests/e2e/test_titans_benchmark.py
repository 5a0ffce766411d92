"""`benchmarks/titans_model.py --only speed` at toy size: ours and the dense-only floor run in alternating rounds and
the summary line reports the floor; `benchmarks/titans_chunk_cost.py` at one round. No timings are asserted (they
live in the docs, measured on a quiet machine)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _benchmark_module():
    """benchmarks/titans_model.py by path (benchmarks/ is not a package, and not put on sys.path for every test)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("titans_model_benchmark", ROOT / "benchmarks" / "titans_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_stand_in_keeps_every_input_in_the_graph_and_hands_the_state_on():
    _free_memory = _benchmark_module()._free_memory
    B, H, T, D = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    gates = [torch.rand(B, H, T, requires_grad=True) for _ in range(3)]
    weights = (torch.randn(B, H, 8, D), torch.randn(B, H, D, 8))
    y, (W, S, A) = _free_memory(q, k, v, *gates, chunk_size=2, state=(weights, None))
    assert y.shape == (B, H, T, D) and W is weights and A is weights
    assert [s.shape for s in S] == [w.shape for w in weights] and all(not s.any() for s in S)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v, *gates))
    y, (W, S, A) = _free_memory(q, k, v, *gates, chunk_size=2)  # linear memory, no state yet
    assert W.shape == S.shape == (B, H, D, D)


@pytest.mark.slow
def test_speed_runs_ours_and_the_floor():
    proc = subprocess.run([sys.executable, "benchmarks/titans_model.py", "--only", "speed", "--rounds", "1",
                           "--steps", "1", "--threads", "1", "--seq-len", "64", "--dim", "32", "--heads", "2",
                           "--mem-heads", "2", "--segment-len", "32", "--chunk-size", "8", "--depth", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("impl") for r in lines if r["bench"] == "mac_train_step"] == ["ours", "floor"]
    summary = next(r for r in lines if r["bench"] == "mac_train_step_ratio")
    floor = next(r for r in lines if r.get("impl") == "floor")
    assert summary["floor_step_s"] > 0 and "memory_share_of_ours" in summary and "peer" in summary
    assert floor["config"]["memory_op"].startswith("elementwise")


def test_chunk_cost_benchmark_reports_each_model_and_the_ratios():
    proc = subprocess.run([sys.executable, "benchmarks/titans_chunk_cost.py", "--variants", "lmm", "--rounds", "1",
                           "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("model") for r in lines[:3]] == ["window", "lmm_b1", "lmm_b16"]
    assert all(r["batch"] == [32, 127] and r["tokens_per_s"] > 0 for r in lines[:3])
    assert lines[3]["variant"] == "lmm" and lines[3]["b1_over_b16_time"] > 0
