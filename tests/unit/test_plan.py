"""`memtrain plan` (memtrain/train/plan): parameter counts from the meta build, stage split, activation formulas
against what autograd really keeps, layout ranking, one-line errors, and the 7B presets fitting 64 × 80 GiB."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memtrain.train.config import load_config
from memtrain.train.plan import Layout, model_params, plan_layout, search_layouts
from memtrain.train.plan import activations as act
from memtrain.train.plan.__main__ import main
from memtrain.train.plan.memory import GiB, rank_key
from memtrain.train.plan.params import on_stage, stage_layers, stage_numel

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("none", "mac", "mag", "mal", "lmm", "rmt")
SMALL = ["model.vocab_size=500", "model.d_model=128", "model.n_layers=3", "model.n_heads=4", "data.seq_len=64",
         "model.num_meta_tokens=4", "model.titans.segment_len=32", "model.rmt.segment_len=32", 'device="cpu"']


def _cfg(*extra: str):
    return load_config(None, [*SMALL, *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_meta_build_counts_equal_a_real_build(kind):
    """The meta-device model has exactly the real model's parameters (names and shapes), tied weights once."""
    from memtrain.model import build_model
    cfg = _cfg(f'model.memory="{kind}"', f"model.tie_embeddings={'true' if kind == 'mac' else 'false'}")
    planned = {p.name: p.shape for p in model_params(cfg.model)}
    real = {n: tuple(p.shape) for n, p in build_model(cfg.model).named_parameters()}
    assert planned == real


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def test_meta_build_allocates_nothing():
    """A 7B model plans without its weights: every parameter on the meta device, the process barely grows."""
    from memtrain.train.plan import build_meta_model
    cfg = load_config(ROOT / "configs" / "7b_mac.toml")
    before = _rss()
    model = build_meta_model(cfg.model)
    grown = _rss() - before  # 29 GB in fp32 if it were real
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert grown < 256 * 2**20, f"the meta build grew the process by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pp", [2, 3])
def test_stages_hold_every_parameter_once(kind, pp):
    """Pipeline stages partition the parameters; only a tied embedding is on two stages (first and last)."""
    tied = kind in ("none", "mac")
    cfg = _cfg(f'model.memory="{kind}"', f"model.tie_embeddings={'true' if tied else 'false'}")
    params = model_params(cfg.model)
    for p in params:
        holders = [s for s in range(pp) if on_stage(p.name, cfg.model, pp, s)]
        expected = [0, pp - 1] if tied and p.name == "embed.tokens.weight" else holders[:1]
        assert holders == expected, p.name
    blocks = [b for s in range(pp) for b in stage_layers(cfg.model, pp, s)[0]]
    assert blocks == list(range(cfg.model.n_layers))


def test_stage_split_equals_deepspeeds_and_the_rmt_schedules():
    """`stage_parts` (what a stage builds) splits the blocks as DeepSpeed's PipelineModule does (boundaries printed by
    deepspeed.runtime.utils.partition_balanced for build_pipeline's "type:" weights) and as the RMT's own schedule."""
    from types import SimpleNamespace

    from memtrain.launch.pipeline import stage_parts
    from memtrain.launch.rmt_pipeline import stage_blocks
    known = {(5, 0, 2): [0, 5, 8], (5, 1, 3): [0, 4, 6, 9], (5, 0, 4): [0, 4, 5, 6, 8], (8, 0, 3): [0, 5, 8, 11],
             (8, 1, 4): [0, 4, 6, 8, 12], (32, 0, 2): [0, 18, 35], (32, 1, 3): [0, 13, 24, 36],
             (32, 0, 4): [0, 10, 18, 26, 35]}
    for (layers, tied, pp), parts in known.items():
        for stage in range(pp):
            held = stage_parts(SimpleNamespace(n_layers=layers, tie_embeddings=bool(tied)), pp, stage)
            blocks = {i - 2 for i in range(parts[stage], parts[stage + 1]) if 2 <= i < 2 + layers}
            assert {f"blocks.{i}" for i in blocks} == {x for x in held if x.startswith("blocks.")}
            assert {f"blocks.{i}" for i in stage_blocks(layers, pp, stage)} == {f"blocks.{i}" for i in blocks}
            assert ("head" in held) == (stage == pp - 1) and ("embed" in held) == (stage == 0 or (tied and stage == pp - 1))


def test_tensor_parallel_split_dims():
    """Column layers split dim 0 (weight and bias), row layers dim 1, the embedding its rows, Titans per-head tensors
    dim 0; norms and meta tokens are whole on every rank."""
    cfg = _cfg('model.memory="mag"')
    dims = {p.name: p.split_dim for p in model_params(cfg.model)}
    assert dims["embed.tokens.weight"] == 0 and dims["head.proj.weight"] == 0
    assert dims["blocks.0.attn.qkv.weight"] == 0 and dims["blocks.0.attn.out.weight"] == 1
    assert dims["blocks.0.mlp.gate.weight"] == dims["blocks.0.mlp.up.weight"] == 0
    assert dims["blocks.0.mlp.down.weight"] == 1
    assert dims["blocks.0.memory.gates.bias"] == 0 and dims["blocks.0.memory.out.weight"] == 1
    assert dims["blocks.0.memory.conv_q"] == 0 and dims["blocks.0.memory.init_weights.0"] == 0
    assert dims["embed.meta"] is None and dims["blocks.0.attn_norm.weight"] is None


def test_tensor_parallel_size_that_does_not_divide_is_one_line():
    from memtrain.train.configtree import ConfigError
    cfg = _cfg("model.ffn_hidden=100")  # 100 is not a multiple of 8
    with pytest.raises(ConfigError, match="parallel.tp=8 does not divide"):
        stage_numel(model_params(cfg.model), cfg.model, tp=8, pp=1, stage=0)


# ---- activations: the formulas against what autograd keeps -------------------------------------------------

def _saved_by_first_block(cfg, batch: int) -> int:
    """Bytes of the tensors autograd saves while block 0 runs (fp32, no checkpointing), parameters excluded."""
    from memtrain.model import build_model
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    saved, inside = {}, [False]
    block = model.blocks[0]
    if hasattr(block, "step"):  # Titans models call block.step
        step = block.step

        def flagged(*a, **k):
            inside[0] = True
            try:
                return step(*a, **k)
            finally:
                inside[0] = False
        block.step = flagged
    else:
        block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        if inside[0]:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params)


CASES = {  # kind -> (overrides, tolerance): the Titans coefficients come from a fit (docs/planner.md#activations)
    "none": (["model.d_model=256", "model.n_kv_heads=2", "model.ffn_hidden=512", "data.seq_len=128"], 0.1),
    "rmt": (["model.rmt.num_memory=4", "data.seq_len=128"], 0.1),
    "lmm": (["model.num_meta_tokens=0", "model.titans.chunk_size=16", "data.seq_len=128"], 0.2),
    # CPU's auto picks the fused kernel; the chunked one (CUDA's choice for the linear memory) keeps other tensors
    "lmm-chunked": (["model.num_meta_tokens=0", "model.titans.chunk_size=16", "data.seq_len=128",
                     'model.titans.memory_backend="chunked"'], 0.2),
    "mag-chunked": (["model.titans.memory_heads=2", "data.seq_len=128", 'model.titans.memory_backend="chunked"'], 0.2),
    "mal": (["model.titans.chunk_size=8", "data.seq_len=128"], 0.2),
    "mag": (["model.titans.memory_heads=2", "data.seq_len=128"], 0.2),
    "mac": (["model.num_meta_tokens=0", "model.titans.segment_len=64", "data.seq_len=128"], 0.25),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_layer_activations_match_what_autograd_keeps(kind):
    extra, tolerance = CASES[kind]
    cfg = _cfg(f'model.memory="{kind.split("-")[0]}"', "model.n_layers=1", *extra)
    measured = _saved_by_first_block(cfg, batch=2)
    low, fp32 = act.layer_elements(cfg.model, act.shapes(cfg.model, 2, cfg.data.seq_len, tp=1))
    predicted = 2 * 4 * (low + fp32)
    assert abs(predicted - measured) <= tolerance * measured, (predicted, measured)


def test_checkpointing_keeps_less():
    cfg = _cfg('model.memory="mac"')
    s = act.shapes(cfg.model, 1, cfg.data.seq_len, tp=1)
    none, sel, full = (sum(act.layer_elements(cfg.model, s, m)) for m in ("none", "selective", "full"))
    assert full < sel < none
    assert full == s.N * s.D


# ---- plans and the search -----------------------------------------------------------------------------------

def test_zero_partitions_state_over_data_parallel_ranks():
    cfg = _cfg('precision="bf16"', 'device="cuda"')
    plans = {z: plan_layout(cfg, 8, Layout(8, 1, 1, 1, z, "none")).ranks[0] for z in range(4)}
    n = plans[0].params
    assert plans[0].optimizer == 8 * n and plans[0].master == 4 * n  # BF16_Optimizer: fp32 master, unpartitioned
    assert plans[1].optimizer == 8 * n / 8 and plans[1].master == 4 * n / 8 and plans[1].gradients == 2 * n
    assert plans[2].gradients == 2 * n / 8 and plans[2].weights == 2 * n
    assert plans[3].weights == 2 * n / 8


def test_pipeline_first_stage_holds_pp_micro_batches():
    cfg = _cfg("optim.grad_accum=8", "model.n_layers=4", 'precision="bf16"', 'device="cuda"')
    plan = plan_layout(cfg, 4, Layout(4, 1, 4, 1, 0, "none"))
    assert [r.in_flight for r in plan.ranks] == [4, 3, 2, 1]
    assert [r.label for r in plan.ranks][0] == "stage 0 (first)" and plan.ranks[-1].label == "stage 3 (last)"


def test_search_ranks_fitting_layouts_best_first():
    cfg = load_config(ROOT / "configs" / "7b_baseline.toml")
    usable = 80 * GiB * 0.9
    plans = search_layouts(cfg, 64, usable)
    assert plans and all(p.peak <= usable for p in plans)
    keys = [rank_key(p, usable) for p in plans]
    assert keys == sorted(keys)
    assert min(p.layout.tp * p.layout.pp for p in plans) == plans[0].layout.tp * plans[0].layout.pp


@pytest.mark.parametrize("name, billions", [("7b_baseline", 6.74), ("7b_mac", 7.28)])
def test_7b_presets_fit_64_gpus_of_80_gib(name, billions, capsys):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    plan = plan_layout(cfg, 64)
    assert math.isclose(plan.total_params / 1e9, billions, abs_tol=0.01)
    assert plan.precision == "bf16" and plan.layout.dp == 64 // (cfg.parallel.tp * cfg.parallel.pp)
    assert plan.peak <= 80 * GiB * 0.9
    assert main(["--config", str(ROOT / "configs" / f"{name}.toml"), "--world", "64", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "every rank" in out and "yes, headroom +" in out and "NO" not in out
    pipelined = ["--set", "parallel.tp=8", "--set", "parallel.pp=2", "--set", 'parallel.activation_checkpoint="full"']
    assert main(["--config", str(ROOT / "configs" / f"{name}.toml"), "--world", "64", "--gpu-mem", "80",
                 *pipelined]) == 0
    out = capsys.readouterr().out
    assert "stage 0 (first)" in out and "stage 1 (last)" in out and "NO" not in out


# ---- bad input: one line naming the fix ---------------------------------------------------------------------

DEMO = str(ROOT / "configs" / "demo.toml")


@pytest.mark.parametrize("argv, expected", [
    # a data path that exists nowhere: the demo's own may hold a prepared dataset on a developer's machine
    (["--config", DEMO, "--world", "2", "--set", 'data.path="no/such/dataset"'], "set model.vocab_size"),
    (["--config", DEMO, "--world", "3", "--set", "model.vocab_size=512", "--set", "parallel.tp=2"],
     "does not divide --world=3"),
    (["--config", DEMO, "--world", "2", "--set", "model.vocab_size=512", "--search"], "--gpu-mem"),
    (["--config", DEMO, "--world", "2", "--set", "model.vocab_size=512", "--gpu-mem", "-1"], "--gpu-mem=-1.0"),
    (["--config", DEMO, "--world", "0", "--set", "model.vocab_size=512"], "--world=0"),
    (["--config", DEMO, "--world", "2", "--set", "model.vocab_size=512", "--set", "parallel.pp=9"],
     "parallel.pp=9"),
    (["--config", "configs/nope.toml", "--world", "2"], "not found"),
])
def test_bad_input_is_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err


def test_does_not_fit_exits_1(capsys):
    argv = ["--config", str(ROOT / "configs" / "7b_baseline.toml"), "--world", "8", "--gpu-mem", "16",
            "--set", "parallel.tp=1", "--set", "parallel.pp=1", "--set", "parallel.zero_stage=0"]
    assert main(argv) == 1
    assert "NO, headroom -" in capsys.readouterr().out
