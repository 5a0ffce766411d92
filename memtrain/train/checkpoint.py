"""Atomic checkpoints: written under a temporary name, renamed when complete, the newest K kept.

    RUN_DIR/checkpoints/step_00000100/{meta.json, rank00000.pt, ...}

A crash mid-save leaves only a `.tmp-*` directory, which is never mistaken for a checkpoint.
Every rank writes its own file (its model shard, optimizer, stream and RNG state); rank 0 writes
meta.json (step, layout, resolved config) and does the rename after a barrier. Rank 0 flushes every file
it sees before the rename: on several machines the run directory must be on a shared file system.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(ckpt_root: Path, step: int, rank_state: dict[str, Any], meta: dict[str, Any],
                    *, rank: int = 0, keep: int = 3, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write this rank's state and (rank 0) the metadata; returns the final checkpoint directory.

    `write_extra(tmp_dir)` runs on every rank before `rank_state` is written, for state that others
    save themselves (DeepSpeed's engine checkpoint); it may add entries to `rank_state`.
    """
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if write_extra is not None:
        write_extra(tmp)
    torch.save(rank_state, tmp / f"rank{rank:05d}.pt")
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    _barrier()
    if rank == 0:
        for path in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        old = ckpt_root / f".old-step_{step:08d}"
        if final.exists():  # a re-run of this step: swap, so a complete checkpoint exists at every moment
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
                  and (p / "meta.json").is_file())


def load_checkpoint(path: Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this rank's state, metadata) of the checkpoint directory `path`."""
    meta_file, state_file = path / "meta.json", path / f"rank{rank:05d}.pt"
    if not meta_file.is_file() or not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {meta_file.name} or {state_file.name})")
    return torch.load(state_file, map_location="cpu", weights_only=False), json.loads(meta_file.read_text())
