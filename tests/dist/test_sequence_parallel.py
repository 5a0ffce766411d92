"""Sequence parallelism (parallel.sequence_parallel) at TP = 2 reproduces one process: logits, loss and every
gradient, for the plain model, every Titans variant and the RMT, with meta tokens; and composed with context
parallelism (TP 2 × CP 2). One spawn of 4 gloo ranks: first TP 2 × DP 2 (the DP pairs repeat the same work), then
TP 2 × CP 2. Each rank also records the rows its blocks received, so a test that passed without splitting the
sequence cannot pass."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.spawn import run_ranks

BASE = dict(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
            max_seq_len=64, num_meta_tokens=2, window=4, global_layers=[-1], attention_backend="reference")
# (model overrides, text tokens T): rows between regions are P + T (per CP rank: P + T / 2), split over TP = 2
CASES = {
    "baseline": (dict(), 14),
    "baseline_tied_nometa": (dict(num_meta_tokens=0, tie_embeddings=True), 12),
    "mac_linear": (dict(memory="mac", titans=dict(segment_len=5, chunk_size=3, memory_depth=1)), 14),
    "mac_deep": (dict(memory="mac", num_meta_tokens=0, titans=dict(segment_len=4, chunk_size=3, memory_depth=2)), 16),
    "mag_deep": (dict(memory="mag", titans=dict(chunk_size=3, memory_depth=2)), 14),
    "mal_linear": (dict(memory="mal", titans=dict(chunk_size=3, memory_depth=1)), 14),
    "lmm_deep": (dict(memory="lmm", titans=dict(chunk_size=3, memory_depth=2, conv_size=0)), 14),
    # rows per segment: P 2 + read 2 + L 4 + write 2 = 10; three full segments
    "rmt": (dict(memory="rmt", rmt=dict(segment_len=4, num_memory=2)), 12),
    # activation checkpointing recomputes the gathers and re-gathers inside its recomputation
    "baseline_selective_ckpt": (dict(checkpoint="selective"), 14),
    "mag_full_ckpt": (dict(memory="mag", checkpoint="full", titans=dict(chunk_size=3, memory_depth=1)), 14),
    "rmt_bottleneck_tied": (dict(memory="rmt", tie_embeddings=True,
                                 rmt=dict(segment_len=4, num_memory=2, bottleneck=True, bottleneck_window=2)), 12),
}
# composed with context parallelism: every CP rank holds whole segments (MAC 8 tokens per rank: 2 segments of 4)
CP_CASES = {
    "baseline": (dict(), 16),
    "mac_linear": (dict(memory="mac", titans=dict(segment_len=4, chunk_size=3, memory_depth=1, conv_size=0)), 16),
    "mag_deep": (dict(memory="mag", titans=dict(chunk_size=4, memory_depth=2)), 16),
}
DTYPES = (torch.float64, torch.float32)
TOL = {str(torch.float64): 1e-10, str(torch.float32): 2e-5}


def _config(overrides: dict):
    from memtrain.model import ModelConfig
    from memtrain.model.memory.rmt.config import RMTConfig
    from memtrain.model.memory.titans.config import TitansConfig
    kw = {**BASE, **overrides}
    kw.pop("checkpoint", None)
    if "titans" in kw:
        kw["titans"] = TitansConfig(memory_heads=4, **{"conv_size": 3, **kw["titans"]})
    if "rmt" in kw:
        kw["rmt"] = RMTConfig(**kw["rmt"])
    return ModelConfig(**kw)


def _ranks(rank: int, world: int) -> dict:
    from megatron.core import parallel_state
    out = {}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    for case, (overrides, T) in CASES.items():
        for dtype in DTYPES:
            out[("tp", case, str(dtype))] = _compare(overrides, T, dtype, cp=None)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2,
                                             create_gloo_process_groups=False)
    from memtrain.launch.context_parallel import ContextParallel
    for case, (overrides, T) in CP_CASES.items():
        for dtype in DTYPES:
            out[("tp_cp", case, str(dtype))] = _compare(overrides, T, dtype, cp=ContextParallel())
    return out


def _compare(overrides: dict, T: int, dtype: torch.dtype, cp) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from memtrain.launch.tensor_parallel import MegatronFactory, gather_full, shard_full
    from memtrain.model import build_model

    cfg = _config(overrides)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
    probe = torch.randn(2, T, cfg.vocab_size, generator=gen, dtype=dtype)
    exact = dtype == torch.float64
    local = (lambda x: x) if cp is None else cp.local_slice

    def objective(model, tok, tgt, prb):
        # fp64: a linear functional of the gathered logits (every layer checked exactly); fp32: the real loss path
        out = model(tok, None if exact else tgt)
        logits = model.factory.gather_logits(out.logits)[..., : cfg.vocab_size]
        return logits, ((logits * prb).sum() if exact else out.loss)

    torch.manual_seed(0)
    ref = build_model(dataclasses.replace(cfg)).to(dtype)
    ref_logits, ref_obj = objective(ref, tokens, targets, probe)
    ref_obj.backward()
    params = dict(ref.named_parameters())

    factory = MegatronFactory(sequence_parallel=True)
    if cp is not None:
        factory.sequence = cp
    model = build_model(dataclasses.replace(cfg), factory).to(dtype)
    model.set_activation_checkpoint(overrides.get("checkpoint", "none"))
    tp_rank, tp = factory.tp_rank, factory.tp_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard_full(params[name].detach(), p, tp_rank, tp))
    rows = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    whole = []  # saved tensors whose storage is a whole gathered [B, N, D]: what re-gathering should not keep

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        n_full = cfg.num_meta_tokens + (T if cp is None else T // cp.size)
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.shape[-1] == cfg.d_model \
                and storage.nbytes() == 2 * n_full * cfg.d_model * t.element_size():
            whole.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, obj = objective(model, local(tokens), local(targets), local(probe))
    obj.backward()

    total = obj.detach().clone()
    cp_size = 1 if cp is None else cp.size
    if cp is not None:
        dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
        total = total if exact else total / cp_size
    worst = 0.0
    for name, p in model.named_parameters():
        g = gather_full(p.grad if p.grad is not None else torch.zeros_like(p), p)
        if cp is not None:
            g = g.clone()
            dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
            g = g if exact else g / cp_size
        worst = max(worst, float((g - params[name].grad).abs().max()))
    return dict(logits=float((logits - local(ref_logits)).abs().max()), objective=abs(float(total - ref_obj)),
                grads=worst, rows=rows, full_rows=ref_rows(ref, tokens), whole=whole)


def ref_rows(model, tokens) -> list[int]:
    """The rows the single-process model's first block receives per call (RMT: one call per segment)."""
    rows = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return rows


@pytest.fixture(scope="module")
def results():
    return run_ranks(_ranks, 4)


def _check(r: dict, cp: int, tol: float):
    assert r["objective"] < tol * max(1.0, abs(r["objective"])), r
    assert r["logits"] < tol * 10, r
    assert r["grads"] < tol, r
    # the sequence really was split: every block call saw 1/(tp·cp) of the rows of the one-process call (meta
    # tokens counted once per CP rank)
    rows = r["rows"][:len(r["full_rows"])]  # activation checkpointing calls the blocks again in the backward
    assert len(rows) == len(r["full_rows"]), r
    assert all(0 < n < full for n, full in zip(rows, r["full_rows"])), r


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_tp2_matches_one_process(results, case, dtype):
    for rank_results in results:
        r = rank_results[("tp", case, str(dtype))]
        _check(r, 1, TOL[str(dtype)])
        assert all(2 * n == full for n, full in zip(r["rows"][:len(r["full_rows"])], r["full_rows"])), r
        if not case.startswith(("mac", "rmt")) and "ckpt" not in case:
            # the column layers keep this rank's rows and gather them again (MAC and the RMT's memory rows keep whole
            # tensors by design: a replicated segment loop, the write rows of the next memory)
            assert r["whole"] == [], r["whole"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(CP_CASES))
def test_sequence_parallel_composes_with_context_parallel(results, case, dtype):
    for rank_results in results:
        _check(rank_results[("tp_cp", case, str(dtype))], 2, TOL[str(dtype)])


@pytest.mark.parametrize("bad, good, needle", [
    (["parallel.tp=1"], ["parallel.tp=2"], "parallel.tp > 1"),                    # nothing to split over
    (["parallel.tp=2", "data.seq_len=15"], ["parallel.tp=2"], "divides by 2"),      # 2 meta + 15 rows
    (["parallel.tp=2", "model.memory=\"rmt\"", "model.rmt.num_memory=2", "data.seq_len=20", "model.rmt.segment_len=5"],
     ["parallel.tp=2", "model.memory=\"rmt\"", "model.rmt.num_memory=2", "data.seq_len=20", "model.rmt.segment_len=4"],
     "model.rmt.segment_len"),                                                   # 2 + 2·2 + 5 rows per segment
])
def test_impossible_sequence_parallel_layouts_are_one_line_errors(bad, good, needle):
    from memtrain.train.config import ConfigError, load_config
    sets = ["model.vocab_size=96", "model.num_meta_tokens=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seq_len=16", "parallel.sequence_parallel=true"]
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("+", r"\+")) as info:
        load_config(None, sets + bad)
    assert "\n" not in str(info.value)
    load_config(None, sets + good)  # the same run with a length that splits is accepted
