"""No shared memory left behind: DeepSpeed's CPU all-reduce buffers in /dev/shm.

On CPU, `deepspeed.comm` creates one shared-memory segment per rank (`deepspeed_allreduce_buffer_{uid}_{addr}_
{port}_{rank}`, about 66 MB each) and every rank maps all of them; nobody unlinks them, so each run leaves its
buffers in RAM until reboot. `release_shm_buffers` runs once every rank has mapped them (a barrier after
DeepSpeed's initialisation): each rank unlinks its own name, so the memory is freed when the last process
unmaps it, at exit, on a stop signal or a kill alike. Local rank 0 also unlinks buffers of this user that no
live process maps (a run killed before it got here).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def _mapped() -> set[str]:
    """Paths under /dev/shm that some live process has mapped or open (as far as /proc lets us see)."""
    seen = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    seen.add(line.split(None, 5)[-1].replace(" (deleted)", ""))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    seen.add(target)
        except OSError:  # the process ended while we looked, or is not ours to read
            continue
    return seen


def reclaim_stale_buffers() -> list[Path]:
    """Unlink this user's DeepSpeed buffers that no live process maps; returns them."""
    if not SHM.is_dir():
        return []
    candidates = list(SHM.glob(f"{PREFIX}_{os.getuid()}_*"))
    if not candidates:
        return []
    in_use = _mapped()
    stale = [p for p in candidates if str(p) not in in_use]
    for p in stale:
        try:
            p.unlink()
        except OSError:
            pass
    return stale


def release_shm_buffers() -> None:
    """Collective (every rank): unlink this rank's buffer once all ranks have mapped theirs (see module doc)."""
    if not dist.is_initialized():
        return
    dist.barrier()  # every rank has opened every other rank's segment by now (DeepSpeed's init waits for them)
    name = f"{PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_" \
           f"{dist.get_rank()}"
    try:
        (SHM / name).unlink()
    except OSError:
        pass  # not created (multi-node, GPU) or already gone
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        reclaim_stale_buffers()
