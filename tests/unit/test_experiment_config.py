"""The long-context experiment's config, symbolic tasks and report helpers: validation, bad input, determinism."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memtrain.data.errors import DataError
from memtrain.data.tasks.symbolic import (ID, ROOM_IDS, SYMBOLIC_TASKS, VALUE_IDS, VOCAB, chance, decode, encode,
                                 symbolic_batch, symbolic_example)
from memtrain.train.configtree import ConfigError, field_docs
from memtrain.train.experiment.config import (LongContextConfig, TrainSettings, VariantSettings, load_experiment_config,
                                              variant_model)
from memtrain.train.experiment.report import markdown_table
from memtrain.train.experiment.training import lr_at, train_length

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "experiments" / "long_context.toml"


def test_every_field_has_a_docstring():
    for cls in (LongContextConfig, TrainSettings, VariantSettings):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_preset_loads_and_variants_share_width_and_depth():
    cfg = load_experiment_config(PRESET)
    models = {v: variant_model(cfg, v) for v in cfg.variants}
    assert {(m.d_model, m.n_layers, m.n_heads) for m in models.values()} == {(cfg.model.d_model, cfg.model.n_layers,
                                                                             cfg.model.n_heads)}
    assert models["window"].memory == "none" and models["window"].num_meta_tokens == 0
    assert models["meta"].num_meta_tokens == cfg.meta_tokens
    assert models["mac"].memory == "mac" and models["rmt"].memory == "rmt"
    assert models["window"].max_seq_len >= max(cfg.eval_lengths)  # stateless: one call per example


@pytest.mark.parametrize("override, words", [
    ('variants=["window", "lstm"]', "unknown entry 'lstm'"),
    ('tasks=["qa4"]', "unknown entry 'qa4'"),
    ("train_len=100", "not a multiple of model.rmt.segment_len"),
    ("eval_multiples=[1, 4, 2]", "increasing whole multiples"),
    ("eval_multiples=[0, 1]", "increasing whole multiples"),
    ("model.window=128", "must be below train_len"),
    ('model.memory="rmt"', "the variants set them"),
    ("eval_piece=1000", "eval_piece=1000 must be a multiple"),
    ("train.curriculum=[[0, 32], [10, 256]]", "must end at train_len=128"),
    ("train.curriculum=[[0, 32], [10, 64]]", "must end at train_len=128"),
    ("train.curriculum=[[0, 32], [900, 128]]", "after the last step"),
    ("train.curriculum=[[5, 1]]", "train.curriculum must start at step 0"),
    ("train.steps=0", "train.steps must be >= 1"),
    ('filler="lorem"', "filler must be noise or random"),
    ("events=2", "events must be >= 3"),
    ("train.curriculum=[[0, 32], [10, 128]]", "do not fit 32 tokens"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("model.titans.alpha_init=2.0", "model.titans.alpha_init must lie in (0, 1)"),
    ('variant_settings.rmt=["windw=0"]', "variant_settings.rmt: unknown config key 'model.windw'"),
    ("variant_settings.rmt=['memory=\"mac\"']", "variant_settings.rmt: memory is what the variant itself sets"),
    ('variant_settings.rmt=["rmt.num_memory=0"]', "variant rmt with variant_settings.rmt="),
    ('variant_settings.lstm=["window=0"]', "unknown config key 'variant_settings.lstm'"),
    ("train.one_segment_steps=600", "train.one_segment_steps=600 must lie in [0, train.steps=600)"),
    ("train.one_segment_steps=-2", "must lie in [0, train.steps=600)"),
    ('train.one_segment_variants=["mag"]', "train.one_segment_variants: mag does not run in segments"),
    ('train.one_segment_variants=["lstm"]', "train.one_segment_variants: unknown entry 'lstm'"),
])
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_experiment_config(PRESET, [override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_experiment_config(ROOT / "configs" / "experiments" / "nope.toml")


def test_cli_bad_input_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "memtrain.train.experiment", "long_context", "--config", str(PRESET),
                           "--set", 'variants=["window", "lstm"]'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: variants: unknown entry")


def test_symbolic_examples_exact_length_answer_last_and_deterministic():
    for task in SYMBOLIC_TASKS:
        for filler in ("noise", "random"):
            a = symbolic_example(task, 96, 0, "val", 3, 4, filler)
            b = symbolic_example(task, 96, 0, "val", 3, 4, filler)
            assert len(a.tokens) == 96 and a.tokens[-1] == a.answer and a.tokens[-2] == ID["answer"]
            assert np.array_equal(a.tokens, b.tokens)
            assert (a.answer in VALUE_IDS) if task == "niah_single" else (a.answer in ROOM_IDS)
    other = symbolic_example("qa1", 96, 0, "train", 3, 4)
    assert not np.array_equal(other.tokens, symbolic_example("qa1", 96, 0, "val", 3, 4).tokens)


def test_needle_value_is_in_the_haystack_once_and_matches_the_answer():
    x, y = symbolic_batch("niah_single", 300, 1, "val", 0, 8, filler="random")
    for row, ans in zip(x, y):
        assert list(row[:-1]).count(ans) == 1  # the value appears only in the needle
        text = decode(row)
        key = text.split("magic number for ")[-1].split(" ?")[0]
        assert f"magic number for {key} is {VOCAB[ans]} ." in text


def test_qa_answer_follows_from_the_story():
    ex = symbolic_example("qa1", 200, 0, "val", 5)
    actor = ex.meta["question"].split()[-1].rstrip("?")
    rooms = re.findall(rf"{actor} (?:moved|went|journeyed|travelled)(?: back)? to the (\w+) \.", decode(ex.tokens))
    assert rooms and VOCAB[ex.answer] == rooms[-1]


def test_symbolic_bad_input():
    with pytest.raises(DataError, match="too short"):
        symbolic_example("qa3", 20, 0, "val", 0, 6)
    with pytest.raises(DataError, match="unknown task"):
        symbolic_example("qa9", 200, 0, "val", 0)
    with pytest.raises(DataError, match="unknown filler"):
        symbolic_example("qa1", 200, 0, "val", 0, filler="lorem")
    with pytest.raises(DataError, match="not in the symbolic vocabulary"):
        encode("magic number for nobody")


def test_chance_levels():
    assert chance("niah_single") == 1 / 16 and chance("qa1") == 1 / 6 and chance("qa3") == 1 / 5


def test_schedule_and_curriculum():
    cfg = load_experiment_config(PRESET, ["train.steps=100", "train.warmup_steps=10",
                                          "train.curriculum=[[0, 64], [50, 128]]",
                                          "train.one_segment_steps=0"])
    assert lr_at(0, cfg) == pytest.approx(cfg.train.lr / 10) and lr_at(9, cfg) == pytest.approx(cfg.train.lr)
    assert lr_at(100, cfg) == pytest.approx(cfg.train.lr / 10)
    assert train_length(0, cfg) == 64 and train_length(49, cfg) == 64 and train_length(50, cfg) == 128


def test_markdown_table_marks_missing_cells_empty():
    rows = [{"variant": "window", "task": "qa1", "length": "128", "accuracy": "0.5"}]
    md = markdown_table(rows, ["window", "rmt"], ["qa1"], [128, 256], 128)
    assert "| window | 50 |  |" in md and "| rmt |  |  |" in md and "chance 16.7%" in md
