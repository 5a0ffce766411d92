"""Pipeline parallelism (DeepSpeed PipelineModule, memtrain/launch/pipeline.py) reproduces one single-process step.

The comparison of tests/dist/test_engine_parity.py: the same model (meta tokens, a windowed and a global
layer, tied embeddings), the same initial weights (seed, one normal_ per full weight), the same global batch
split over data-parallel ranks and over >= 2 micro-batches; after one AdamW step (lr 1e-3, clipping active)
the loss, the gradient norm (relative 1e-5) and every updated weight (1e-5, fp32) must match the torch
engine's single-process step. Each stage reports its own weights under DecoderLM names (TP shards gathered),
and together the stages must cover the whole model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memtrain.model import LayerFactory, build_model
from tests.dist.spawn import run_ranks

GLOBAL_BATCH = 4
SEQ = 12


def _config(pp: int = 1, tp: int = 1, zero: int = 0, accum: int = 1, dp: int = 1, engine: str = "deepspeed",
            tied: bool = True, cp: int = 1, sp: bool = False):
    from memtrain.train.config import load_config
    return load_config(None, [
        "model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.num_meta_tokens=2", "model.window=5", "model.global_layers=[-1]", "model.max_seq_len=32",
        f"model.tie_embeddings={str(tied).lower()}", "model.attention_backend=\"sdpa\"", f"data.seq_len={SEQ}",
        "optim.lr=1e-3",
        "optim.grad_clip=0.5", "schedule.warmup_steps=0", "schedule.steps=10", f"parallel.tp={tp}",
        f"parallel.pp={pp}", f"parallel.cp={cp}", f"parallel.zero_stage={zero}", f"optim.grad_accum={accum}",
        f"parallel.engine=\"{engine}\"", "device=\"cpu\"", f"data.batch_size={GLOBAL_BATCH // (accum * dp)}",
        f"parallel.sequence_parallel={str(sp).lower()}"])


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model(cfg, layout):
    from memtrain.launch.context_parallel import ContextParallel
    from memtrain.launch.tensor_parallel import MegatronFactory
    factory = MegatronFactory(sequence_parallel=cfg.parallel.sequence_parallel) if layout.tp > 1 else LayerFactory()
    if layout.cp > 1:  # each stage context parallel: the engine hands every rank its slice
        factory.sequence = ContextParallel()
    torch.manual_seed(0)
    return build_model(cfg.model, factory)


def _pipeline_step(cfg, layout, interval: int, ckpt_dir: str | None = None, batch=None) -> dict:
    """One pipeline-engine step on this rank's share of `batch` (default `_batch()`): loss, the initial
    weights' eval loss, norm and this stage's updated weights (TP shards gathered) under DecoderLM names."""
    from memtrain.launch.pipeline import stage_parameters
    from memtrain.train.engines.pipeline import PipelineEngine
    from memtrain.launch.tensor_parallel import gather_full

    model = _model(cfg, layout)
    engine = PipelineEngine(model, cfg, layout, run_dir=None, bf16=False, activation_checkpoint_interval=interval)
    inputs, targets = batch if batch is not None else _batch()
    per_rank = inputs.shape[0] // layout.dp
    rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    accum = cfg.optim.grad_accum
    batches = list(zip(inputs[rows].chunk(accum), targets[rows].chunk(accum)))
    eval_loss = engine.eval_loss(batches)  # the initial weights' loss, no update
    loss, norm = engine.train_step(batches)
    params = {name: gather_full(p.detach(), p) for name, p in stage_parameters(engine.pipe, model).items()}
    result = {"loss": loss, "eval_loss": eval_loss, "norm": norm, "params": params, "stage": layout.pp_rank}
    if ckpt_dir is not None:  # DeepSpeed's pipeline checkpoint restores the stage into a fresh engine
        small = engine.save(Path(ckpt_dir))  # the trainer keeps this in the rank's own file
        torch.manual_seed(1)  # other initial weights, overwritten by the load
        fresh_model = build_model(cfg.model, model.factory)
        fresh = PipelineEngine(fresh_model, cfg, layout, run_dir=None, bf16=False)
        fresh.load(Path(ckpt_dir), small)
        restored = stage_parameters(fresh.pipe, fresh_model)
        result["restore_diff"] = max(float((restored[n] - p).abs().max())
                                     for n, p in stage_parameters(engine.pipe, model).items())
        result["restored_lr"] = (fresh.lr, engine.lr)
    return result


def _ranks(rank: int, world: int, cases: list[tuple], ckpt_dir: str | None = None) -> dict:
    from megatron.core import parallel_state

    from memtrain.launch.groups import init_parallel
    results = {}
    for i, case in enumerate(cases):
        pp, tp, zero, accum, interval, tied, *rest = case
        cp, sp = (rest + [1, False][len(rest):])[:2]
        cfg = _config(pp=pp, tp=tp, zero=zero, accum=accum, dp=world // (pp * tp * cp), tied=tied, cp=cp, sp=sp)
        layout = init_parallel(cfg.parallel, torch.device("cpu"))
        results[case] = _pipeline_step(cfg, layout, interval, ckpt_dir if i == 0 else None)
        parallel_state.destroy_model_parallel()  # the next case may want another layout
    return results


def _reference(tied: bool) -> dict:
    from memtrain.launch.groups import resolve_layout
    from memtrain.train.engines import build_engine
    cfg = _config(engine="torch", tied=tied)
    layout = resolve_layout(cfg.parallel, 1)
    torch.manual_seed(0)
    model = build_model(cfg.model, LayerFactory())
    engine = build_engine(model, cfg, layout, run_dir=None, device=torch.device("cpu"))
    inputs, targets = _batch()
    loss = engine.module(inputs, targets).loss
    engine.backward(loss)
    norm = engine.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(loss.detach()), "norm": norm, "params": params}


@pytest.fixture(scope="module")
def references():
    return {tied: _reference(tied) for tied in (True, False)}


def _check(references, per_rank: list[dict], case) -> None:
    reference = references[case[5]]
    assert reference["norm"] > 0.5, "clipping must be active for this test to check it"
    covered, worst = set(), 0.0
    for rank, results in enumerate(per_rank):
        got = results[case]
        worst = max(worst, *(float((v - reference["params"][n]).abs().max()) for n, v in got["params"].items()))
        assert abs(got["loss"] - reference["loss"]) < 1e-5, (rank, got["loss"], reference["loss"])
        assert abs(got["eval_loss"] - reference["loss"]) < 1e-5, (rank, got["eval_loss"], reference["loss"])
        assert abs(got["norm"] - reference["norm"]) < 1e-5 * reference["norm"], (rank, got["norm"], reference["norm"])
        for name, value in got["params"].items():
            diff = float((value - reference["params"][name]).abs().max())
            assert diff < 1e-5, (rank, got["stage"], name, diff)
        covered |= set(got["params"])
    assert covered == set(reference["params"]), set(reference["params"]) ^ covered
    print(f"{case}: loss {abs(per_rank[0][case]['loss'] - reference['loss']):.2e}, norm "
          f"{abs(per_rank[0][case]['norm'] - reference['norm']) / reference['norm']:.2e} rel, weights {worst:.2e}")


# (pp, tp, zero_stage, micro-batches, activation_checkpoint_interval, tied embeddings[, cp[, sequence parallel]])
CASES_2 = [(2, 1, 0, 2, 0, True), (2, 1, 0, 2, 1, True), (2, 1, 1, 4, 0, True), (2, 1, 0, 2, 0, False)]
# PP × TP; PP × DP with ZeRO 1; PP × CP (each stage context parallel: halo of the windowed layer, gathered K/V);
# PP × TP with sequence parallelism (stages pass this rank's rows), checkpointing every block
CASES_4 = [(2, 2, 0, 2, 0, True), (2, 1, 1, 2, 1, True), (2, 1, 0, 2, 0, True, 2), (2, 2, 0, 2, 1, True, 1, True)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_ranks, 2, CASES_2, str(tmp_path_factory.mktemp("pipeline_ckpt")))


def _ranks_with_memory(rank: int, world: int, cases: list[tuple], memory_cases: list[tuple]) -> dict:
    """The baseline's `cases` and tests/dist/test_memory_parity.py's `memory_cases` in one spawn."""
    from tests.dist.test_memory_parity import memory_ranks
    return {**_ranks(rank, world, cases), **memory_ranks(rank, world, memory_cases)}


@pytest.fixture(scope="module")
def four_ranks():
    from tests.dist.test_memory_parity import CASES_4 as MEMORY_CASES_4
    return run_ranks(_ranks_with_memory, 4, CASES_4, MEMORY_CASES_4)


@pytest.mark.parametrize("case", CASES_2,
                         ids=lambda c: f"pp{c[0]}-zero{c[2]}-micro{c[3]}-ckpt{c[4]}-{'tied' if c[5] else 'untied'}")
def test_pp2_reproduces_single_process(references, two_ranks, case):
    assert {r[case]["stage"] for r in two_ranks} == {0, 1}
    _check(references, two_ranks, case)


def test_pipeline_checkpoint_restores_every_stage(two_ranks):
    for results in two_ranks:
        got = results[CASES_2[0]]
        assert got["restore_diff"] == 0.0, got["restore_diff"]
        assert got["restored_lr"][0] == got["restored_lr"][1]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_4, ids=["pp2xtp2-zero0-micro2", "pp2xdp2-zero1-micro2-ckpt1", "pp2xcp2-micro2",
                                         "pp2xtp2-sp-micro2-ckpt1"])
def test_pp2_with_tp_or_dp_reproduces_single_process(references, four_ranks, case):
    _check(references, four_ranks, case)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["pp2xtp2", "pp2xcp2"])
def test_mac_pp2_by_tp2_or_cp2_reproduces_single_process(four_ranks, index):
    """The Titans MAC model (tests/dist/test_memory_parity.py) at PP 2 × TP 2 and PP 2 × CP 2 (MAC segments handed
    rank to rank inside each stage), in this module's 4-rank spawn."""
    from tests.dist.test_memory_parity import CASES_4 as MEMORY_CASES_4
    from tests.dist.test_memory_parity import check_case, reference_steps
    case = MEMORY_CASES_4[index]
    assert {r[case]["stage"] for r in four_ranks} == {0, 1}
    check_case(reference_steps(), four_ranks, case)


@pytest.mark.parametrize("overrides, world, n_layers, key", [
    (dict(pp=2), 3, None, "parallel.pp"),                       # pp does not divide the world
    (dict(pp=2, tp=2), 6, None, "parallel.pp"),                 # tp × pp does not divide the world
    (dict(pp=2, zero_stage=2), 2, None, "parallel.zero_stage"),  # ZeRO 2/3 with the pipeline engine
    (dict(pp=2, zero_stage=3), 4, None, "parallel.zero_stage"),
    (dict(pp=4), 4, 2, "parallel.pp"),                          # more stages than blocks
    (dict(pp=2, dp=4), 4, None, "parallel.dp"),                 # sizes do not multiply to the world
])
def test_bad_pipeline_layouts_are_one_line_errors(overrides, world, n_layers, key):
    """Each rule is checked once: the world-size arithmetic by `resolve_layout`, the rules that involve the
    model (stages <= layers, ZeRO with a pipeline) by `check_layout`."""
    from memtrain.launch.config import ParallelConfig, check_layout
    from memtrain.launch.groups import LayoutError, resolve_layout
    from memtrain.model import ModelConfig
    parallel = ParallelConfig(**overrides)
    with pytest.raises(LayoutError) as info:
        resolve_layout(parallel, world)
        check_layout(ModelConfig(vocab_size=64, n_layers=n_layers or 4), parallel, seq_len=64)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_rank_order_matches_megatron_and_deepspeed():
    """tp fastest, then dp, then pp: the layout's coordinates equal DeepSpeed's topology's for every rank."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from memtrain.launch.config import ParallelConfig
    from memtrain.launch.groups import resolve_layout
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    for rank in range(12):
        layout = resolve_layout(ParallelConfig(tp=2, pp=2), 12, rank)
        coord = topo.get_coord(rank)
        assert (layout.pp_rank, layout.dp_rank, layout.tp_rank) == (coord.pipe, coord.data, coord.model)
        assert layout.dp == 3 and layout.pp == 2
