"""Sharded, reshardable tensors of a checkpoint, through `torch.distributed.checkpoint` (DCP).

Every tensor of a run's state has one canonical name and one global shape, whatever the layout that trains it:

    model.<DecoderLM name>                        the weights, fp32, full (TP = 1) shape
    optim.exp_avg.<name>, optim.exp_avg_sq.<name> AdamW's moments, same shape as the weight

A rank contributes the rectangles of that tensor it owns, in the tensor's global 2-D view `[R, C]`
(`R = prod(shape[:-1])`, `C = shape[-1]`; a vector is `[1, n]`): a whole TP shard (a block of rows, or of columns,
of the full tensor), or the pieces of a ZeRO flat fragment (a flat range of the TP shard is at most three
rectangles: the tail of one row, whole rows, the head of another). DCP writes each rectangle once (identical
replicas on several ranks are de-duplicated), records its global offset, and on load reads, for every rectangle
the *loading* layout asks for, the overlapping parts of whatever was saved: that is the resharding. Why DCP and
not megatron-core's dist_checkpointing or DeepSpeed's universal checkpoints: docs/distributed.md ("Checkpoints").

No code runs from a checkpoint: tensor files are read by DCP with `torch.load(weights_only=True)`, and its one
pickle, `.metadata`, through `_MetadataUnpickler`, which builds only DCP's own metadata records.
"""
from __future__ import annotations

import contextlib
import io
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .checkpoint import CheckpointError


@dataclass(frozen=True)
class Placement:
    """Where a rank's TP-local tensor sits in the full tensor's 2-D view `[rows, cols]`."""

    shape: tuple[int, ...]
    """The full (TP = 1) shape."""
    rows: int
    cols: int
    local_rows: int
    local_cols: int
    row0: int
    col0: int


def placement(local_shape: tuple[int, ...] | torch.Size, tp_dim: int | None, tp_rank: int = 0,
              tp_size: int = 1) -> Placement:
    """The placement of a TP shard of shape `local_shape`, split along `tp_dim` (None: replicated) over `tp_size`."""
    local_shape = tuple(int(s) for s in local_shape) or (1,)
    full = list(local_shape)
    if tp_dim is not None and tp_size > 1:
        full[tp_dim] *= tp_size
    local_rows, local_cols = math.prod(local_shape[:-1]), local_shape[-1]
    rows, cols = math.prod(full[:-1]), full[-1]
    row0 = col0 = 0
    if tp_dim is not None and tp_size > 1:
        if tp_dim == 0 and len(local_shape) > 1:  # the outermost dim: a block of whole rows
            row0 = tp_rank * local_rows
        elif tp_dim == len(local_shape) - 1:      # the last dim: a block of columns
            col0 = tp_rank * local_cols
        else:
            raise CheckpointError(f"a tensor of shape {local_shape} split over TP along dim {tp_dim} has no "
                                  f"rectangular 2-D view: only the first or the last dim can be split")
    return Placement(tuple(full), rows, cols, local_rows, local_cols, row0, col0)


def rectangles(flat: torch.Tensor, start: int, where: Placement) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """The rectangles, as (global offset, 2-D view of `flat`), of the flat range `[start, start + flat.numel())` of
    the TP-local tensor (row-major). Views share `flat`'s storage, so loading into them fills `flat`."""
    width, out, at, end = where.local_cols, [], start, start + flat.numel()

    def take(n_rows: int, n_cols: int) -> None:
        nonlocal at
        row, col = divmod(at, width)
        view = flat[at - start: at - start + n_rows * n_cols].view(n_rows, n_cols)
        out.append(((where.row0 + row, where.col0 + col), view))
        at += n_rows * n_cols

    if at < end and at % width:                 # the tail of a row
        take(1, min(width - at % width, end - at))
    if (end - at) // width:                     # whole rows
        take((end - at) // width, width)
    if at < end:                                # the head of a row
        take(1, end - at)
    return out


class Pieces:
    """One canonical tensor's rectangles on this rank, as DCP's planners see it (write items, chunk list, lookup)."""

    def __init__(self, where: Placement, parts: list[tuple[tuple[int, int], torch.Tensor]]):
        self.where = where
        self.parts = {offset: view for offset, view in parts if view.numel()}

    @classmethod
    def whole(cls, where: Placement, tensor: torch.Tensor) -> "Pieces":
        """The whole TP-local `tensor` (its storage is written to / read into)."""
        return cls(where, rectangles(tensor.reshape(-1), 0, where))

    @classmethod
    def fragment(cls, where: Placement, flat: torch.Tensor, start: int) -> "Pieces":
        """A flat fragment of the TP-local tensor starting at element `start` (ZeRO's partitions)."""
        return cls(where, rectangles(flat.reshape(-1), start, where))

    def size(self) -> torch.Size:
        return torch.Size((self.where.rows, self.where.cols))

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offset)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=view.shape),
                              properties=TensorProperties.create_from_tensor(view), size=self.size()))
                for offset, view in self.parts.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(offset), sizes=view.shape)
                for offset, view in self.parts.items()]

    def get(self, index: MetadataIndex) -> torch.Tensor:
        return self.parts[tuple(index.offset)]


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        # a copy of just the rectangle: torch.save of a view would write the whole storage behind it
        return obj.get(index).clone() if isinstance(obj, Pieces) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # the default set-up re-creates meta tensors and drops every value that is not a tensor (our Pieces);
        # ours are flat and on their device already
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.get(index) if isinstance(obj, Pieces) else super().lookup_tensor(index)


# DCP's metadata is a pickle: these (module, name) pairs are all it may name (records, torch.Size, dtypes).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch": {"Size", "strided", "contiguous_format", "preserve_format", "channels_last"},
    "torch.serialization": {"_get_layout"},  # a lookup among torch's layouts by name, nothing else
    "pathlib": {"PosixPath", "PurePosixPath"},  # the checkpoint_id DCP records (a path object is inert)
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(
                getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the checkpoint's metadata names {module}.{name}, which is not a DCP record")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader whose metadata unpickling builds DCP records only (never runs code from the file)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
        except Exception as e:  # noqa: BLE001 - a crafted or truncated pickle fails in many ways
            raise CheckpointError(f"refusing to load {path}: {str(e)[:200]}; loading it could run code, so "
                                  f"memtrain does not (was it written by memtrain?)") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not a torch.distributed.checkpoint metadata file")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _one_process():
    """DCP warns on every call without a process group that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_tensors(directory: Path, tensors: dict[str, Pieces]) -> None:
    """Write every rank's `tensors` into `directory` (collective when a process group is up)."""
    try:
        with _one_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(directory), single_file_per_rank=True),
                     planner=_SavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:  # every rank gets it (DCP agrees on failure): report the first cause
        causes = [getattr(f, "exception", f) for f in e.failures.values()]
        cause = next((c for c in causes if isinstance(c, OSError)), causes[0] if causes else None)
        raise cause if isinstance(cause, OSError) else OSError(str(cause or e).strip().splitlines()[-1]) from None


def _reader(directory: Path) -> tuple[SafeReader, Metadata]:
    """A reader of `directory` and its metadata, known to be sound (a bad one fails here, in one line, not inside
    DCP's collective load)."""
    if not (Path(directory) / ".metadata").is_file():
        raise CheckpointError(f"{directory} holds no sharded state (no .metadata): the checkpoint is incomplete "
                              f"or was written by an older memtrain")
    reader = SafeReader(str(directory))
    return reader, reader.read_metadata()


def load_tensors(directory: Path, tensors: dict[str, Pieces | torch.Tensor]) -> None:
    """Fill every rank's `tensors` (rectangles of the saved names, any layout) from `directory` (collective)."""
    reader, metadata = _reader(directory)
    missing = sorted(set(tensors) - set(metadata.state_dict_metadata))
    if missing:
        raise CheckpointError(f"checkpoint {directory} holds no {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}: it was written for another model or engine")
    with _one_process():
        dcp.load(tensors, storage_reader=reader, planner=_LoadPlanner(flatten_state_dict=False,
                                                                       flatten_sharded_tensors=False),
                 no_dist=not dist.is_initialized())


def saved_names(directory: Path) -> dict[str, tuple[int, int]]:
    """Name -> global 2-D size of every tensor saved in `directory` (reads the metadata only)."""
    _, metadata = _reader(directory)
    return {name: tuple(md.size) for name, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}


def _load_here(full: dict[str, torch.Tensor], directory: Path) -> None:
    """Whole tensors into `full`, in this process alone."""
    with _one_process():
        dcp.load(full, storage_reader=_reader(directory)[0], planner=DefaultLoadPlanner(), no_dist=True)


def read_full(directory: Path, shapes: dict[str, list[int]], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The whole tensors named `prefix + name` for each `shapes` entry, in this process alone (no group): what
    the HF export and the inspectors read. `shapes` gives each tensor's full shape (meta.json's `shapes`)."""
    full = {prefix + name: torch.empty(math.prod(shape[:-1]) if len(shape) > 1 else 1, shape[-1] if shape else 1)
            for name, shape in shapes.items()}
    _load_here(full, directory)
    return {name: full[prefix + name].reshape(shape) for name, shape in shapes.items()}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor saved in `directory`, whole, as its global 2-D view (tests and tools; one process)."""
    full = {name: torch.empty(size) for name, size in saved_names(directory).items()}
    _load_here(full, directory)
    return full
