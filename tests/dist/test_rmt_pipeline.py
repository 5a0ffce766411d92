"""The RMT pipeline engine (memtrain/launch/rmt_pipeline.py, its own schedule) reproduces one single-process step.

The comparison of tests/dist/test_pipeline.py for `model.memory = "rmt"`: 3 blocks (windowed, windowed, global:
the windowed layers take the split write attention), 2 meta tokens, 3 memory tokens, segments of 4 tokens,
tied embeddings; every rank builds the model with the same seed, takes its data-parallel rows of one global
batch of 12 sequences, splits them into micro-batches and runs one AdamW step (lr 1e-3, clipping active).
Loss (also `eval_loss` before the step), gradient norm (relative) and every updated weight must match the
torch engine's single-process step, the stages together must cover the whole model, and the tied embedding
must be bit-identical on first and last stage. Sequences of 12 tokens (3 full segments) or, through the
curriculum's `tokens=11`, 2 full segments and a partial one that writes no memory.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from tests.dist.spawn import run_ranks

GLOBAL_BATCH = 12
SEQ = 12
TIED = "embed.tokens.weight"


@dataclasses.dataclass(frozen=True)
class Case:
    tp: int = 1
    dp: int = 1
    accum: int = 2
    tokens: int = SEQ          # the curriculum's cut (11: a partial last segment)
    bptt: int = -1             # model.rmt.bptt_segments
    tied: bool = True
    interval: int = 0          # activation checkpoint interval
    fp64: bool = False         # fp64 weights, clipping off: the gradient path checked to rounding
    sp: bool = False           # sequence parallelism (with tp > 1)

    @property
    def world(self) -> int:
        return 2 * self.tp * self.dp


CASES_2 = {
    "micro2": Case(),
    "micro3-partial-ckpt1": Case(accum=3, tokens=11, interval=1),
    "bptt1-untied": Case(bptt=1, tied=False),
    "fp64-partial": Case(tokens=11, fp64=True),
}
CASES_4 = {
    "tp2-partial": Case(tp=2, tokens=11),
    "tp2-sp-partial": Case(tp=2, tokens=11, sp=True),  # rows per segment 12 (partial: 8), split over TP
    "dp2-bptt1-ckpt2": Case(dp=2, bptt=1, interval=2),
}
CASES = {**CASES_2, **CASES_4}
# fp32: the bar of tests/dist/test_pipeline.py; fp64: only summation order differs
BARS = {False: dict(loss=1e-5, norm=1e-5, weight=1e-5), True: dict(loss=1e-13, norm=1e-12, weight=1e-13)}


def _config(case: Case, pp: int):
    from memtrain.train.config import load_config
    return load_config(None, [
        "model.vocab_size=96", "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
        "model.num_meta_tokens=2", "model.window=3", "model.global_layers=[-1]", "model.max_seq_len=32",
        f"model.tie_embeddings={str(case.tied).lower()}", "model.attention_backend=\"reference\"",
        "model.memory=\"rmt\"", "model.rmt.segment_len=4", "model.rmt.num_memory=3",
        f"model.rmt.bptt_segments={case.bptt}", f"data.seq_len={SEQ}", "optim.lr=1e-3",
        f"optim.grad_clip={0.0 if case.fp64 else 0.5}", "schedule.warmup_steps=0", "schedule.steps=10",
        f"parallel.tp={case.tp if pp > 1 else 1}", f"parallel.pp={pp}", f"optim.grad_accum={case.accum}",
        f"parallel.engine=\"{'auto' if pp > 1 else 'torch'}\"", "device=\"cpu\"",
        f"parallel.activation_checkpoint_interval={case.interval}",
        f"parallel.sequence_parallel={str(case.sp and pp > 1).lower()}",
        f"data.batch_size={GLOBAL_BATCH // (case.accum * case.dp)}"])


def _batch(case: Case):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model(cfg, tp: int, dtype: torch.dtype, seed: int = 0):
    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import LayerFactory, build_model
    torch.manual_seed(seed)
    factory = MegatronFactory(sequence_parallel=cfg.parallel.sequence_parallel) if tp > 1 else LayerFactory()
    return build_model(cfg.model, factory).to(dtype)


def _pipeline_step(cfg, layout, case: Case, ckpt: str | None) -> dict:
    """Eval loss, then one step on this rank's rows; this stage's updated weights (TP shards gathered)."""
    from memtrain.train.engines.rmt_pipeline import RMTPipelineEngine
    from memtrain.launch.tensor_parallel import gather_full

    dtype = torch.float64 if case.fp64 else torch.float32
    model = _model(cfg, layout.tp, dtype)
    engine = RMTPipelineEngine(model, cfg, layout, run_dir=None, bf16=False)
    inputs, targets = _batch(case)
    per_rank = GLOBAL_BATCH // layout.dp
    rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    batches = list(zip(inputs[rows].chunk(case.accum), targets[rows].chunk(case.accum)))
    eval_loss = engine.eval_loss(batches, tokens=case.tokens)
    loss, norm = engine.train_step(batches, tokens=case.tokens)
    params = {name: gather_full(p.detach(), p).clone() for name, p in engine.named.items()}
    result = {"loss": loss, "eval_loss": eval_loss, "norm": norm, "params": params, "stage": layout.pp_rank}
    if ckpt:  # the stage's weights, optimizer and schedule restored into a fresh engine take the same next step
        # as the trainer's checkpoint: tensors sharded into the directory `ckpt`, small state through torch.save
        buffer = io.BytesIO()
        torch.save(engine.save(Path(ckpt)), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
        fresh = RMTPipelineEngine(_model(cfg, layout.tp, dtype, seed=1), cfg, layout, run_dir=None, bf16=False)
        fresh.load(Path(ckpt), state)
        losses = [e.train_step(batches, tokens=case.tokens)[0] for e in (engine, fresh)]
        result["restored"] = (losses, (engine.lr, fresh.lr), max(
            float((a - b).abs().max()) for a, b in zip(engine.model_state().values(), fresh.model_state().values())))
    return result


def _ranks(rank: int, world: int, names: list[str], ckpt_dir: str) -> dict:
    from megatron.core import parallel_state

    from memtrain.launch.groups import init_parallel
    results = {}
    for i, name in enumerate(names):
        cfg = _config(CASES[name], pp=2)
        layout = init_parallel(cfg.parallel, torch.device("cpu"))
        results[name] = _pipeline_step(cfg, layout, CASES[name], ckpt=ckpt_dir if i == 0 else None)
        parallel_state.destroy_model_parallel()  # the next case may want another layout
    return results


def _reference(case: Case) -> dict:
    """One torch-engine step in this process on the whole batch; the norm in fp64 from the gradients."""
    from memtrain.launch.groups import resolve_layout
    from memtrain.train.engines import build_engine
    cfg = _config(case, pp=1)
    model = _model(cfg, 1, torch.float64 if case.fp64 else torch.float32)
    engine = build_engine(model, cfg, resolve_layout(cfg.parallel, 1), run_dir=None, device=torch.device("cpu"))
    inputs, targets = (t[:, :case.tokens] for t in _batch(case))
    loss = engine.module(inputs, targets).loss
    engine.backward(loss)
    exact_norm = float(sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt())
    norm = engine.step()
    return {"loss": float(loss.detach()), "norm": exact_norm if case.fp64 else norm,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def references():
    return {name: _reference(case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_ranks, 2, list(CASES_2), str(tmp_path_factory.mktemp("rmt_pipeline_ckpt")))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(_ranks, 4, list(CASES_4), str(tmp_path_factory.mktemp("rmt_pipeline_ckpt")))


def _check(reference: dict, per_rank: list[dict], name: str) -> dict:
    """Assert parity on every rank; returns the worst differences seen (for the docs)."""
    case = CASES[name]
    bar = BARS[case.fp64]
    if not case.fp64:
        assert reference["norm"] > 0.5, "clipping must be active for this test to check it"
    worst = dict(loss=0.0, norm=0.0, weight=0.0)
    covered, tied = set(), []
    for rank, results in enumerate(per_rank):
        got = results[name]
        for key in ("loss", "eval_loss"):
            diff = abs(got[key] - reference["loss"])
            assert diff < bar["loss"], (rank, key, got[key], reference["loss"])
            worst["loss"] = max(worst["loss"], diff)
        rel = abs(got["norm"] - reference["norm"]) / reference["norm"]
        assert rel < bar["norm"], (rank, got["norm"], reference["norm"])
        worst["norm"] = max(worst["norm"], rel)
        for pname, value in got["params"].items():
            diff = float((value - reference["params"][pname]).abs().max())
            assert diff < bar["weight"], (rank, got["stage"], pname, diff)
            worst["weight"] = max(worst["weight"], diff)
        covered |= set(got["params"])
        if TIED in got["params"] and case.tied:
            tied.append(got["params"][TIED])
    assert covered == set(reference["params"]), set(reference["params"]) ^ covered
    if case.tied:  # first and last stage (of every TP/DP replica) hold the same tied weight, bit for bit
        assert len(tied) == case.world and all(torch.equal(t, tied[0]) for t in tied)
    return worst


@pytest.mark.parametrize("name", list(CASES_2))
def test_rmt_pp2_reproduces_single_process(references, two_ranks, name):
    assert {r[name]["stage"] for r in two_ranks} == {0, 1}
    _check(references[name], two_ranks, name)


@pytest.mark.slow  # the 4-rank spawn: ~15 s on 2 lightly loaded cores, ~30 s loaded
@pytest.mark.parametrize("name", list(CASES_4))
def test_rmt_pp2_with_tp_or_dp_reproduces_single_process(references, four_ranks, name):
    _check(references[name], four_ranks, name)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_optimizer_state_restores(request, world):
    for results in request.getfixturevalue("two_ranks" if world == 2 else "four_ranks"):
        (loss, restored_loss), (lr, restored_lr), diff = next(iter(results.values()))["restored"]
        assert loss == restored_loss and lr == restored_lr and diff == 0.0, (loss, restored_loss, lr, diff)


def test_stage_split_is_deepspeeds():
    """n // pp blocks a stage, the first n % pp stages one more (what DeepSpeed's 'type:' partition gives)."""
    from memtrain.launch.rmt_pipeline import stage_blocks
    assert [list(stage_blocks(7, 3, p)) for p in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    for n in range(1, 13):
        for pp in range(1, n + 1):
            stages = [stage_blocks(n, pp, p) for p in range(pp)]
            assert [i for r in stages for i in r] == list(range(n)) and min(map(len, stages)) >= 1


def test_segment_pieces_compose_run_segment():
    """run_segment = segment_input -> segment_blocks (any split of the blocks) -> segment_output, bit for bit."""
    model = _model(_config(Case(), pp=1), 1, torch.float32)
    ids = torch.randint(0, 96, (2, 4))
    memory = torch.randn(2, 3, 32)
    for write in (True, False):
        logits, new_memory = model.run_segment(ids, memory, 1, write=write)
        num_write = 3 if write else 0
        h = model.segment_input(ids, memory, write=write)
        h = model.segment_blocks(h, range(0, 2), 4, num_write, 1)
        h = model.segment_blocks(h, range(2, 3), 4, num_write, 1)
        split_logits, split_memory = model.segment_output(h, 4, write=write)
        assert torch.equal(logits, split_logits)
        assert (new_memory is None and split_memory is None) or torch.equal(new_memory, split_memory)


@pytest.mark.parametrize("change, key", [
    (dict(zero_stage=1), "parallel.zero_stage"),
    (dict(bf16=True), "bf16"),
    (dict(memory_replay=True), "memory_replay"),
    (dict(cp=2), "parallel.cp"),
    (dict(pp=1), "parallel.pp"),
])
def test_unsupported_settings_are_one_line_errors(change, key):
    from memtrain.launch.config import LayoutError
    from memtrain.launch.groups import Layout
    from memtrain.train.engines.rmt_pipeline import RMTPipelineEngine
    cfg = _config(Case(), pp=1)
    if "zero_stage" in change:
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=1))
    if "memory_replay" in change:
        cfg.model.rmt.memory_replay = True
    model = _model(cfg, 1, torch.float32)
    layout = Layout(world=4, rank=0, tp=1, dp=1, tp_rank=0, dp_rank=0, pp=change.get("pp", 2),
                    cp=change.get("cp", 1))
    with pytest.raises(LayoutError) as info:
        RMTPipelineEngine(model, cfg, layout, None, bf16=change.get("bf16", False))
    assert key in str(info.value) and "\n" not in str(info.value)
