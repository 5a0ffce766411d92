"""Read a checkpoint directory and merge its parallel shards into one full (TP = 1) state dict.

Training checkpoints (`memtrain-checkpoint-v2`) hold sharded tensors (memtrain/train/sharded.py): the full
weights are read from them directly, whatever the layout that wrote them (`read_full`). What follows describes
the one-file-per-rank format v1, which `import_hf` still writes (and older runs have).

    ckpt = resolve_checkpoint(Path("runs/demo"))      # a checkpoint dir, or a run dir -> its newest complete one
    meta = read_meta(ckpt)                            # validated meta.json
    state = merge_model_state(ckpt, meta)             # {native parameter name: full tensor}

Layouts. A checkpoint holds one `rankNNNNN.pt` per global rank; ranks are laid out as memtrain/launch/groups.py does:
tensor-parallel fastest, then context parallel, data parallel, pipeline stages
(`global = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank`). Model weights are identical across data-
and context-parallel replicas, so the merge reads the ranks of dp_rank 0, cp_rank 0: for every pipeline stage its
TP ranks, whose split parameters are concatenated along their `partition_dims` entry; then the stages' name sets
are united (each stage's file holds only its own layers, under the model's names: `PipelineEngine.model_state`).
A name on two stages (the tied token embedding, on the first and the last stage) must be bit-identical there.
ZeRO: the trainer writes each rank's `model` entry already gathered (`engine.model_state()` gathers ZeRO-3
partitions; DeepSpeed's own files in `deepspeed/`, pipeline layer files included, are not needed here), so ZeRO
checkpoints merge like plain ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import FORMAT_V1, FORMAT_V2, CheckpointError
from ..checkpoint import read_meta as read_checkpoint_meta
from . import ExportError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LAYOUT_KEYS = ("world", "rank", "tp", "dp", "tp_rank", "dp_rank")


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` names: itself, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} is not a directory")
    if path.name.startswith(".tmp-"):
        raise ExportError(f"{path} is an interrupted save (a .tmp-* directory), not a complete checkpoint")
    if (path / "meta.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    complete = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
                      and (p / "meta.json").is_file())
    if complete:
        return complete[-1]
    partial = sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-") or _STEP_DIR.match(p.name))
    if partial:
        raise ExportError(f"{root} holds no complete checkpoint, only interrupted saves ({', '.join(partial)})")
    raise ExportError(f"{path} is neither a checkpoint (no meta.json) nor a run directory with checkpoints/")


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of `ckpt` (memtrain.train.checkpoint.read_meta), checked for the fields the merge needs."""
    try:
        meta = read_checkpoint_meta(ckpt, (FORMAT_V2, FORMAT_V1))
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    layout = meta["layout"]
    if any(not isinstance(layout.get(k), int) for k in _LAYOUT_KEYS):
        raise ExportError(f"{ckpt / 'meta.json'} has no valid layout (needs {', '.join(_LAYOUT_KEYS)})")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("model"), dict):
        raise ExportError(f"{ckpt / 'meta.json'} holds no resolved config with a [model] section")
    if meta["format"] == FORMAT_V1 and not isinstance(meta.get("partition_dims"), dict):
        raise ExportError(f"{ckpt / 'meta.json'} has no partition_dims table")
    if meta["format"] == FORMAT_V2 and not isinstance(meta.get("shapes"), dict):
        raise ExportError(f"{ckpt / 'meta.json'} has no shapes table")
    for key in ("pp", "cp"):
        if not isinstance(layout.get(key, 1), int) or layout.get(key, 1) < 1:
            raise ExportError(f"{ckpt / 'meta.json'}: layout has {key}={layout.get(key)!r}")
    if layout["tp"] * layout["dp"] * layout.get("pp", 1) * layout.get("cp", 1) != layout["world"]:
        raise ExportError(f"{ckpt / 'meta.json'}: layout {layout} does not multiply to its world size")
    return meta


def model_shard_ranks(layout: dict[str, Any]) -> list[list[int]]:
    """Global ranks holding one full copy of the model (dp_rank 0, cp_rank 0): per pipeline stage, its TP ranks."""
    tp, cp, dp = layout["tp"], layout.get("cp", 1), layout["dp"]
    return [[pp_rank * dp * cp * tp + tp_rank for tp_rank in range(tp)] for pp_rank in range(layout.get("pp", 1))]


def check_complete(ckpt: Path, layout: dict[str, Any]) -> None:
    """Every rank of the layout must have written its file (a missing one means an incomplete copy)."""
    missing = [f"rank{r:05d}.pt" for r in range(layout["world"]) if not (ckpt / f"rank{r:05d}.pt").is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ExportError(f"checkpoint {ckpt} is incomplete: {len(missing)} of {layout['world']} rank files "
                          f"missing ({shown})")


def load_rank_model(path: Path) -> dict[str, torch.Tensor]:
    from ..checkpoint import safe_torch_load
    try:
        # mmap: only the model tensors are read from disk, not the (2x larger) optimizer state next to them;
        # weights only: nothing in the file can run code
        state = safe_torch_load(path, "cpu", mmap=True)
    except CheckpointError as e:  # a truncated, foreign or crafted file: report it, do not crash or run it
        raise ExportError(str(e)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ExportError(f"{path} holds no model state dict")
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def _merge_tp(ckpt: Path, ranks: list[int], dims: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One pipeline stage: its TP ranks' shards concatenated along `partition_dims` (replicated: checked equal)."""
    shards = [load_rank_model(ckpt / f"rank{r:05d}.pt") for r in ranks]
    names = list(shards[0])
    for r, shard in zip(ranks[1:], shards[1:]):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))[:3]
            raise ExportError(f"ranks {ranks[0]} and {r} of {ckpt} (TP peers) hold different parameters ({diff}): "
                              f"files from different runs?")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        dim = dims.get(name)
        if dim is None or len(parts) == 1:
            for r, p in zip(ranks[1:], parts[1:]):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise ExportError(f"replicated parameter {name} differs between ranks {ranks[0]} and {r} of "
                                      f"{ckpt}: files from different runs?")
            merged[name] = parts[0].clone()
        else:
            merged[name] = torch.cat(parts, dim=int(dim))
    return merged


def merge_model_state(ckpt: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full, unsharded native state dict (vocab padding kept) of checkpoint `ckpt`."""
    layout = meta["layout"]
    check_complete(ckpt, layout)
    if meta["format"] == FORMAT_V2:
        from ..sharded import read_full
        try:
            return read_full(ckpt / "state", meta["shapes"])
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - DCP reports a truncated or foreign file in many ways
            raise ExportError(f"checkpoint {ckpt}: its sharded tensors cannot be read "
                              f"({str(e).strip().splitlines()[-1][:200]})") from None
    merged: dict[str, torch.Tensor] = {}
    for stage, ranks in enumerate(model_shard_ranks(layout)):
        for name, t in _merge_tp(ckpt, ranks, meta["partition_dims"]).items():
            if name in merged and not torch.equal(merged[name], t):
                raise ExportError(f"parameter {name} differs between pipeline stages of {ckpt} (stage {stage}): "
                                  f"files from different runs?")
            merged[name] = t
    return merged
