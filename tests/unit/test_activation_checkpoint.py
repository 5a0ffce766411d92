"""Activation checkpointing (`parallel.activation_checkpoint`) and precision: recomputation changes no gradient
(fp64, every memory kind), the layout rules refuse what cannot run, and device-bound settings fail in one line."""
from __future__ import annotations

import pytest
import torch

from memtrain.model import ModelConfig, build_model
from memtrain.model.memory import memory_kinds

KINDS = [k for k in memory_kinds() if k in ("none", "rmt", "lmm", "mac", "mag", "mal")]


def _config(kind: str, **titans) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, num_meta_tokens=2, window=8,
                      memory=kind)
    cfg.titans.segment_len, cfg.titans.chunk_size, cfg.titans.memory_heads = 16, 8, 2
    for key, value in titans.items():
        setattr(cfg.titans, key, value)
    cfg.rmt.segment_len, cfg.rmt.num_memory, cfg.rmt.bptt_segments = 16, 2, 1
    return cfg


def _gradients(cfg: ModelConfig, mode: str, replay: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(cfg).double()
    model.set_activation_checkpoint(mode)
    ids = torch.randint(0, 97, (2, 43), generator=torch.Generator().manual_seed(1))  # odd length: a partial chunk
    if replay:
        model.replay_backward(ids, ids)
    else:
        model(ids, ids).loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kind,extra", [*((k, {}) for k in KINDS), ("mac", {"memory_depth": 2}),
                                        ("lmm", {"memory_depth": 3, "memory_backend": "chunked"})],
                         ids=[*KINDS, "mac-deep", "lmm-deep3-chunked"])
def test_recomputed_gradients_equal_stored_ones(kind, extra, mode):
    cfg = _config(kind, **extra)
    reference = _gradients(cfg, "none")
    for a, b in zip(reference, _gradients(cfg, mode), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rmt_memory_replay_with_checkpointing():
    cfg = _config("rmt")
    for a, b in zip(_gradients(cfg, "none"), _gradients(cfg, "full", replay=True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_checkpointing_keeps_less_for_the_backward():
    """What autograd keeps during the forward shrinks to the blocks' inputs (selective keeps its matmul outputs in
    checkpoint's own cache, which these hooks do not see: benchmarks/activation_checkpoint.py measures it)."""
    cfg = _config("mac")
    saved = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.set_activation_checkpoint(mode)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        ids = torch.randint(0, 97, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, ids).loss
        saved[mode] = total[0]
    assert saved["full"] <= saved["selective"] < saved["none"] / 4, saved


def test_layout_rules_and_bad_modes_are_one_line_errors():
    from memtrain.launch.config import LayoutError, ParallelConfig, check_layout
    from memtrain.train.config import load_config
    from memtrain.train.configtree import ConfigError
    cfg = _config("none")
    with pytest.raises(LayoutError, match="parallel.cp=2"):
        check_layout(cfg, ParallelConfig(cp=2, activation_checkpoint="full"), 64)
    with pytest.raises(LayoutError, match="use 'full'"):
        check_layout(cfg, ParallelConfig(pp=2, activation_checkpoint="selective"), 64)
    check_layout(cfg, ParallelConfig(pp=2, activation_checkpoint="full"), 64)
    with pytest.raises(ConfigError, match="must be none, full or selective"):
        load_config("configs/demo.toml", ['parallel.activation_checkpoint="some"'])
    from memtrain.train.engines import checkpoint_interval
    assert checkpoint_interval(ParallelConfig(activation_checkpoint="full")) == 1
    assert checkpoint_interval(ParallelConfig(activation_checkpoint="full", activation_checkpoint_interval=2)) == 2
    assert checkpoint_interval(ParallelConfig()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine refuses")
def test_device_bound_settings_fail_in_one_line_on_a_cpu():
    from memtrain.train.config import load_config, resolve_precision
    from memtrain.train.configtree import ConfigError
    assert resolve_precision("auto", "cpu") == "fp32"
    for sets, needle in ((['precision="fp16"'], "needs a CUDA device"),
                         (['model.attention_backend="flash"'], "needs a CUDA device with flash-attn")):
        cfg = load_config("configs/demo.toml", sets)  # a config file may target another machine: it loads
        with pytest.raises(ConfigError, match=needle) as info:
            cfg.check_device()
        assert "\n" not in str(info.value)


def test_bf16_autocast_in_the_torch_engine():
    """The torch engine trains bf16 under autocast (fp32 weights), where the CPU has bf16 instructions."""
    from memtrain.train.config import cpu_supports_bf16
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    from memtrain.launch.groups import resolve_layout
    from memtrain.train.config import load_config
    from memtrain.train.engines import build_engine
    cfg = load_config("configs/demo.toml", ['precision="bf16"', 'parallel.engine="torch"', "model.vocab_size=97",
                                            "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                            "model.n_kv_heads=2"])
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, resolve_layout(cfg.parallel, 1), None, torch.device("cpu"))
    assert engine.precision == "bf16" and engine.autocast_dtype == torch.bfloat16
    ids = torch.randint(0, 97, (2, 33))
    loss, norm = engine.train_step([(ids, ids)])
    assert torch.isfinite(torch.tensor([loss, norm])).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
