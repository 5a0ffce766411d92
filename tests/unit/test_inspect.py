"""The inspectors' capture and analyses on tiny random models: they agree with direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memtrain.kernels.attention.reference import build_mask, repeat_kv
from memtrain.model.config import ModelConfig
from memtrain.model.layers import apply_rotary, rotary_tables
from memtrain.model.memory.rmt.config import RMTConfig
from memtrain.model.memory.titans.config import TitansConfig
from memtrain.model.transformer import build_model
from memtrain.train.inspect import attention_maps, registers
from memtrain.train.inspect.capture import Pass, Trace, probe_probs, run_captured
from memtrain.train.inspect.load import InspectError


def plain(**kw) -> torch.nn.Module:
    base = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, num_meta_tokens=3, window=8,
                global_layers=[-1], max_seq_len=64)
    return build_model(ModelConfig(**{**base, **kw})).eval()


def rmt() -> torch.nn.Module:
    return build_model(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   num_meta_tokens=2, window=4, memory="rmt", max_seq_len=64,
                                   rmt=RMTConfig(segment_len=8, num_memory=3))).eval()


def direct_block_probs(model, h: torch.Tensor, layer: int) -> torch.Tensor:
    """Block `layer`'s probabilities from its input h `[B, N, D]`, written out from the spec (no capture code)."""
    attn = model.blocks[layer].attn
    a = model.blocks[layer].attn_norm(h)
    B, N, _ = a.shape
    G, Dh, Hkv = attn.group, attn.head_dim, attn.local_kv_heads
    qkv = attn.qkv(a).view(B, N, Hkv, G + 2, Dh)  # fused layout: per KV head, G queries, then k, then v
    q = qkv[:, :, :, :G].reshape(B, N, Hkv * G, Dh).transpose(1, 2)
    k = qkv[:, :, :, G].transpose(1, 2)
    cos, sin = rotary_tables(attn.num_prefix, N - attn.num_prefix, Dh, attn.rope_theta, a.device)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    s = (q.double() @ repeat_kv(k.double(), G).transpose(-1, -2)) / math.sqrt(Dh)
    mask = build_mask(N, attn.num_prefix, attn.window)
    return F.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)


@pytest.mark.parametrize("make", [plain, rmt])
def test_capture_leaves_outputs_unchanged_and_rows_sum_to_one(make):
    model = make()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    from memtrain.train.inspect.capture import capture
    with torch.no_grad(), capture(model) as trace:
        got = model(ids).logits
    assert torch.equal(ref, got)
    assert len(trace.passes) == (1 if model.cfg.memory == "none" else 3)  # RMT: 8 + 8 + 4 tokens
    for p in trace.passes:
        assert len(p.hidden) == model.cfg.n_layers + 1 and len(p.probs) == model.cfg.n_layers
        for probs in p.probs:
            assert torch.allclose(probs.sum(-1), torch.ones(()).double(), atol=1e-12)


def test_captured_probabilities_equal_a_direct_computation():
    model = plain()
    ids = torch.randint(0, 300, (2, 20))
    trace = run_captured(model, ids)
    with torch.no_grad():
        h = model.embed(ids)
        for layer, block in enumerate(model.blocks):
            assert torch.allclose(trace.passes[0].hidden[layer], h, atol=0)
            want = direct_block_probs(model, h, layer)
            assert torch.allclose(trace.passes[0].probs[layer], want, atol=1e-6)
            h = block(h)
        assert torch.allclose(trace.passes[0].hidden[-1], h, atol=0)


def test_probe_through_the_kernel_matches_reference_mask():
    """The one-hot probe measures the real kernel (sdpa); it agrees with the reference-mask recomputation."""
    from memtrain.kernels.attention import attention
    from memtrain.train.inspect.capture import reference_probs
    q, k = torch.randn(1, 4, 21, 8), torch.randn(1, 2, 21, 8)
    mask = build_mask(21, 3, 5)
    attend = lambda q, k, v: attention(q, k, v, num_prefix=3, window=5, backend="sdpa")  # noqa: E731
    assert torch.allclose(probe_probs(attend, q, k), reference_probs(q, k, mask), atol=1e-5)


def test_rmt_regions_and_write_rows():
    model = rmt()
    trace = run_captured(model, torch.randint(0, 300, (1, 20)))
    full, last = trace.passes[0], trace.passes[-1]
    assert full.regions == {"meta": (0, 2), "read": (2, 5), "text": (5, 13), "write": (13, 16)}
    assert last.regions == {"meta": (0, 2), "read": (2, 5), "text": (5, 9)}  # partial segment: no write tokens
    p = full.probs[0][0, 0]  # head 0 of the windowed layer (window 4): write rows see every earlier key
    assert bool((p[13:, :13] > 0).all())
    assert float(p[5:13, 13:].abs().max()) == 0.0  # text never sees write tokens
    assert float(p[12, 5:8].abs().max()) == 0.0  # text query 7 sees text 4..7 only (window 4)


def test_registers_numbers_agree_with_hidden_states_and_probabilities():
    model = plain(window=0, global_layers=[])
    ids = torch.randint(0, 300, (3, 16))
    trace = run_captured(model, ids)
    rep = registers.analyse(trace, ids, str, k=1.5)
    P = 3
    for r, row in enumerate(rep.rows):
        h = trace.passes[0].hidden[r]
        norms = h[:, P:].norm(dim=-1)
        assert row.text_median == pytest.approx(float(norms.flatten().median()))
        assert row.num_outliers == int((norms > 1.5 * norms.flatten().median()).sum())
        if r == len(model.blocks):
            assert row.share_first is None
            continue
        probs = trace.passes[0].probs[r][:, :, P + 1:]  # text queries after the first
        assert row.share_first == pytest.approx(float(probs[..., P].mean()))
        assert row.share_meta == pytest.approx(float(probs[..., :P].sum(-1).mean()))
        omask = torch.zeros(3, P + 16)
        omask[:, P:] = (norms > 1.5 * norms.flatten().median()).double()
        assert row.share_outliers == pytest.approx(float((probs * omask[:, None, None]).sum(-1).mean()))
        # uniform baseline with global attention: text query i (i >= 1) sees P meta + i + 1 text keys
        visible = torch.arange(1, 16) + 1 + P
        assert row.uniform_first == pytest.approx(float((1.0 / visible).mean()))
        assert row.uniform_meta == pytest.approx(float((P / visible).mean()))
    shares = registers.query_shares(trace.passes[0].probs[0], trace.passes[0].regions, torch.zeros(3, 16, dtype=bool))
    assert torch.allclose(shares["meta"] + shares["text"], torch.ones(()).double(), atol=1e-12)


def test_a_planted_outlier_is_found_with_its_position_and_token():
    h = torch.ones(1, 2 + 6, 4)
    h[0, 2 + 3] *= 50.0  # text position 3: 50x the median norm
    probs = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    probs[..., 5] = 1.0  # everyone attends to the outlier (not a valid mask; enough for the bookkeeping)
    trace = Trace([Pass(hidden=[h, h], probs=[probs], methods=["test"], regions={"meta": (0, 2), "text": (2, 8)})])
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    rep = registers.analyse(trace, ids, lambda t: f"tok{t}", k=10)
    assert rep.rows[0].num_outliers == 1 and rep.rows[0].share_outliers == pytest.approx(1.0)
    o = rep.outliers[0]
    assert (o.position, o.token_id, o.token, o.ratio) == (3, 13, "tok13", pytest.approx(50.0))
    assert "tok13" in registers.markdown(rep)


@pytest.mark.parametrize("make", [plain, rmt])
def test_quadrant_shares_sum_to_one(make):
    model = make()
    trace = run_captured(model, torch.randint(0, 300, (1, 16)))
    rows = attention_maps.quadrants(trace)
    assert len(rows) == model.cfg.n_layers * (4 + 1)
    for r in rows:
        assert r.processing + r.write + r.read + r.text_text == pytest.approx(1.0, abs=1e-9)
        if model.cfg.memory == "none":
            assert r.write == 0.0  # meta tokens cannot see text under the reference mask
        else:
            assert r.write > 0.0  # RMT write tokens read the segment
    # direct: the read share of layer 0, head 0 in the plain model
    if model.cfg.memory == "none":
        p = trace.passes[0].probs[0][0, 0]
        assert rows[0].read == pytest.approx(float(p[3:, :3].sum()) / p.shape[0])


def titans(kind: str, num_meta: int = 3) -> torch.nn.Module:
    """A tiny fp64 Titans model with random weights: segments of 7 (MAC), window 5 in layer 0, global layer 1."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      num_meta_tokens=num_meta, window=5, global_layers=[-1], memory=kind, max_seq_len=64,
                      titans=TitansConfig(segment_len=7, chunk_size=4, memory_heads=2, conv_size=3))
    return build_model(cfg).double().eval()


def titans_wrapped_names(model) -> dict:
    """What the Titans capture wraps, as it stands now (to check that it is restored)."""
    import memtrain.model.memory.titans.model as tm
    return {"_masked": tm._masked, "attention": tm.attention,
            **{f"step{i}": b.__dict__.get("step") for i, b in enumerate(model.blocks)},
            **{f"sequence{i}": b.attn.sequence for i, b in enumerate(model.blocks)}}


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_titans_capture_reproduces_the_attention_and_leaves_the_model_alone(kind):
    from memtrain.train.inspect.capture import capture
    from memtrain.train.inspect.titans_capture import capture_titans
    model, ids = titans(kind), torch.randint(0, 300, (2, 23))  # MAC: segments 7 + 7 + 7 + 2
    before = titans_wrapped_names(model)
    with torch.no_grad():
        ref = model(ids).logits
        with capture_titans(model, keep_io=True) as trace:
            got = model(ids).logits
        with capture(model) as via_capture:  # capture.py hands Titans models to the Titans capture
            model(ids)
    assert torch.equal(ref, got)  # bit for bit: the wrappers return the kernels' own outputs
    assert titans_wrapped_names(model) == before and all(v is None for k, v in before.items() if "step" in k)
    assert len(trace.passes) == 1 and len(via_capture.passes) == 1
    p = trace.passes[0]
    P, n = 3, 23
    assert len(p.hidden) == 3 and len(p.probs) == 2 and p.regions == {"meta": (0, P), "text": (P, P + n)}
    assert torch.equal(p.hidden[0], model.embed(ids).float())
    for layer, (probs, (v, out)) in enumerate(zip(p.probs, trace.io[0])):
        assert probs.dtype == torch.float64 and torch.equal(probs, via_capture.passes[0].probs[layer])
        # the probabilities reproduce what the kernel returned (values laid out as the map; fp64)
        assert float((probs @ repeat_kv(v, 2) - out).abs().max()) < 1e-10
        assert float((probs.sum(-1) - 1).abs().max()) < 1e-12
        if kind == "mac":
            assert probs.shape == (2, 4, P + n, P + 2 * n)
            assert p.key_regions == {"persistent": (0, P), "retrieved": (P, P + n), "segment": (P + n, P + 2 * n)}
            visible = torch.zeros(P + n, P + 2 * n, dtype=torch.bool)
            visible[:, :P] = True  # persistent keys: every query
            for i in range(n):  # text query i: h_j and x_j of its own segment, j <= i
                s0 = i - i % 7
                visible[P + i, P + s0:P + i + 1] = visible[P + i, P + n + s0:P + n + i + 1] = True
        else:
            assert not p.key_regions and probs.shape == (2, 4, P + n, P + n)
            visible = build_mask(P + n, P, 5 if layer == 0 else None)  # prefix + window 5; layer 1 global
        assert float(probs[..., ~visible].abs().max()) == 0.0  # no mass on a later or other segment's key
        assert bool((probs[..., visible] > 0).all())  # and every visible key gets some: the mask is exactly that
    if kind == "mac":  # the key axis is where it says: block 0's own values (no rotary) at persistent and segment
        from memtrain.model.memory.titans.model import _qkv
        block, v = model.blocks[0], trace.io[0][0][0]
        with torch.no_grad():
            direct = _qkv(block.attn, block.attn_norm(model.embed(ids)), None, None)[2]  # [B, Hkv, P + n, Dh]
        assert torch.allclose(v[:, :, :P], direct[:, :, :P], atol=1e-12)
        assert torch.allclose(v[:, :, P + n:], direct[:, :, P:], atol=1e-12)


def test_titans_mac_key_shares_and_mag_quadrants_sum_to_one():
    mac = run_captured(titans("mac"), torch.randint(0, 300, (1, 16)))
    rows = attention_maps.key_shares(mac)
    assert len(rows) == 2 * (4 + 1)
    for r in rows:
        assert set(r.shares) == {"persistent", "retrieved", "segment"}
        assert sum(r.shares.values()) == pytest.approx(1.0, abs=1e-12)
    probs = mac.passes[0].probs[1][0, 2]  # direct: layer 1, head 2, retrieved share of the text queries
    assert rows[5 + 2].shares["retrieved"] == pytest.approx(float(probs[3:, 3:19].sum()) / 16)
    with pytest.raises(ValueError, match="key_shares"):
        attention_maps.quadrants(mac)
    mag = run_captured(titans("mag"), torch.randint(0, 300, (1, 16)))
    for r in attention_maps.quadrants(mag):
        assert r.processing + r.write + r.read + r.text_text == pytest.approx(1.0, abs=1e-9)
        assert r.write == 0.0  # meta tokens see only the prefix


def test_titans_mac_without_meta_tokens():
    trace = run_captured(titans("mac", num_meta=0), torch.randint(0, 300, (1, 9)))
    probs = trace.passes[0].probs[0]
    assert probs.shape == (1, 4, 9, 18) and trace.passes[0].key_regions["persistent"] == (0, 0)
    assert float((probs.sum(-1) - 1).abs().max()) < 1e-12


def test_titans_capture_refuses_continued_calls_and_restores_after_the_error():
    from memtrain.train.inspect.titans_capture import capture_titans
    model, ids = titans("mac"), torch.randint(0, 300, (1, 10))
    before = titans_wrapped_names(model)
    with torch.no_grad():
        state = model(ids[:, :4]).state
        with pytest.raises(InspectError, match="fresh calls only"), capture_titans(model):
            model(ids[:, 4:], state=state)
    assert titans_wrapped_names(model) == before


def test_titans_lmm_has_no_attention_but_gates():
    model = titans("lmm")
    ids = torch.randint(0, 300, (1, 12))
    with pytest.raises(InspectError, match="no attention"):
        run_captured(model, ids)
    assert len(run_captured(model, ids, probs=False).passes[0].hidden) == 3  # hidden states still work
    from memtrain.train.inspect.gates import titans_gates
    gates = titans_gates(titans("mag"), ids)
    assert set(gates) == {"theta", "eta", "alpha"}
    for g in gates.values():
        assert g.shape[0] == 2 and g.shape[1] == 1 and g.shape[-1] == 12
        assert bool(((g >= 0) & (g <= 1)).all())
    # direct: block 0's θ of the text from its memory's gate layer (MAG feeds it attn_norm(h))
    model = titans("mag")
    block = model.blocks[0]
    with torch.no_grad():
        a = block.attn_norm(model.embed(ids))[:, 3:]
        direct = torch.sigmoid(block.memory.gates(a)).view(1, 12, block.memory.heads, 3)[..., 0]
    assert torch.allclose(gates["theta"][0, 0], direct.transpose(1, 2)[0].to(gates["theta"].dtype), atol=1e-6)
