"""One run per run directory: a lock held for the run's life, and the checks made before anything is built.

Rank 0 claims the directory (`claim_run_dir`) before the model exists: it must be writable, hold no other live
run (an advisory `flock` on `RUN_DIR/.memtrain.lock`, released by the kernel when the process dies, so a lock
left by a killed run is reclaimed by the next one), hold no checkpoints of an earlier run unless the new run
resumes or overwrites them, and have room for a checkpoint. Leftovers of an interrupted save are removed.
docs/reliability.md lists what each failure looks like.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .checkpoint import list_checkpoints, remove_leftovers

LOCK_NAME = ".memtrain.lock"
RUN_FILES = ("checkpoints", "tb", "metrics.jsonl", "summary.json", "config.toml", "deepspeed.json")


class RunDirError(Exception):
    """The run directory cannot be used for this run; the one-line message says why and what to do."""


class RunLock:
    """The open, `flock`ed lock file of a claimed run directory (released on `release()` or process exit)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _lock(run_dir: Path) -> RunLock:
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(f"run directory {run_dir} is in use by another run ({owner}); wait for it to finish or "
                          f"use another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    return RunLock(fd, path)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run directory {run_dir} is not writable ({e.strerror or e}): choose another "
                          f"--run-dir or fix its permissions") from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def claim_run_dir(run_dir: Path, *, resume: str, overwrite: bool, checkpoint_bytes: int,
                  minimum_bytes: int = 0) -> RunLock:
    """Rank 0, before the model is built: lock `run_dir` for this run and check it (module docstring).

    `resume` is the `--resume` value ("none", "auto" or a path); `checkpoint_bytes` the estimated size of one
    checkpoint of the whole run. Raises RunDirError with one line."""
    _check_writable(run_dir)
    lock = _lock(run_dir)
    try:
        ckpt_root = run_dir / "checkpoints"
        existing = list_checkpoints(ckpt_root)
        if overwrite:
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    trash = run_dir / f".trash-{name}-{os.getpid()}"
                    os.replace(path, trash)  # out of the way at once; deleted after
                    shutil.rmtree(trash, ignore_errors=True)
                elif path.exists():
                    path.unlink()
            existing = []
        elif existing and (resume == "none" or (resume != "auto"
                                                 and Path(resume).resolve().parent != ckpt_root.resolve())):
            # a new run, or one started from a checkpoint elsewhere, would mix its checkpoints with these
            raise RunDirError(f"run directory {run_dir} holds checkpoints of an earlier run (newest "
                              f"{existing[-1].name}): continue it with --resume auto, use a new --run-dir, or "
                              f"replace it with --overwrite")
        remove_leftovers(ckpt_root)
        free = shutil.disk_usage(run_dir).free
        if minimum_bytes > free:
            raise RunDirError(f"run directory {run_dir} has {_human(free)} free, one checkpoint of this run needs "
                              f"at least {_human(minimum_bytes)}: free space or choose another --run-dir")
        if checkpoint_bytes > free:
            print(f"warning: run directory {run_dir} has {_human(free)} free, a checkpoint of this run may need up "
                  f"to {_human(checkpoint_bytes)}", file=sys.stderr, flush=True)
    except BaseException:
        lock.release()
        raise
    return lock


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of `metrics.jsonl` up to `step` (a resumed run writes the later ones again); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line torn by a crash mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
