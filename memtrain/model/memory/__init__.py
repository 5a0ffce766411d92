"""The memory kinds of the decoder, one folder each, registered in one table.

    from memtrain.model.memory import memory_spec
    spec = memory_spec(cfg.memory)          # the MemorySpec of model.memory; one-line error for unknown names
    model = spec.build(cfg, factory)

Built in: `none` (the plain decoder with meta tokens), `rmt` (memtrain/model/memory/rmt/), Titans `lmm`, `mac`,
`mag`, `mal` (memtrain/model/memory/titans/). A kind defined elsewhere calls `register_memory(MemorySpec(...))`
before its config is validated; docs/architecture.md shows one end to end.
"""
from __future__ import annotations

import importlib

from ..errors import ModelConfigError
from .spec import MemorySpec, plain_regions, resolve

_REGISTRY: dict[str, MemorySpec] = {}


def register_memory(spec: MemorySpec, *, replace: bool = False) -> MemorySpec:
    """Add `spec` to the registry (`model.memory = spec.name` then selects it); returns it."""
    if not spec.name or not spec.name.replace("_", "").isalnum():
        raise ValueError(f"memory kind name {spec.name!r} must be a non-empty identifier")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"memory kind {spec.name!r} is registered already (pass replace=True to override it)")
    if spec.pipeline not in ("stages", "own", "unsupported"):
        raise ValueError(f"memory kind {spec.name!r}: pipeline must be stages, own or unsupported, got {spec.pipeline!r}")
    if spec.pipeline == "own" and not spec.pipeline_engine:
        raise ValueError(f"memory kind {spec.name!r} runs its own pipeline schedule but names no pipeline_engine")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_memory(name: str) -> None:
    """Remove a registered kind (tests that register one of their own clean up with this)."""
    _REGISTRY.pop(name, None)


def memory_kinds() -> tuple[str, ...]:
    """Names of every registered kind, in registration order."""
    return tuple(_REGISTRY)


def memory_spec(name: str) -> MemorySpec:
    """The spec of kind `name`; ModelConfigError (one line, listing the kinds) when none is registered.

    Kinds of installed packages register through the entry-point group `memtrain.memory_kinds` (each entry a
    module whose import registers its kinds), loaded the first time a name is missing."""
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelConfigError(f"model.memory={name!r} is not one of {', '.join(_REGISTRY)} (a kind of your own: "
                               f"list the module that registers it in `plugins`)") from None


def load_plugins(modules: list[str]) -> None:
    """Import `modules` (the config's `plugins`): each may register memory kinds. One-line ModelConfigError for
    a module that cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ModelConfigError(f"plugins: cannot import {name!r} ({e}); is it on the Python path of every "
                                   f"rank?") from None


_ENTRY_POINTS_LOADED = False


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points
    for entry in entry_points(group="memtrain.memory_kinds"):
        entry.load()


# ---- the registry table: one line per built-in kind ---------------------------------------------------
from .baseline import SPEC as _none  # noqa: E402
from .rmt import SPEC as _rmt  # noqa: E402
from .titans import SPECS as _titans  # noqa: E402

for _spec in (_none, _rmt, *_titans):
    register_memory(_spec)

__all__ = ["MemorySpec", "load_plugins", "register_memory", "unregister_memory", "memory_kinds", "memory_spec",
           "plain_regions", "resolve"]
