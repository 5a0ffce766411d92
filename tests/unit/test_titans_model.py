"""Titans models (memtrain/model/memory/titans/model.py): state across pieces, token-by-token decoding, causality, shapes, bad input.

fp64 throughout where the statement is exact. Note that the plain model's RMSNorm and rotary work in fp32 even for
fp64 inputs (memtrain/model/layers.py), so "exact" here means: the same values through different call splits, to 1e-10
relative to the logits' scale; a real bug (a wrong mask, a lost state part, a misaligned chunk grid) is O(1e-2).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memtrain.model import LayerFactory, ModelConfig, ModelConfigError, build_model
from memtrain.model.memory.titans.model import TitansDecoderLM, TitansState
from memtrain.model.memory.titans.config import TitansConfig

KINDS = ("lmm", "mal", "mag", "mac")
T = 23
PIECES = (5, 1, 9, 3, 5)  # not aligned to the segment (7) or the chunk (4); the 3rd piece spans a segment border


def _cfg(kind: str, depth: int = 1, **kw) -> ModelConfig:
    titans = dict(segment_len=7, chunk_size=4, memory_depth=depth, memory_heads=2, conv_size=3)
    titans.update(kw.pop("titans", {}))
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                num_meta_tokens=3, window=5, global_layers=[-1], attention_backend="reference", memory=kind)
    return ModelConfig(**{**base, **kw}, titans=TitansConfig(**titans))


def _model(kind: str, depth: int = 1, **kw) -> TitansDecoderLM:
    torch.manual_seed(0)
    return build_model(_cfg(kind, depth, **kw)).double()


def _tokens(B: int = 2, n: int = T) -> torch.Tensor:
    return torch.randint(0, 50, (B, n), generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> float:
    err = float((a - b).abs().max() / max(1.0, float(b.abs().max())))
    assert err < tol, err
    return err


def _pieces(model, tokens, lengths):
    state, outs, i = None, [], 0
    for n in lengths:
        out = model(tokens[:, i:i + n], state=state)
        state, i = out.state, i + n
        outs.append(out.logits)
    return torch.cat(outs, dim=1), state


VARIANTS = [(k, d) for k in KINDS for d in (1, 2)]


@pytest.mark.parametrize("kind,depth", VARIANTS, ids=[f"{k}-d{d}" for k, d in VARIANTS])
def test_pieces_and_token_by_token_equal_one_pass(kind, depth):
    model, tokens = _model(kind, depth), _tokens()
    with torch.no_grad():
        full = model(tokens).logits
        _close(_pieces(model, tokens, PIECES)[0], full)
        _close(_pieces(model, tokens, [1] * T)[0], full)  # decoding: state = memory + KV cache


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_through_carried_state_equal_one_pass(kind):
    """Backpropagation through the states of chained calls equals backpropagation through one call."""
    model, tokens = _model(kind), _tokens()
    probe = torch.randn(2, T, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (model(tokens).logits * probe).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (_pieces(model, tokens, PIECES)[0] * probe).sum().backward()
    for n, p in model.named_parameters():
        _close(p.grad, ref[n])


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    """Changing tokens after t leaves every logit at <= t unchanged (MAC: also mid-segment, where a retrieved
    token h_j of a later token j must stay invisible); the logits after t do change."""
    model, tokens = _model(kind, depth=2), _tokens()
    with torch.no_grad():
        ref = model(tokens).logits
        for t in (0, 3, 6, 7, 12, 21):
            other = tokens.clone()
            other[:, t + 1:] = (other[:, t + 1:] + 1 + torch.arange(T - t - 1)) % 50
            out = model(other).logits
            assert float((out[:, :t + 1] - ref[:, :t + 1]).abs().max()) < 1e-12, (kind, t)
            assert float((out[:, t + 1:] - ref[:, t + 1:]).abs().max()) > 1e-6, (kind, t)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_carries_beyond_attention(kind):
    """With window 1 (MAG/MAL) or segments of 4 (MAC) attention cannot reach token 0 from token 20 in 2 layers:
    the change must travel through the memory. (Sanity that the memory is wired in, not a bypass.)"""
    model = _model(kind, window=1, global_layers=[], titans=dict(segment_len=4))
    tokens = _tokens()
    other = tokens.clone()
    other[:, 0] = (other[:, 0] + 1) % 50
    with torch.no_grad():
        assert float((model(other).logits[:, 20:] - model(tokens).logits[:, 20:]).abs().max()) > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_odd_lengths_and_every_parameter_trains(kind):
    model = _model(kind, depth=2, num_meta_tokens=0)
    for B, n in ((1, 1), (3, 13)):
        tokens = _tokens(B, n)
        out = model(tokens, targets=tokens)
        assert out.logits.shape == (B, n, 50) and torch.isfinite(out.loss)
        assert isinstance(out.state, TitansState) and out.state.seen == n
    model.zero_grad()
    model(_tokens(), targets=_tokens()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def test_stages_are_the_fresh_forward():
    model, tokens = _model("mac"), _tokens()
    h = tokens
    with torch.no_grad():
        for stage in model.stages():
            h = stage(h)
        _close(h[..., :50], model(tokens).logits)


def test_gate_initialisation():
    model = _model("mal", titans=dict(theta_init=0.2, eta_init=0.8, alpha_init=0.05))
    gates = torch.sigmoid(model.blocks[0].memory.gates.bias.detach().view(-1, 3))  # bias drawn in fp32
    _close(gates, torch.tensor([[0.2, 0.8, 0.05]], dtype=torch.float64).expand_as(gates).detach(), 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_greedy_full_forward(kind):
    model = _model(kind)
    prompt = _tokens(2, 6)
    seq, state = model.generate(prompt, 9)
    assert seq.shape == (2, 15) and state.seen == 15  # the state after every returned token
    with torch.no_grad():
        full = model(seq[:, :-1]).logits
    assert torch.equal(full[:, 5:].argmax(-1), seq[:, 6:])


@pytest.mark.parametrize("overrides,match", [
    (dict(titans=dict(memory_heads=3)), "model.titans.memory_heads=3 does not divide"),
    (dict(titans=dict(chunk_size=0)), "model.titans.chunk_size must be >= 1"),
    (dict(titans=dict(segment_len=100)), "model.titans.segment_len=100 is longer"),
    (dict(titans=dict(memory_act="relu")), "model.titans.memory_act='relu'"),
    (dict(titans=dict(memory_backend="cuda")), "model.titans.memory_backend='cuda'"),
    (dict(titans=dict(memory_backend="triton", memory_depth=4)), "model.titans.memory_backend='triton'"),
    (dict(titans=dict(theta_init=1.0)), "model.titans.theta_init must lie in"),
    (dict(titans=dict(conv_size=-1)), "model.titans.conv_size must be >= 0"),
    (dict(titans=dict(memory_expansion=0.0)), "model.titans.memory_expansion must be > 0"),
])
def test_bad_config_errors(overrides, match):
    with pytest.raises(ModelConfigError, match=match.replace("(", r"\(")):
        _cfg("mac", **overrides).validate()


def test_bad_input_errors():
    model = _model("mag")
    state = model(_tokens(2, 4)).state
    with pytest.raises(ValueError, match="state is for batch 2"):
        model(_tokens(3, 4), state=state)
    with pytest.raises(ValueError, match="must be the TitansState"):
        model(_tokens(2, 4), state=(1, 2))
    with pytest.raises(ValueError, match="targets shape"):
        model(_tokens(2, 4), targets=_tokens(2, 5))

    class TwoRanks(LayerFactory):
        tp_size = 2

    with pytest.raises(ValueError, match="memory_heads=3"):
        TitansDecoderLM(_cfg("mal", titans=dict(memory_heads=3, memory_head_dim=8)), TwoRanks())
    with pytest.raises(ValueError, match="needs model.memory"):
        TitansDecoderLM(dataclasses.replace(_cfg("mal"), memory="none"))


# ---- MAC fast path == the plain per-segment loop; stable default gates ------------------------------------------

def _memory_reference(mem, x, state):
    """TitansMemory.forward written plainly: separate q / kv / gate projections, F.conv1d, the reference kernel."""
    import torch.nn.functional as F

    from memtrain.kernels.titans import deep_memory, linear_memory
    from memtrain.model.memory.titans.memory import MemoryState

    B, n, _ = x.shape
    Hl, Dh = mem.heads, mem.head_dim
    z, conv = torch.cat([mem.query(x), mem.kv(x)], dim=-1), state.conv
    if mem.conv_size:
        zz = torch.cat([conv, z], dim=1)
        weight = torch.cat([mem.conv_q, mem.conv_kv]).unsqueeze(1)
        z = F.conv1d(zz.transpose(1, 2), weight, groups=zz.shape[-1]).transpose(1, 2)
        conv = zz[:, zz.shape[1] - (mem.conv_size - 1):]
    q = F.normalize(F.silu(z[..., :Hl * Dh].view(B, n, Hl, Dh)), dim=-1).transpose(1, 2)
    kv = z[..., Hl * Dh:].view(B, n, Hl, 2, Dh).transpose(1, 2)
    k, v = F.normalize(F.silu(kv[..., 0, :]), dim=-1), kv[..., 1, :]
    g = torch.sigmoid(mem.gates(x)).view(B, n, Hl, 3).permute(3, 0, 2, 1)
    kw = dict(chunk_size=mem.chunk_size, state=state.memory, chunk_offset=state.seen % mem.chunk_size,
              backend="reference")
    if mem.depth > 1:
        kw["act"] = mem.act
    y, memory = (linear_memory if mem.depth == 1 else deep_memory)(
        q.contiguous(), k.contiguous(), v.contiguous(), g[0], g[1], g[2], **kw)
    return mem.output(y), MemoryState(memory, conv, state.seen + n)


def _mac_reference(block, h, state, seen):
    """The MAC block as the plain loop of the module docstring (fresh call): per segment retrieve with the memory
    before the segment, attention over [p ‖ h ‖ segment], update the memory with the output, y ⊙ σ(m)."""
    from memtrain.kernels.attention import attention
    from memtrain.kernels.attention.reference import repeat_kv
    from memtrain.model.layers import rotary_tables
    from memtrain.model.memory.titans.model import _out, _qkv

    def _masked(q, k, v, mask):  # plain softmax attention (the deep reference kernel differentiates twice)
        g = q.shape[1] // k.shape[1]
        s = (q @ repeat_kv(k, g).transpose(-1, -2)) / q.shape[-1] ** 0.5
        return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ repeat_kv(v, g)

    assert state is None and seen == 0
    attn, mem, P, L = block.attn, block.memory, block.num_prefix, block.segment_len
    B, N, _ = h.shape
    n = N - P
    a = block.attn_norm(h)
    qp, kp, vp = _qkv(attn, a[:, :P], None, None)
    cos, sin = rotary_tables(0, n, attn.head_dim, block.rope_theta, a.device, 0)
    qt, kt, vt = _qkv(attn, a[:, P:], cos, sin)
    rq = mem.project_query(a[:, P:])
    state, outs = mem.initial_state(B), []
    for i0 in range(0, n, L):
        l = min(L, n - i0)
        retrieved = mem.output(mem.read(state.memory[0], rq[:, :, i0:i0 + l]))
        _, hk, hv = _qkv(attn, retrieved, None, None)
        causal = torch.ones(l, l, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(l, P, dtype=torch.bool), causal, causal], dim=1)
        keys = torch.cat([kp, hk, kt[:, :, i0:i0 + l]], dim=2)
        vals = torch.cat([vp, hv, vt[:, :, i0:i0 + l]], dim=2)
        y = _out(attn, _masked(qt[:, :, i0:i0 + l], keys, vals, mask))
        m, state = _memory_reference(mem, block.mem_norm(y), state)
        outs.append(y * torch.sigmoid(m))
    text = h[:, P:] + torch.cat(outs, dim=1)
    if P:
        out_p = _out(attn, attention(qp, kp, vp, num_prefix=P, backend=block.backend))
        text = torch.cat([h[:, :P] + out_p, text], dim=1)
    return text, None


@pytest.mark.parametrize("depth,meta", [(1, 3), (2, 3), (2, 0)])
def test_mac_fast_path_equals_plain_segment_loop(depth, meta, monkeypatch):
    """The MAC block's fast path (fused single-device projections, retrieved keys/values through the folded
    out·k/v matrix, shifted-sum conv, output projection batched over segments, chunked kernel) equals the plain
    per-segment loop with the reference kernel: logits and every parameter gradient, fp64."""
    from memtrain.model.memory.titans.model import TitansBlock

    model, tokens = _model("mac", depth, num_meta_tokens=meta), _tokens(2, 16)  # segments 7 + 7 + 2, chunks of 4
    probe = torch.randn(2, 16, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (model(tokens).logits * probe).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    logits = model(tokens).logits.detach()
    model.zero_grad()
    monkeypatch.setattr(TitansBlock, "_mac", _mac_reference)
    ref_logits = model(tokens).logits
    (ref_logits * probe).sum().backward()
    _close(logits, ref_logits.detach())
    for n, p in model.named_parameters():
        _close(fast[n], p.grad)


@pytest.mark.parametrize("kind", ["mac", "mal"])
def test_default_gates_keep_the_memory_bounded(kind):
    """Default config (θ, η, α init), deep memory, 512 random tokens of a fresh model: every memory output stays
    finite and O(1). (θ_init = 0.1 gave |M(q)| ~ 1e20 and NaN logits here: the chunked update overshoots.)"""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=512, num_meta_tokens=4,
                      memory=kind, window=64, titans=TitansConfig(memory_depth=2, chunk_size=64))
    model = build_model(cfg)
    peaks = []
    for block in model.blocks:
        block.memory.register_forward_hook(lambda mod, args, out: peaks.append(float(out[0].abs().max())))
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (2, 512), generator=torch.Generator().manual_seed(4))).logits
    assert bool(torch.isfinite(logits).all()) and peaks
    assert max(peaks) < 10.0, peaks
