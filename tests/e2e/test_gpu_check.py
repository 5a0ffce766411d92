"""`benchmarks/gpu_check.py --dry-run`: every check's code path runs on CPU and its JSON says what ran and passed.

The real acceptance run needs a CUDA machine (docs/distributed.md#gpu-acceptance-benchmarksgpu_checkpy); this keeps
its code from rotting in between. No timings are asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["passed"] is True and report["failures"] == []
    assert {"torch", "triton", "flash-attn"} <= set(report["versions"]) and report["device"]
    checks = report["checks"]
    assert set(checks) == {"attention", "titans", "training", "memory"}

    # 1. attention: sdpa (fp32 on CPU) passed against the fp64 reference in every case; flex / flash need CUDA
    attn = checks["attention"]
    cases = {(r["N"], r["P"], r["W"]) for r in attn}
    assert len(cases) >= 2 and any(r["W"] is None for r in attn) and any(r["W"] is not None for r in attn)
    sdpa = [r for r in attn if r["backend"] == "sdpa"]
    assert len(sdpa) == len(cases) and all(r["status"] == "pass" for r in sdpa)
    assert all(r["errors"][x]["max_rel"] <= r["tolerance"]["grad"] for r in sdpa for x in ("dq", "dk", "dv"))
    assert all(r["status"].startswith("skipped: needs CUDA") for r in attn if r["backend"] in ("flex", "flash"))

    # 2. titans: the Triton kernels (interpreted) and the fused deep memory passed at chunk sizes 16 and 64, odd T
    titans = checks["titans"]
    assert {(r["memory"], r["backend"], r["chunk_size"]) for r in titans} == {
        *((m, f, b) for m, f in (("linear", "triton"), ("deep", "fused")) for b in (16, 64)), ("deep", "triton", 16)}
    assert all(r["status"] == "pass" and r["T"] % 16 for r in titans), titans
    assert all(r["triton"] == "interpreted" for r in titans if r["backend"] == "triton")
    assert all(max(r["forward_max_rel"], r["backward_max_rel"]) <= r["tolerance"] for r in titans)

    # 3. training: a few steps per memory kind with explicit precision and engine, throughput and MFU logged
    training = checks["training"]
    assert set(training) == {"none", "mac", "mag"}
    for kind, r in training.items():
        assert r["status"] == "ok", (kind, r)
        assert r["precision"] == "fp32" and r["engine"] == "torch" and r["steps_logged"] == r["steps"] >= 2
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0

    # 4. memory: one MAC step per length, peak RSS growth reported on CPU
    memory = checks["memory"]
    assert len(memory) >= 3 and all(r["status"] == "ok" and r["model"] == "mac" for r in memory)
    assert all("peak_rss_growth_mib" in r and r["saved_tensors_mib"] > 0 for r in memory)
    assert [r["n"] for r in memory] == sorted(r["n"] for r in memory)

    # one JSON line per measurement on stdout, then the summary
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(attn) + len(titans) + len(training) + len(memory) + 1
    assert lines[-1]["summary"] == "gpu_check" and lines[-1]["passed"] is True
