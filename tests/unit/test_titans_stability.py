"""Stability of the chunked memory update (memtrain/model/memory/titans/stability.py, docs/titans.md#stability):
the 2×2 chunk map is the kernel's exact dynamics for identical keys, its spectral radius predicts divergence, and
the gate bounds model.titans.theta_max / eta_max are applied, initialised and checked.
"""
from __future__ import annotations

import re

import pytest
import torch

from memtrain.kernels.titans import linear_memory
from memtrain.model import ModelConfig, ModelConfigError, build_model
from memtrain.model.memory.titans.config import TitansConfig
from memtrain.model.memory.titans.stability import chunk_growth, chunk_map, max_chunk_growth


def _aligned_run(theta: float, eta: float, alpha: float, b: int, chunks: int, backend: str = "auto"):
    """The memory over b·chunks tokens with one unit key, zero values and constant gates, fp64: returns the read-out
    y_t = M_t(k) `[T, Dv]` (= e_t, the error along k) and M_0(k)."""
    T, D = b * chunks, 6
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    k = k.expand(1, 1, T, D).contiguous()
    v = torch.zeros(1, 1, T, D, dtype=torch.float64)
    M0 = torch.randn(1, 1, D, D, generator=g, dtype=torch.float64)
    gate = lambda x: torch.full((1, 1, T), x, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        y, _ = linear_memory(k, k, v, gate(theta), gate(eta), gate(alpha), chunk_size=b,
                             state=(M0, torch.zeros_like(M0)), backend=backend)
    return y[0, 0], (M0[0, 0] @ k[0, 0, 0])


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("theta,eta,alpha,b", [(0.003, 0.95, 0.0, 16), (0.02, 0.6, 0.01, 5), (0.3, 0.9, 0.1, 1)])
def test_chunk_map_is_the_kernels_dynamics(backend, theta, eta, alpha, b):
    chunks = 6
    y, e = _aligned_run(theta, eta, alpha, b, chunks, backend)
    (a, b_), (c, d) = chunk_map(theta, eta, b, alpha)
    s = torch.zeros_like(e)
    for n in range(chunks):
        e, s = a * e + b_ * s, c * e + d * s
        torch.testing.assert_close(y[(n + 1) * b - 1], e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("theta,eta", [(0.001, 0.99), (0.005, 0.95), (0.01, 0.9), (0.003, 0.95), (0.002, 0.8)])
def test_growth_per_chunk_is_the_spectral_radius(theta, eta):
    b, chunks = 16, 200
    y, _ = _aligned_run(theta, eta, 0.0, b, chunks)
    norms = y[b - 1::b].norm(dim=-1)  # at each chunk's end
    # geometric mean over the last 100 chunks (complex eigenvalues make single-chunk ratios oscillate)
    measured = (norms[-1] / norms[-101]).item() ** (1 / 100)
    rho = chunk_growth(theta, eta, b)
    if rho > 1:
        assert measured == pytest.approx(rho, rel=0.02), (measured, rho)
    else:  # bounded: it does not grow
        assert norms[-100:].max() <= norms[:5].max() * 1.5


def test_growth_facts():
    # b = 1 (the per-token recurrence) never grows for gates in (0, 1); b = 16 does already at the default θ_init
    # with a large learned η, and the bounds used for MAC at 1,024 tokens (docs/results.md) do not
    assert max_chunk_growth(0.999, 0.999, 1) <= 1.0
    assert chunk_growth(0.001, 0.99, 16) > 1.03
    assert max_chunk_growth(0.003, 0.95, 16) <= 1.0 < max_chunk_growth(0.005, 0.95, 16)


def _cfg(**titans) -> ModelConfig:
    t = {**dict(segment_len=8, chunk_size=4, memory_heads=2, conv_size=0), **titans}
    return ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=32, window=4,
                       attention_backend="reference", memory="mag", titans=TitansConfig(**t))


def test_bounded_gates_start_at_init_and_stay_below_the_bounds():
    torch.manual_seed(0)
    model = build_model(_cfg(theta_max=0.02, eta_max=0.9, theta_init=0.004, eta_init=0.7, alpha_init=0.05)).double()
    memory = model.blocks[0].memory
    at_bias = memory.gate_values(memory.gates.bias.detach()[None, None])  # [1, 1, H, 3]
    torch.testing.assert_close(at_bias, torch.tensor([0.004, 0.7, 0.05], dtype=torch.float64).expand_as(at_bias))
    with torch.no_grad():
        memory.gates.weight.normal_(std=30.0)  # saturate the sigmoids both ways
    g = memory.gate_values(memory.gates(torch.randn(3, 50, 16, dtype=torch.float64)))
    top = g.flatten(0, 2).amax(0)
    assert (top <= torch.tensor([0.02, 0.9, 1.0], dtype=torch.float64)).all() and top[0] > 0.019 and top[1] > 0.89


@pytest.mark.parametrize("titans,match", [
    (dict(theta_max=0.0), "model.titans.theta_max must lie in (0, 1]"),
    (dict(eta_max=1.5), "model.titans.eta_max must lie in (0, 1]"),
    (dict(eta_max=0.9), "model.titans.eta_init must lie in (0, eta_max=0.9), got 0.9"),
    (dict(theta_max=0.0005), "model.titans.theta_init must lie in (0, theta_max=0.0005)"),
    (dict(theta_max=0.01, eta_max=0.99, chunk_size=16, segment_len=16),
     "model.titans.theta_max=0.01 and eta_max=0.99 let the memory grow"),
])
def test_bad_bounds_are_one_line_errors(titans, match):
    with pytest.raises(ModelConfigError, match=re.escape(match)) as err:
        _cfg(**titans).validate()
    assert "\n" not in str(err.value)


def test_default_bounds_are_not_checked_and_change_nothing():
    _cfg(chunk_size=4).validate()  # θ, η unbounded: every existing config keeps its meaning
    torch.manual_seed(0)
    memory = build_model(_cfg()).double().blocks[0].memory
    # the gates before the bounds existed: sigmoid(logits) with the bias at logit(init)
    bias = memory.gates.bias.detach().view(-1, 3)
    torch.testing.assert_close(torch.sigmoid(bias), torch.tensor([[0.001, 0.9, 0.01]], dtype=torch.float64)
                               .expand_as(bias), rtol=1e-6, atol=0)
    logits = memory.gates(torch.randn(2, 19, 16, dtype=torch.float64))
    assert torch.equal(memory.gate_values(logits), torch.sigmoid(logits).unflatten(-1, (memory.heads, 3)))


def test_a_diverging_run_is_told_about_the_bounds():
    from memtrain.model.memory import memory_spec
    hint = memory_spec("mag").divergence_hint(_cfg(chunk_size=4))
    assert "model.titans.theta_max=0.003" in hint and "docs/titans.md#stability" in hint
    assert memory_spec("mag").divergence_hint(_cfg(chunk_size=4, theta_max=0.01, eta_max=0.95)) is None
    assert memory_spec("mag").divergence_hint(_cfg(chunk_size=1)) is None  # per-token updates do not overshoot
    assert memory_spec("none").divergence_hint(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2)) is None
