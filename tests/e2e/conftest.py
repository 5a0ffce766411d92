"""A tiny prepared dataset shared by the end-to-end tests (a few stdlib files, a small vocabulary)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib_tiny"
    subprocess.run([sys.executable, "-m", "memtrain.data.prepare", "--source", "stdlib", "--max-files", "40",
                    "--vocab-size", "512", "--out", str(out), "--quiet", "--val-every", "10"],
                   cwd=ROOT, check=True, timeout=900)
    return out
