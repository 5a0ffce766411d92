"""The memory models (Titans MAC, RMT) reproduce one single-process step under every layout they support.

The comparison of tests/dist/test_engine_parity.py and tests/dist/test_pipeline.py, for a MAC model (linear
memory with a short conv, 2 meta tokens, tied embeddings; segments of 12 and memory chunks of 8 on 32 tokens, so
the last segment is ragged and chunks straddle segments) and an RMT model (4 segments of 8 tokens, 2 memory
slots, a windowed and a global layer, full backpropagation through time). One AdamW step (lr 1e-3, clipping
active) on a global batch of 4 × 32 tokens; the loss and every updated weight must match the torch engine's
single-process step to 1e-5 (fp32), the gradient norm to 1e-5 relative.

Layouts: DeepSpeed engine at DP = 2 with ZeRO 1, 2 and 3 and at TP = 2 (both models); DeepSpeed's pipeline
engine at PP = 2 and PP = 2 × TP = 2 (MAC; RMT cannot be pipelined, see docs/pipeline.md, and is refused). The
4-rank case runs in tests/dist/test_pipeline.py's 4-rank spawn, next to the baseline's (one start-up of 4 ranks).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist.spawn import run_ranks

GLOBAL_BATCH = 4
SEQ = 32
VOCAB = 96

MODELS = {
    "mac": ["model.memory=\"mac\"", "model.tie_embeddings=true", "model.titans.segment_len=12",
            "model.titans.chunk_size=8", "model.titans.memory_heads=4", "model.titans.conv_size=3"],
    # MAC with segments that fit CP = 2 slices of 16 tokens (context parallel MAC ranks hold whole segments)
    "mac_seg8": ["model.memory=\"mac\"", "model.tie_embeddings=true", "model.titans.segment_len=8",
                 "model.titans.chunk_size=4", "model.titans.memory_heads=4", "model.titans.conv_size=3"],
    "rmt": ["model.memory=\"rmt\"", "model.window=5", "model.global_layers=[-1]", "model.rmt.segment_len=8",
            "model.rmt.num_memory=2"],
}


def _config(kind: str, *, tp: int = 1, pp: int = 1, zero: int = 0, accum: int = 1, dp: int = 1,
            engine: str = "deepspeed", replay: bool = False, cp: int = 1):
    from memtrain.train.config import load_config
    return load_config(None, [
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.num_meta_tokens=2", "model.max_seq_len=64", "model.attention_backend=\"sdpa\"",
        *MODELS[kind], f"data.seq_len={SEQ}", "optim.lr=1e-3", "optim.grad_clip=0.5", "schedule.warmup_steps=0",
        "schedule.steps=10", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}", f"parallel.zero_stage={zero}",
        f"optim.grad_accum={accum}", f"parallel.engine=\"{engine}\"", "device=\"cpu\"",
        f"data.batch_size={GLOBAL_BATCH // (accum * dp)}", *(["model.rmt.memory_replay=true"] if replay else [])])


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# (model, tp, pp, zero_stage, micro-batches, activation_checkpoint_interval); pp > 1 = DeepSpeed's pipeline engine
# (ZeRO 3 with micro-batches > 1: see the xfail case of tests/dist/test_engine_parity.py)
CASES_2 = [("mac", 1, 1, 1, 1, 0), ("mac", 1, 1, 2, 2, 0), ("mac", 1, 1, 3, 1, 0), ("mac", 2, 1, 0, 1, 0),
           ("rmt", 1, 1, 1, 2, 0), ("rmt", 1, 1, 2, 1, 0), ("rmt", 1, 1, 3, 1, 0), ("rmt", 2, 1, 0, 1, 0),
           ("mac", 1, 2, 0, 2, 1)]
# PP 2 × TP 2 runs in tests/dist/test_pipeline.py's 4-rank spawn (one start-up of 4 ranks for both models)
CASES_4 = [("mac", 2, 2, 0, 2, 0), ("mac_seg8", 1, 2, 0, 2, 0, 2)]  # PP 2 × TP 2; PP 2 × CP 2


def _case_id(case) -> str:
    kind, tp, pp, zero, accum, interval, *cp = case
    dims = "x".join(f"{name}{n}" for name, n in (("pp", pp), ("tp", tp), ("cp", cp[0] if cp else 1)) if n > 1) or "dp2"
    return f"{kind}-{dims}-zero{zero}-micro{accum}" + (f"-ckpt{interval}" if interval else "")


def memory_ranks(rank: int, world: int, cases: list[tuple]) -> dict:
    from megatron.core import parallel_state

    from memtrain.launch.groups import init_parallel
    from tests.dist.test_engine_parity import _one_step
    from tests.dist.test_pipeline import _pipeline_step
    torch.set_num_threads(1)
    results = {}
    for case in cases:
        kind, tp, pp, zero, accum, interval, *cp = case
        cp = cp[0] if cp else 1
        cfg = _config(kind, tp=tp, pp=pp, zero=zero, accum=accum, dp=world // (tp * pp * cp), cp=cp)
        layout = init_parallel(cfg.parallel, torch.device("cpu"))
        if pp > 1:
            results[case] = _pipeline_step(cfg, layout, interval, batch=_batch())
        else:
            results[case] = _one_step(cfg, layout, batch=_batch())
            results[case]["stage"] = 0
        parallel_state.destroy_model_parallel()  # the next case may want another layout
    return results


def reference_steps() -> dict:
    """The torch engine's single-process step for each model kind."""
    from memtrain.launch.groups import resolve_layout
    from tests.dist.test_engine_parity import _one_step
    out = {}
    for kind in MODELS:
        cfg = _config(kind, engine="torch")
        out[kind] = _one_step(cfg, resolve_layout(cfg.parallel, 1), batch=_batch())
    return out


@pytest.fixture(scope="module")
def references():
    return reference_steps()


def check_case(references, per_rank: list[dict], case) -> None:
    kind, tp, pp = case[:3]
    cp = case[6] if len(case) > 6 else 1
    reference = references[kind]
    assert reference["norm"] > 0.5, "clipping must be active for this test to check it"
    dp = len(per_rank) // (tp * pp * cp)
    # a data-parallel rank's loss is the mean over its rows (the pipeline engine's is averaged over DP already)
    losses = [r[case]["loss"] for r in per_rank]
    loss = sum(losses) / len(losses) if pp == 1 else losses[0]
    assert abs(loss - reference["loss"]) < 1e-5, (loss, reference["loss"])
    covered, worst = set(), 0.0
    for rank, results in enumerate(per_rank):
        got = results[case]
        worst = max(worst, *(float((v - reference["params"][n]).abs().max()) for n, v in got["params"].items()))
        if pp > 1:
            assert abs(got["loss"] - reference["loss"]) < 1e-5, (rank, got["loss"], reference["loss"])
            assert abs(got["eval_loss"] - reference["loss"]) < 1e-5, (rank, got["eval_loss"], reference["loss"])
        elif dp == 1:
            assert abs(got["loss"] - reference["loss"]) < 1e-5, (rank, got["loss"], reference["loss"])
        assert abs(got["norm"] - reference["norm"]) < 1e-5 * reference["norm"], (rank, got["norm"], reference["norm"])
        for name, value in got["params"].items():
            diff = float((value - reference["params"][name]).abs().max())
            assert diff < 1e-5, (rank, got["stage"], name, diff)
        covered |= set(got["params"])
    assert covered == set(reference["params"]), set(reference["params"]) ^ covered
    print(f"{case}: loss {abs(loss - reference['loss']):.2e}, norm "
          f"{abs(per_rank[0][case]['norm'] - reference['norm']) / reference['norm']:.2e} rel, weights {worst:.2e}")


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(memory_ranks, 2, CASES_2)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES_2, ids=_case_id)
def test_two_ranks_reproduce_single_process(references, two_ranks, case):
    check_case(references, two_ranks, case)


def test_rmt_pipeline_refuses_zero_and_replay_with_one_line():
    from memtrain.train.config import ConfigError
    _config("rmt", pp=2)  # runs memtrain/launch/rmt_pipeline.py's schedule
    for sets, fix in ((dict(zero=1), "parallel.zero_stage=0"), (dict(replay=True), "memory_replay=false")):
        with pytest.raises(ConfigError) as info:
            _config("rmt", pp=2, **sets)
        message = str(info.value)
        assert "\n" not in message and "parallel.pp=2" in message and fix in message


def test_rmt_pipeline_is_refused_by_build_pipeline():
    from memtrain.launch.config import LayoutError
    from memtrain.launch.pipeline import check_pipeline_model
    with pytest.raises(LayoutError, match="model.memory='rmt'"):
        check_pipeline_model("rmt", 2)
    for kind in ("none", "lmm", "mac", "mag", "mal"):
        check_pipeline_model(kind, 2)
    check_pipeline_model("rmt", 1)
