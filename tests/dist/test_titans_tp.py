"""Titans models at TP = 2 (megatron-core layers on 2 gloo ranks, memory heads split) reproduce TP = 1: loss and
every gradient, for every variant, in one spawn. Each model is run as two chained calls (the second continues from
the first's state: KV caches, memory, conv tails, MAC segment in progress) so the stateful paths are covered too."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.spawn import run_ranks

CASES = {
    # linear memory, GQA, meta tokens, windowed + global layer
    "mal_linear": dict(memory="mal", depth=1),
    "mag_deep": dict(memory="mag", depth=2),
    "lmm_deep_noconv": dict(memory="lmm", depth=2, conv_size=0, tie_embeddings=True),
    "mac_linear": dict(memory="mac", depth=1),
    "mac_deep": dict(memory="mac", depth=2, num_meta_tokens=0),
}
DTYPES = (torch.float64, torch.float32)
SPLIT = 8  # first call 8 tokens, second 9: not aligned to the segment (5) or chunk (3)


def _config(case: str):
    from memtrain.model import ModelConfig
    from memtrain.model.memory.titans.config import TitansConfig
    kw = dict(CASES[case])
    titans = TitansConfig(segment_len=5, chunk_size=3, memory_depth=kw.pop("depth"), memory_heads=4,
                          conv_size=kw.pop("conv_size", 3))
    base = dict(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                ffn_hidden=48, max_seq_len=64, num_meta_tokens=2, window=4, global_layers=[-1],
                attention_backend="reference")
    return ModelConfig(**{**base, **kw}, titans=titans)


def _tp_rank(rank: int, world: int) -> dict:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    return {(case, str(dtype)): _compare(rank, world, case, dtype) for case in CASES for dtype in DTYPES}


def _compare(rank: int, world: int, case: str, dtype: torch.dtype) -> dict:
    from memtrain.launch.tensor_parallel import MegatronFactory, gather_full, shard_full
    from memtrain.model import build_model

    cfg = _config(case)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    targets = torch.randint(0, cfg.vocab_size, (2, 17))
    probe = torch.randn(2, 17, cfg.vocab_size, dtype=dtype)
    exact = dtype == torch.float64

    def loss_of(model) -> torch.Tensor:
        # fp32: the real loss path (vocab_parallel_cross_entropy). fp64: a linear functional of the gathered logits,
        # so the layers, the memory and the carried state are checked exactly (as tests/dist/test_tensor_parallel).
        first = model(tokens[:, :SPLIT], None if exact else targets[:, :SPLIT])
        second = model(tokens[:, SPLIT:], None if exact else targets[:, SPLIT:], state=first.state)
        if not exact:
            return (first.loss * SPLIT + second.loss * (17 - SPLIT)) / 17
        logits = torch.cat([model.factory.gather_logits(o.logits) for o in (first, second)], 1)
        return (logits[..., : cfg.vocab_size] * probe).sum()

    ref = build_model(dataclasses.replace(cfg)).to(dtype)
    ref_loss = loss_of(ref)
    ref_loss.backward()
    params = dict(ref.named_parameters())

    tp_model = build_model(dataclasses.replace(cfg), MegatronFactory()).to(dtype)
    split = []
    with torch.no_grad():
        for name, p in tp_model.named_parameters():
            local = shard_full(params[name].detach(), p, rank, world)
            if local.shape != params[name].shape:
                split.append(name)
            p.copy_(local)
    tp_loss = loss_of(tp_model)
    tp_loss.backward()

    worst = 0.0
    for name, p in tp_model.named_parameters():
        grad = gather_full(p.grad, p)
        assert grad.shape == params[name].grad.shape, name
        worst = max(worst, float((grad - params[name].grad).abs().max()))
    return {"ref_loss": ref_loss.item(), "tp_loss": tp_loss.item(), "worst_grad_diff": worst, "split": split,
            "names": sorted(n for n, _ in tp_model.named_parameters()), "ref_names": sorted(params)}


# fp64: only summation order differs (relative to a probe loss summing ~3400 terms of size ~1). fp32: the bar.
TOLERANCE = {str(torch.float64): 1e-10, str(torch.float32): 1e-5}


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_rank, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_titans_tp2_matches_tp1(tp_results, case, dtype):
    tol = TOLERANCE[str(dtype)]
    for rank, results in enumerate(tp_results):
        r = results[(case, str(dtype))]
        assert r["names"] == r["ref_names"], "TP model must keep the single-device parameter names"
        # the memory heads really are split: M_0, the query, key/value, gate and output projections (and the conv) are sharded
        mem = [n for n in r["split"] if ".memory." in n]
        assert any("init_weights" in n for n in mem) and any("memory.query" in n for n in mem) and any("memory.kv" in n for n in mem), mem
        assert any("memory.gates" in n for n in mem) and any("memory.out" in n for n in mem), mem
        assert abs(r["tp_loss"] - r["ref_loss"]) < tol, (rank, r["tp_loss"], r["ref_loss"])
        assert r["worst_grad_diff"] < tol, (rank, r["worst_grad_diff"])
