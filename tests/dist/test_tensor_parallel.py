"""TP = 2 (megatron-core layers on gloo) reproduces the TP = 1 model: loss and every weight's gradient."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.spawn import run_ranks

CASES = {
    # meta tokens + a windowed layer and a global one, GQA, untied head
    "meta_window_gqa": dict(num_meta_tokens=3, window=8, global_layers=[-1], n_kv_heads=2),
    # tied embeddings, plain MHA, no meta tokens, vocab padding rows present (100 -> 128)
    "tied_plain": dict(tie_embeddings=True, window=0, num_meta_tokens=0),
}


def _config(**overrides):
    from memtrain.model import ModelConfig
    base = dict(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                max_seq_len=64, attention_backend="reference")
    return ModelConfig(**{**base, **overrides})


def _tp_rank(rank: int, world: int) -> dict:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    return {(case, str(dtype)): _compare(rank, world, case, dtype)
            for case in CASES for dtype in (torch.float64, torch.float32)}


def _compare(rank: int, world: int, case: str, dtype: torch.dtype) -> dict:
    from memtrain.launch.tensor_parallel import MegatronFactory, gather_full, shard_full
    from memtrain.model import build_model

    cfg = _config(**CASES[case])
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 21))
    targets = torch.randint(0, cfg.vocab_size, (3, 21))
    probe = torch.randn(3, 21, cfg.vocab_size, dtype=dtype)

    def loss_of(model, factory_loss: bool) -> torch.Tensor:
        # fp32: the real loss path (megatron's vocab_parallel_cross_entropy, which always works in fp32).
        # fp64: a linear functional of the gathered logits, so the layers themselves are checked exactly.
        out = model(tokens, targets if factory_loss else None)
        if factory_loss:
            return out.loss
        logits = model.factory.gather_logits(out.logits)[..., : cfg.vocab_size]
        return (logits * probe).sum()

    exact = dtype == torch.float64
    ref = build_model(dataclasses.replace(cfg)).to(dtype)
    ref_loss = loss_of(ref, not exact)
    ref_loss.backward()

    tp_model = build_model(dataclasses.replace(cfg), MegatronFactory()).to(dtype)
    full = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in tp_model.named_parameters():
            p.copy_(shard_full(full[name].detach(), p, rank, world))
    tp_loss = loss_of(tp_model, not exact)
    tp_loss.backward()

    worst = 0.0
    names = []
    for name, p in tp_model.named_parameters():
        grad = gather_full(p.grad, p)
        assert grad.shape == full[name].grad.shape, name
        worst = max(worst, float((grad - full[name].grad).abs().max()))
        names.append(name)
    return {"ref_loss": ref_loss.item(), "tp_loss": tp_loss.item(), "worst_grad_diff": worst,
            "names": names, "ref_names": sorted(full)}


# fp64: only the summation order differs, so agreement is near machine precision (relative to the
# probe loss, a sum of ~6000 terms of size ~1). fp32: the bar, 1e-5 on the loss and every gradient.
TOLERANCE = {str(torch.float64): 1e-10, str(torch.float32): 1e-5}


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_rank, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_tp1(tp_results, case, dtype):
    tol = TOLERANCE[str(dtype)]
    for rank, results in enumerate(tp_results):
        r = results[(case, str(dtype))]
        assert sorted(r["names"]) == r["ref_names"], "TP model must keep the single-device parameter names"
        assert abs(r["tp_loss"] - r["ref_loss"]) < tol, (rank, r["tp_loss"], r["ref_loss"])
        assert r["worst_grad_diff"] < tol, (rank, r["worst_grad_diff"])
