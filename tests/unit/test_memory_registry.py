"""The memory-kind registry: every kind is a spec, nothing outside the kinds' folders compares kind names,
launch/ imports nothing from train/, and each built-in spec agrees with the model it builds."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from memtrain.model import ModelConfig, build_model
from memtrain.model.errors import ModelConfigError
from memtrain.model.memory import MemorySpec, memory_kinds, memory_spec, register_memory, resolve, unregister_memory

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "memtrain"
BUILT_IN = ("none", "rmt", "lmm", "mac", "mag", "mal")
# A comparison with a memory kind's name: `memory == "rmt"`, `"mac" in (...)`, `memory in TITANS`, ...
# ("none" only next to `memory` / `kind`: `resume == "none"` is another setting)
KIND, NAMED = "|".join(BUILT_IN), "|".join(BUILT_IN[1:])
COMPARISON = re.compile(
    rf"""\b(memory|kind)\s*(==|!=)\s*["']({KIND})["']|\b(memory|kind)\s+(not\s+)?in\s+[\(\[A-Z]"""
    rf"""|(==|!=)\s*["']({NAMED})["']|["']({NAMED})["']\s*(==|!=|in\b|not\s+in\b)""")


def _exported_templates() -> set[Path]:
    """The Hugging Face modeling files copied into every export: they run without memtrain, so they branch on
    their own config.json (memtrain/train/hf/__init__.py: TEMPLATE_FILES)."""
    from memtrain.train.hf import TEMPLATE_FILES
    return {PACKAGE / "train" / "hf" / name for name in TEMPLATE_FILES}


def test_no_module_outside_the_kinds_compares_memory_kind_names():
    allowed = _exported_templates()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "model" / "memory" in path.parents or path in allowed:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if COMPARISON.search(code):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "ask the kind's spec (memory_spec(cfg.memory)) instead:\n" + "\n".join(found)


def test_the_checker_catches_a_comparison():
    for line in ('if cfg.memory == "rmt":', 'if m.memory in ("lmm", "mac"):', 'if memory not in TITANS_KINDS:',
                 'replay = "rmt" == kind', 'if self.memory != "none":', 'if block.kind == "mag":'):
        assert COMPARISON.search(line), line
    for line in ('if resume == "none":', 'if kind == "noise":', "peak memory in use"):
        assert not COMPARISON.search(line), line


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("part,forbidden", [("launch", ("memtrain.train",)),
                                            ("model", ("memtrain.train", "memtrain.launch", "deepspeed")),
                                            ("kernels", ("memtrain.train", "memtrain.launch", "deepspeed"))])
def test_layering(part, forbidden):
    """launch/ builds layouts, groups and stages and imports nothing from train/; model/ and kernels/ import
    neither train/ nor launch/ nor DeepSpeed (parallel layers come in through the factory)."""
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((PACKAGE / part).rglob("*.py"))
           for name in _imports(path) if name.startswith(forbidden)]
    assert not bad, "\n".join(bad)


def test_builtin_kinds_are_registered_in_order_and_unknown_ones_are_one_line_errors():
    assert memory_kinds()[:len(BUILT_IN)] == BUILT_IN
    with pytest.raises(ModelConfigError) as info:
        memory_spec("titans")
    assert "\n" not in str(info.value) and all(k in str(info.value) for k in BUILT_IN)
    with pytest.raises(ModelConfigError, match="model.memory='titans'"):
        ModelConfig(vocab_size=64, memory="titans").validate()


def test_registering_checks_the_spec_and_refuses_silent_replacement():
    spec = MemorySpec(name="test_kind_x", summary="x", model="memtrain.model.transformer:DecoderLM")
    try:
        register_memory(spec)
        assert memory_spec("test_kind_x") is spec
        with pytest.raises(ValueError, match="registered already"):
            register_memory(MemorySpec(name="test_kind_x", summary="y", model=spec.model))
        with pytest.raises(ValueError, match="names no pipeline_engine"):
            register_memory(MemorySpec(name="test_kind_y", summary="y", model=spec.model, pipeline="own"))
        with pytest.raises(ValueError, match="identifier"):
            register_memory(MemorySpec(name="a b", summary="y", model=spec.model))
    finally:
        unregister_memory("test_kind_x")
    assert "test_kind_x" not in memory_kinds()


@pytest.mark.parametrize("kind", BUILT_IN)
def test_each_spec_matches_the_model_it_builds(kind):
    """Its model class, its settings section, its parameter shapes (what export checks checkpoints against)
    and its pipeline engine are what the spec says."""
    from memtrain.train.hf.convert import native_shapes
    cfg = ModelConfig(vocab_size=100, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, num_meta_tokens=2,
                      memory=kind)
    cfg.titans.memory_heads = 2
    spec = memory_spec(kind)
    model = build_model(cfg)
    assert type(model) is spec.model_class()
    assert spec.settings is None or hasattr(cfg, spec.settings)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == native_shapes(cfg)
    if spec.pipeline == "own":
        assert callable(resolve(spec.pipeline_engine))
    assert spec.exported_as() is not None  # every built-in kind has a Hugging Face template
    assert spec.regions(cfg, 10)["text"][1] == 10


def test_architecture_doc_lists_every_spec_field():
    import dataclasses
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [f.name for f in dataclasses.fields(MemorySpec) if f"`{f.name}`" not in text]
    assert not missing, f"docs/architecture.md's spec table misses {missing}"
