"""A memory kind registered from outside memtrain (tests/e2e/memory_kind_plugin.py, no edit under memtrain/)
trains on 1 and 2 ranks, checkpoints, resumes exactly, and exports to Hugging Face."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.e2e.test_export import load_hf, max_logit_diff, native_model
from tests.e2e.test_train import ROOT, read_metrics, train

PLUGIN = "tests.e2e.memory_kind_plugin"
KIND = ["--set", f'plugins=["{PLUGIN}"]', "--set", 'model.memory="warmup_meta"', "--set", "data.batch_size=4",
        "--set", "schedule.warmup_steps=1"]


def test_unknown_kind_names_the_registered_ones_and_the_plugins_key():
    from memtrain.train.config import load_config
    from memtrain.train.configtree import ConfigError
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/demo.toml", ['model.memory="warmup_metaa"'])
    message = str(info.value)
    assert "\n" not in message and "'warmup_metaa'" in message and "rmt" in message and "plugins" in message
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module'"):
        load_config(ROOT / "configs/demo.toml", ['plugins=["no_such_module"]'])


def test_the_kinds_spec_decides_what_the_layout_and_trainer_do():
    from memtrain.train.config import load_config
    from memtrain.train.configtree import ConfigError
    cfg = load_config(ROOT / "configs/demo.toml", [f'plugins=["{PLUGIN}"]', 'model.memory="warmup_meta"'])
    from memtrain.model.memory import memory_kinds, memory_spec
    assert "warmup_meta" in memory_kinds()
    spec = memory_spec("warmup_meta")
    assert spec.tokens_for_step(cfg.model, 0, 64) == 32 and spec.tokens_for_step(cfg.model, 2, 64) == 64
    with pytest.raises(ConfigError) as info:  # pipeline = "unsupported": refused by the one layout check
        load_config(ROOT / "configs/demo.toml", [f'plugins=["{PLUGIN}"]', 'model.memory="warmup_meta"',
                                                  "parallel.pp=2"])
    assert "\n" not in str(info.value) and "model.memory='warmup_meta'" in str(info.value)


@pytest.mark.slow
def test_registered_kind_trains_resumes_on_two_ranks_and_exports(tiny_dataset, tmp_path):
    from memtrain.train.export_hf import export
    from tests.dist.spawn import free_port

    straight = tmp_path / "straight"
    train(tiny_dataset, straight, *KIND, steps=4)
    pieces = tmp_path / "pieces"
    train(tiny_dataset, pieces, *KIND, "--set", "checkpoint.every=2", steps=4)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (pieces / "checkpoints" / "step_00000002").rename(resumed / "checkpoints" / "step_00000002")
    train(tiny_dataset, resumed, *KIND, "--resume", "auto", steps=4)
    a, b = [m["loss"] for m in read_metrics(straight)], [m["loss"] for m in read_metrics(resumed)]
    assert a[2:] == b, (a, b)  # the resumed run continues exactly, curriculum included
    assert 'plugins = ["tests.e2e.memory_kind_plugin"]' in (straight / "config.toml").read_text()
    assert [m["step"] for m in read_metrics(straight)] == [1, 2, 3, 4]

    ranks = tmp_path / "ranks"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]
    train(tiny_dataset, ranks, *KIND, "--set", "parallel.cp=2", steps=4, launcher=launcher)
    two = [m["loss"] for m in read_metrics(ranks)]
    # context parallel: each rank holds half of every (curriculum-cut) sequence; the same run as one process
    assert len(two) == 4 and all(abs(x - y) < 1e-4 for x, y in zip(a, two)), (a, two)

    hf_dir = export(straight, tmp_path / "hf")
    native = native_model(straight)
    assert type(native).__name__ == "WarmupMetaLM"
    hf, _ = load_hf(hf_dir)
    assert max_logit_diff(native, hf, native.cfg.vocab_size) < 1e-4
    assert hf.config.memory == "none"  # exported with the plain decoder's template (spec.hf_memory)
    torch.testing.assert_close(hf.model.meta_tokens.detach(), native.embed.meta.detach())
