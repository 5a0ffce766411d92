"""The one helper that runs a function on N real gloo ranks (separate processes) and collects results.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

`fn` must live at module level of an importable module (spawned processes import it by name).
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N ranks share 2 cores: oversubscription only slows everyone down
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"{rank}.pt")
        raise
    finally:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _remove_deepspeed_shm(port: int) -> None:
    """DeepSpeed's CPU backend maps a ~66 MB shared-memory buffer per rank (/dev/shm) and never unlinks it:
    without this, every multi-rank DeepSpeed test would leave ~130 MB in RAM until reboot."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; returns each rank's result."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(fn, world_size, port, out_dir, args), nprocs=world_size, join=True)
        except mp.ProcessRaisedException:
            pass  # reported below with the rank's own traceback
        finally:
            _remove_deepspeed_shm(port)
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died without a result")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["result"])
        return results
