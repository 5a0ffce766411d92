"""Atomic checkpoints: written under a temporary name, renamed when complete, the newest K kept.

    RUN_DIR/checkpoints/step_00000100/{meta.json, rank00000.pt, ...}

A crash mid-save leaves only a `.tmp-*` directory, which is never mistaken for a checkpoint (and is removed by
the next run). Every rank writes its own file (its model shard, optimizer, stream and RNG state); rank 0
writes meta.json (step, layout, resolved config) and does the rename after a barrier. Rank 0 flushes every
file it sees before the rename: on several machines the run directory must be on a shared file system.
Old checkpoints are removed as atomically as they were written: renamed out of the `step_*` namespace first,
then deleted, so a kill in between never leaves a `step_*` directory that looks complete but is not.

Loading never runs code from a file: rank files are read with `torch.load(weights_only=True)` (tensors,
numbers, strings and containers only), DeepSpeed's own files through `safe_torch_load` as well (see
docs/reliability.md).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LEFTOVERS = (".tmp-step_", ".old-step_", ".trash-step_")  # prefixes of directories no reader may trust

# meta.json's `format`: what a checkpoint directory holds
FORMAT_V1 = "memtrain-checkpoint-v1"  # one file per rank with its model shard (import_hf writes it; older runs)
FORMAT_V2 = "memtrain-checkpoint-v2"  # sharded weights and moments (memtrain/train/sharded.py) + small rank files
FORMAT = FORMAT_V2                    # what training writes, and the only one it resumes


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the one-line message names the path and the fix."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (one all-reduce)."""
    if not dist.is_initialized():
        return ok
    from memtrain.launch.groups import collective_device
    flag = torch.tensor([1 if ok else 0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _remove(path: Path, ckpt_root: Path) -> None:
    """Delete a checkpoint directory atomically: rename it out of the step_* namespace, then delete it."""
    trash = ckpt_root / f".trash-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(ckpt_root: Path, step: int, rank_state: dict[str, Any], meta: dict[str, Any],
                    *, rank: int = 0, keep: int = 3, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write this rank's state and (rank 0) the metadata; returns the final checkpoint directory.

    `write_extra(tmp_dir)` runs on every rank before `rank_state` is written, for state that others
    save themselves (DeepSpeed's engine checkpoint); it may add entries to `rank_state`. When any rank fails
    to write (disk full, no permission), every rank raises `CheckpointError`, the partial directory is removed
    and the previous checkpoints are untouched.
    """
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    problem = None
    try:
        if write_extra is not None:
            write_extra(tmp)
        torch.save(rank_state, tmp / f"rank{rank:05d}.pt")
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("file write failed")
        problem = e
    if not all_ok(problem is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(_write_failure(tmp, problem))
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
        for stale in list_checkpoints(ckpt_root)[:-keep]:
            _remove(stale, ckpt_root)
    _barrier()
    return final


def _write_failure(tmp: Path, problem: BaseException | None) -> str:
    if problem is None:
        return (f"another rank could not write its part of checkpoint {tmp.name} (see its error); the partial "
                f"checkpoint was removed, the previous ones are kept")
    full = isinstance(problem, OSError) and problem.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
        or "write failed" in str(problem) or "No space" in str(problem)
    cause = "the disk is full" if full else str(problem).strip().splitlines()[0][:160]
    return (f"could not write checkpoint {tmp.parent}/{tmp.name.removeprefix('.tmp-')} ({cause}); the partial "
            f"checkpoint was removed and the previous ones are kept: free space in {tmp.parent} (or lower "
            f"checkpoint.keep) and resume with --resume auto")


def remove_leftovers(ckpt_root: Path) -> list[Path]:
    """Delete `.tmp-*` / `.old-*` / `.trash-*` directories a killed save or rotation left; returns them."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(LEFTOVERS)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    """meta.json, the file of every rank it names (an interrupted deletion by an older version left step_*
    directories with meta.json only) and the sharded tensors' index."""
    if not (path / "meta.json").is_file():
        return False
    try:
        meta = _meta_json(path)
        world = int(meta.get("layout", {}).get("world", 1))
    except (CheckpointError, ValueError, TypeError, AttributeError):
        return False
    sharded = meta.get("format") == FORMAT_V2  # its sharded tensors' index is written last
    return all((path / f"rank{r:05d}.pt").is_file() for r in range(world)) and (
        not sharded or (path / "state" / ".metadata").is_file())


def _meta_json(path: Path) -> Any:
    """meta.json of checkpoint directory `path`, parsed; a missing or corrupt file raises `CheckpointError`."""
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({e})") from None


def read_meta(path: Path, formats: tuple[str, ...] | None = None) -> dict[str, Any]:
    """meta.json of checkpoint directory `path`: a table with a `layout` table and a `config`, of one of
    `formats` (any format when None). A missing, corrupt, foreign or other-format file raises `CheckpointError`
    with a one-line message."""
    meta = _meta_json(path)
    if formats is not None and (not isinstance(meta, dict) or meta.get("format") not in formats):
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {got!r}, expected {' or '.join(map(repr, formats))}")
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint {path}: meta.json holds no layout and config (not written by memtrain?)")
    return meta


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p))


def _numpy_globals() -> list:
    """numpy's array reconstruction, allowed for checkpoints written before the RNG state became tensors."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: str | Path, map_location: Any = "cpu", *, allow: tuple = (), mmap: bool = False) -> Any:
    """`torch.load` that never runs code from the file: weights-only unpickling (tensors, numbers, strings,
    containers) plus the classes in `allow`. A file that needs anything else raises `CheckpointError`."""
    try:
        with torch.serialization.safe_globals([*_numpy_globals(), *allow]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # noqa: BLE001 - the unpickler's refusal comes as several exception types
        first = str(e).strip().splitlines()
        why = next((line.strip() for line in first if "Unsupported global" in line), first[0] if first else type(e))
        raise CheckpointError(f"refusing to load {path}: it is not a plain tensor checkpoint ({str(why)[:200]}); "
                              f"loading it could run code, so memtrain does not (was it written by memtrain?)") from None


def load_checkpoint(path: Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this rank's state, metadata) of the checkpoint directory `path`."""
    meta_file, state_file = path / "meta.json", path / f"rank{rank:05d}.pt"
    if not meta_file.is_file() or not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {meta_file.name} or {state_file.name}): "
                              f"resume from another one (RUN_DIR/checkpoints/)")
    meta = _meta_json(path)  # parsed only: callers that need its layout and config call read_meta
    state = safe_torch_load(state_file)
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a memtrain rank state: was it written by memtrain?")
    return state, meta
