"""`MemorySpec`: everything the rest of memtrain may ask about a memory kind, in one record.

The trainer, the engines, the parallel layout, FLOPs, export and inspect never compare `model.memory` with a
name: they look the kind up (`memory_spec(cfg.memory)`) and ask its spec. A kind is one folder under
`memtrain/model/memory/` (its model, its settings, its spec) plus one line in the registry table
(`memtrain/model/memory/__init__.py`); a kind defined outside memtrain registers itself with `register_memory`.
docs/architecture.md has the field table and a worked example.

Hooks are plain functions of the model config (no torch work, nothing built), so config checks and FLOPs can ask
them before a model exists. Callables that would import heavy code (the model class, a pipeline schedule) are
resolved on first use, so the registry imports nothing but configs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from ..config import ModelConfig
    from ..factory import LayerFactory

    ModelCheck = Callable[[ModelConfig], None]


def _never(cfg: ModelConfig) -> bool:
    return False


def _none(cfg: ModelConfig) -> None:
    return None


def _one(cfg: ModelConfig, seq_len: int) -> float:
    return 1.0


def _zero(cfg: ModelConfig) -> float:
    return 0.0


def _no_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {}


def _no_rules(cfg: ModelConfig, parallel: Any, seq_len: int) -> None:
    return None


def _no_keys(cfg: ModelConfig, layer: int, seq_len: int) -> int | None:
    return None


def _plain_rows(cfg: ModelConfig, tokens: int) -> list[tuple[int, str]]:
    return [(cfg.num_meta_tokens + tokens, "model.num_meta_tokens + data.seq_len / parallel.cp")]


def plain_regions(cfg: ModelConfig, n: int) -> dict[str, tuple[int, int]]:
    """Position regions of one pass of n positions through the blocks: [meta (P); text]."""
    P = cfg.num_meta_tokens
    return {"meta": (0, P), "text": (P, n)}


def resolve(target: str) -> Any:
    """`"package.module:attribute"` -> the attribute (imported now)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class MemorySpec:
    """One memory kind (`model.memory = name`). Defaults describe the plain decoder: override what differs."""

    name: str
    """The value of `model.memory` that selects this kind."""

    summary: str
    """One line for docs, `--help` and the exported model card."""

    model: str
    """`"module:Class"` of the model (a `DecoderLM` subclass taking `(cfg, factory)`), imported on first build."""

    settings: str | None = None
    """The `ModelConfig` field holding this kind's own settings (`"rmt"` -> `[model.rmt]`), or None."""

    check: Callable[[ModelConfig], None] = _none
    """Checks of the kind's own settings against the model section; raises ModelConfigError naming the key."""

    stateful: bool = False
    """`forward(tokens, targets, state)` returns a state that continues the sequence in the next call."""

    # ---- training ------------------------------------------------------------------------------------
    tokens_for_step: Callable[[ModelConfig, int, int], int] | None = None
    """(cfg, step, seq_len) -> tokens of each sample the step trains on (a curriculum); None: all seq_len."""

    own_backward: Callable[[ModelConfig], bool] = _never
    """True when `model.loss_and_backward(tokens, targets)` must replace `loss.backward()` (the RMT's memory
    replay): the step then runs on the plain torch engine, without pipeline or context parallelism."""

    segment: Callable[[ModelConfig], tuple[int, str] | None] = _none
    """(L, config key) when text runs in segments of L tokens on an absolute grid: training lengths and context-
    parallel slices must hold whole segments. None: any length."""

    divergence_hint: Callable[[ModelConfig], str | None] = _none
    """(cfg) -> what to try, added to the error when the training loss stops being finite; None: no hint beyond
    the learning rate and the data."""

    # ---- cost (memtrain/train/flops.py) --------------------------------------------------------------
    attention_keys: Callable[[ModelConfig, int, int], int | None] = _no_keys
    """(cfg, layer, seq_len) -> keys a position attends to in that layer; None: the plain decoder's count."""

    positions_per_token: Callable[[ModelConfig, int], float] = _one
    """(cfg, seq_len) -> positions run through the blocks per text token (RMT: meta and memory rows too)."""

    memory_flops_per_token: Callable[[ModelConfig], float] = _zero
    """Training FLOPs per text token of the memory's own work that no weight matmul counts (Titans' update)."""

    plan: str | None = None
    """Module with the kind's activation estimate for `memtrain plan`: `layer_elements(cfg, shapes, mode)`,
    `state_bytes(cfg, shapes, layers, act_bytes)` and `STATE_LABEL` (memtrain/model/activations.py is the plain
    block's). None: the planner uses the plain block's estimate and says so."""

    # ---- parallel layout -----------------------------------------------------------------------------
    pipeline: str = "stages"
    """How `parallel.pp > 1` runs it: "stages" (DeepSpeed's pipeline over `model.stages()`), "own" (the
    schedule `pipeline_engine`), "unsupported" (parallel.pp must be 1)."""

    pipeline_engine: str | None = None
    """`"module:Class"` of its own pipeline engine when `pipeline == "own"` (memtrain/train/engines/...)."""

    cp_sequential: Callable[[ModelConfig], bool] = _never
    """True when context-parallel ranks run one after another (memory state handed rank to rank): ZeRO-3's
    collective weight gathers would deadlock."""

    cp_min_slice: Callable[[ModelConfig], tuple[int, str] | None] = _none
    """(n, why) when every context-parallel slice needs at least n tokens (a convolution's halo)."""

    sequence_rows: Callable[[ModelConfig, int], list[tuple[int, str]]] = _plain_rows
    """(cfg, text tokens a rank holds) -> [(rows, what they are)]: the lengths of the `[B, rows, D]` sequences its
    blocks run (meta tokens included); under sequence parallelism each must split evenly over the TP ranks."""

    check_run: Callable[[ModelConfig, Any, int], None] = _no_rules
    """(model cfg, parallel section, training seq_len) -> raises ModelConfigError for kind-specific rules of a run
    that the fields above do not cover (the generic ones live in `memtrain.launch.config.check_layout`)."""

    # ---- export and inspection -----------------------------------------------------------------------
    hf_memory: str | None = ""
    """`memory` of the exported config.json: the exported modeling code's name for this architecture ("" =
    `name`; None: no Hugging Face template, export refuses with one line)."""

    block_shapes: Callable[[ModelConfig, str], dict[str, tuple[int, ...]]] | None = None
    """(cfg, "blocks.i.") -> native parameter shapes of block i (full, TP = 1); None: the plain block's."""

    top_shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]] = _no_shapes
    """Native shapes of the kind's parameters outside the blocks (embedding and head are everyone's)."""

    regions: Callable[[ModelConfig, int], dict[str, tuple[int, int]]] = plain_regions
    """(cfg, n) -> named [start, end) position ranges of a pass of n positions (attention-map quadrants)."""

    inspect: frozenset[str] = field(default_factory=lambda: frozenset({"registers", "attention"}))
    """What `memtrain inspect` can show: "registers", "attention" (maps), "gates" (Titans-style θ, η, α)."""

    describe: Callable[[ModelConfig], str] = lambda cfg: ""
    """(cfg) -> a sentence on the memory as configured, for the model card ("" for none)."""

    # ---- resolved on use -----------------------------------------------------------------------------
    def build(self, cfg: ModelConfig, factory: LayerFactory | None = None) -> nn.Module:
        """The model of this kind with layers from `factory` (plain torch when None)."""
        return resolve(self.model)(cfg, factory)

    def model_class(self) -> type:
        return resolve(self.model)

    def exported_as(self) -> str | None:
        return self.name if self.hf_memory == "" else self.hf_memory

    def settings_of(self, cfg: ModelConfig) -> Any:
        """The kind's own settings section of `cfg` (None when it has none)."""
        return getattr(cfg, self.settings) if self.settings else None
