"""Shared pytest set-up: GPU-only tests are skipped without CUDA; fp64 helpers."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# DeepSpeed JIT-compiles a shared-memory CPU op on its first start. torch's builder waits forever on the
# lock file of a build that was killed, and ~/.cache outlives a test run: keep the build in the checkout
# (inherited by every rank the tests start), so a fresh clone never meets a stale lock.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))


_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Unlink the shared-memory buffers DeepSpeed's CPU backend left by ranks this session started (the e2e
    launcher runs; tests/dist/spawn.py removes its own): ~66 MB of RAM each until reboot otherwise."""
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if path.stat().st_mtime >= _SESSION_START:
                path.unlink()
        except OSError:
            pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
