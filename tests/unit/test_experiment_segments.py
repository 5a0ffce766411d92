"""The long-context experiment's per-variant model settings and `train.one_segment_steps` (segment-based memories
train their first steps with each example as one segment): which variants they touch, the rebuild around the same
parameters and optimizer state, exact resume across the switch, one-line errors."""
from __future__ import annotations

import pytest
import torch

from memtrain.model.transformer import build_model
from memtrain.train.experiment.config import load_experiment_config, step_model, variant_model
from memtrain.train.experiment.long_context import variant_identity
from memtrain.train.experiment.training import _configured, train_variant

from .test_experiment_config import PRESET

TINY = ["model.d_model=32", "model.n_layers=1", "train_len=64", "eval_piece=64", "eval_multiples=[1]",
        "train.batch_size=2", "train.warmup_steps=1", "train.curriculum=[[0, 48], [3, 64]]", "events=3",
        "train.one_segment_steps=0", 'train.tasks=["niah_single"]', 'tasks=["niah_single"]']


def test_one_segment_steps_gives_segment_variants_example_long_segments_and_nothing_else():
    cfg = load_experiment_config(PRESET, ["train.one_segment_steps=300", 'train.one_segment_variants=["rmt", "mac"]'])
    for v in cfg.variants:
        before, after, final = step_model(cfg, v, 0), step_model(cfg, v, 300), variant_model(cfg, v)
        assert after == final
        if v in ("rmt", "mac"):  # the kinds whose spec says they run in segments
            assert before != final
            segment = before.rmt.segment_len if v == "rmt" else before.titans.segment_len
            assert segment == 64  # the curriculum's length at step 0: each example is one segment
            shapes = {k: p.shape for k, p in build_model(final).state_dict().items()}
            assert {k: p.shape for k, p in build_model(before).state_dict().items()} == shapes
        else:
            assert before == final
    off = load_experiment_config(PRESET, ["train.one_segment_steps=0"])
    assert all(step_model(off, v, 0) == variant_model(off, v) for v in off.variants)


def test_one_segment_variants_limits_it_to_the_variants_listed():
    cfg = load_experiment_config(PRESET, ["train.one_segment_steps=300", 'train.one_segment_variants=["rmt"]'])
    assert step_model(cfg, "rmt", 0).rmt.segment_len == 64
    assert step_model(cfg, "mac", 0) == variant_model(cfg, "mac")


def test_identity_names_one_segment_steps_only_where_it_shapes_the_variant():
    on, only_rmt, off = (load_experiment_config(PRESET, ["train.one_segment_steps=300" if steps else
                                                         "train.one_segment_steps=0", f"train.one_segment_variants={v}"])
                         for steps, v in ((1, '["rmt", "mac"]'), (1, '["rmt"]'), (0, '["rmt", "mac"]')))
    for v in on.variants:
        assert (variant_identity(on, v) != variant_identity(off, v)) == (v in ("rmt", "mac")), v
        assert (variant_identity(only_rmt, v) != variant_identity(off, v)) == (v == "rmt"), v
    assert "one_segment_steps" not in variant_identity(off, "mac")["train"]  # runs made before it still resume


def test_variant_settings_change_only_their_variant():
    cfg = load_experiment_config(PRESET, ['variant_settings.rmt=["window=0", "rmt.num_memory=4"]'])
    assert variant_model(cfg, "rmt").window == 0 and variant_model(cfg, "rmt").rmt.num_memory == 4
    base = load_experiment_config(PRESET)
    for v in cfg.variants:
        if v != "rmt":
            assert variant_model(cfg, v) == variant_model(base, v)


def test_memory_models_take_a_whole_training_example_in_one_call():
    cfg = load_experiment_config(PRESET, ["model.max_seq_len=64", "eval_piece=64", "train_len=256",
                                          "train.curriculum=[[0, 64], [300, 256]]", "train.one_segment_steps=400",
                                          'train.one_segment_variants=["rmt", "mac"]'])
    for v in ("rmt", "mac"):
        assert variant_model(cfg, v).max_seq_len >= 256 and step_model(cfg, v, 350).max_seq_len >= 256


def test_rebuild_keeps_parameters_and_optimizer_state_and_draws_no_random_numbers():
    cfg = load_experiment_config(PRESET, TINY + ["train.one_segment_steps=3", 'train.one_segment_variants=["mac"]'])
    model = build_model(step_model(cfg, "mac", 0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 20, (2, 47))).logits.sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    new, new_opt = _configured(model, opt, step_model(cfg, "mac", 3), cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    assert new is not model and new.cfg == variant_model(cfg, "mac")
    for (k, a), b in zip(model.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state_dict()["state"].values(), new_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert _configured(new, new_opt, new.cfg, cfg) == (new, new_opt)  # nothing to change: the same objects


class _Stop(Exception):
    pass


@pytest.mark.parametrize("variant", ["rmt", "mac"])
def test_resume_across_the_switch_equals_the_uninterrupted_run(tmp_path, variant):
    cfg = load_experiment_config(PRESET, TINY + ["train.one_segment_steps=2", "train.steps=4", "train.log_every=1",
                                                 "train.checkpoint_every=1", f'variants=["{variant}"]',
                                                 f'train.one_segment_variants=["{variant}"]'])
    whole, _ = train_variant(cfg, variant, tmp_path / "whole", say=lambda s: None)

    def stop_at_step_2(line: str) -> None:  # logged before step 2's checkpoint: the newest one is step 1's
        if "step 2/" in line:
            raise _Stop
    with pytest.raises(_Stop):
        train_variant(cfg, variant, tmp_path / "cut", say=stop_at_step_2)
    resumed, info = train_variant(cfg, variant, tmp_path / "cut", say=lambda s: None)
    assert info["steps"] == 4 and resumed.cfg == variant_model(cfg, variant)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # and the first steps did train with one segment: without it the same run ends elsewhere
    plain = load_experiment_config(PRESET, TINY + ["train.steps=4", f'variants=["{variant}"]'])
    other, _ = train_variant(plain, variant, tmp_path / "plain", say=lambda s: None)
    assert not all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), other.state_dict().values()))
