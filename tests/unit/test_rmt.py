"""Recurrent Memory Transformer: layout against a dense-mask unrolled loop, truncated BPTT, memory replay,
chained calls, generation, causality in every mode, bad settings (docs/rmt.md, issue 4)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from memtrain.kernels.attention.reference import masked_attention
from memtrain.model import ModelConfig, ModelConfigError, build_model
from memtrain.model.memory.rmt.model import RMTDecoderLM, RMTState
from memtrain.model.memory.rmt.config import RMTConfig

V = 97
MODES = {
    # plain RMT: global attention, no meta tokens
    "plain": dict(),
    # meta tokens + windowed layers (write queries take the split path) + a global layer, GQA
    "meta_window": dict(num_meta_tokens=2, window=2, global_layers=[-1], n_kv_heads=2),
    # MemBottleneck: text sees itself, meta and read memory only
    "bottleneck": dict(num_meta_tokens=1, rmt=dict(bottleneck=True, bottleneck_window=1)),
    # bottleneck with a wider window, continuing rotary positions, tied embeddings
    "bottleneck_w2_global_pos": dict(tie_embeddings=True, rmt=dict(bottleneck=True, bottleneck_window=2,
                                                                  positions="global")),
}


def rmt_cfg(**kw) -> ModelConfig:
    rmt = {**dict(segment_len=4, num_memory=2), **kw.pop("rmt", {})}
    base = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=64,
                attention_backend="reference", memory="rmt")
    return ModelConfig(**{**base, **kw}, rmt=RMTConfig(**rmt))


def make(mode: str = "plain", **rmt) -> RMTDecoderLM:
    kw = dict(MODES[mode])
    kw["rmt"] = {**kw.get("rmt", {}), **rmt}
    torch.manual_seed(0)
    return build_model(rmt_cfg(**kw)).double()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst < tol, worst


# ---- an independent spec: the unrolled loop with a dense mask built from the layout's definition ----------

def spec_mask(P: int, M: int, l: int, write: bool, window: int | None) -> torch.Tensor:
    """`[N, N]` visibility for [meta P; read M; text l; write M?] straight from the layout's definition."""
    prefix, N = P + M, P + M + l + (M if write else 0)
    i = torch.arange(N).unsqueeze(1)
    j = torch.arange(N).unsqueeze(0)
    is_text_i = (i >= prefix) & (i < prefix + l)
    is_text_j = (j >= prefix) & (j < prefix + l)
    causal = (j <= i) & (i >= prefix)  # text and write queries: causal over everything after the prefix
    if window is not None:  # only text-to-text is windowed; write queries see the whole segment
        causal = causal & ~(is_text_i & is_text_j & (i - j >= window))
    return (j < prefix) | causal


def spec_rotary(cfg: ModelConfig, P: int, M: int, l: int, write: bool, offset: int):
    Dh = cfg.head_dim
    pos = torch.cat([torch.full((P + M,), math.nan), torch.arange(l, dtype=torch.float64) + offset,
                     torch.full((M if write else 0,), math.nan)])
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.outer(pos, inv).repeat(1, 2)
    free = torch.isnan(ang)
    cos = torch.where(free, 1.0, ang.cos())
    sin = torch.where(free, 0.0, ang.sin())
    return cos, sin  # fp64, as memtrain.model.layers.rotary_tables


def spec_loss(model: RMTDecoderLM, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unrolled loop over segments, full BPTT, dense masks; uses the model's parameters and blocks only."""
    cfg, r = model.cfg, model.cfg.rmt
    P, M, L = cfg.num_meta_tokens, r.num_memory, r.segment_len
    B = tokens.shape[0]
    memory = model.memory_init.expand(B, -1, -1)
    logits = []
    for s, ids in enumerate(tokens.split(L, dim=1)):
        l = ids.shape[1]
        write = l == L
        parts = [model.embed.meta.expand(B, -1, -1)] if P else []
        parts += [memory + model.read_slots, model.embed.tokens(ids)]
        parts += [memory + model.write_slots] if write else []
        h = torch.cat(parts, 1)
        rotary = spec_rotary(cfg, P, M, l, write, s * L if r.positions == "global" else 0)
        for layer, block in enumerate(model.blocks):
            window = cfg.layer_window(layer)
            if r.bottleneck:
                window = min(window or r.bottleneck_window, r.bottleneck_window)
            mask = spec_mask(P, M, l, write, window)
            h = block(h, rotary=rotary, attend=lambda q, k, v, mask=mask: masked_attention(q, k, v, mask))
        logits.append(model.head.proj(model.head.norm(h[:, P + M:P + M + l])))
        if write:
            memory = model.memory_norm(h[:, P + M + l:])
    logits = torch.cat(logits, 1)[..., :V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_full_bptt_equals_the_unrolled_dense_mask_loop(mode):
    model = make(mode)
    tokens, targets = torch.randint(0, V, (2, 14)), torch.randint(0, V, (2, 14))  # 3 full segments + 2
    loss = model(tokens, targets).loss
    loss.backward()
    got = grads(model)
    model.zero_grad()
    ref = spec_loss(model, tokens, targets)
    ref.backward()
    assert abs(float(loss.detach() - ref.detach())) < 1e-12
    assert_grads_close(got, grads(model), 1e-12)
    assert all(g.abs().sum() > 0 for n, g in got.items() if n != "embed.meta"), "every parameter is trained"


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3])
def test_bptt_segments_changes_which_gradients_are_nonzero(k):
    # Segment s uses its own block of 20 token ids, so embedding-row gradients say which segments the gradient
    # reached. The loss is on the last of 4 segments only: it may reach back through k transitions.
    model = make("plain", bptt_segments=k)
    n, L = 4, 4
    tokens = torch.cat([torch.randint(20 * s, 20 * s + 20, (2, L)) for s in range(n)], 1)
    model(tokens).logits[:, -L:].sum().backward()
    rows = model.embed.tokens.weight.grad.abs().sum(-1)
    reached = [bool(rows[20 * s:20 * s + 20].sum() > 0) for s in range(n)]
    expect = [k < 0 or s >= n - 1 - k for s in range(n)]
    assert reached == expect
    assert bool(model.memory_init.grad.abs().sum() > 0) == (k < 0 or k >= n - 1)


def test_bptt_covering_every_transition_equals_full():
    tokens, targets = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    full, k3 = make("plain"), make("plain", bptt_segments=3)
    full(tokens, targets).loss.backward()
    k3(tokens, targets).loss.backward()
    assert_grads_close(grads(full), grads(k3), 1e-14)


@pytest.mark.parametrize("mode, k, T", [("plain", -1, 16), ("meta_window", -1, 14), ("meta_window", 1, 16),
                                        ("bottleneck", 0, 13), ("bottleneck_w2_global_pos", 2, 15)])
def test_memory_replay_gradients_equal_plain_bptt(mode, k, T):
    model = make(mode, bptt_segments=k)
    tokens, targets = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    loss = model(tokens, targets).loss
    loss.backward()
    ref = grads(model)
    model.zero_grad()
    replay_loss = model.replay_backward(tokens, targets)
    assert abs(float(replay_loss - loss.detach())) < 1e-12
    assert_grads_close(grads(model), ref, 1e-12)


def test_memory_replay_continues_a_state_and_the_flag_selects_it():
    model = make("meta_window", memory_replay=True)
    with torch.no_grad():
        state = model(torch.randint(0, V, (2, 6))).state  # one full segment + 2 pending tokens
    tokens, targets = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    loss = model(tokens, targets, state=state.detach()).loss
    loss.backward()
    ref = grads(model)
    model.zero_grad()
    assert abs(float(model.loss_and_backward(tokens, targets) - model(tokens, targets).loss.detach())) < 1e-12
    model.zero_grad()
    model.replay_backward(tokens, targets, state=state)
    assert_grads_close(grads(model), ref, 1e-12)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("pieces", [[8, 8], [4, 12], [3, 6, 1, 6]], ids=["aligned", "aligned2", "ragged"])
def test_chained_pieces_equal_one_pass(mode, pieces):
    model = make(mode)
    tokens = torch.randint(0, V, (2, sum(pieces)))
    with torch.no_grad():
        whole = model(tokens)
        state, logits = None, []
        for part in tokens.split(pieces, dim=1):
            out = model(part, state=state)
            logits.append(out.logits)
            state = out.state
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.memory, whole.state.memory, rtol=0, atol=1e-12)
    assert state.segments == whole.state.segments == sum(pieces) // 4


def test_generation_with_carried_memory_matches_recomputation():
    model = make("meta_window")
    prompt = torch.randint(0, V, (2, 5))
    generated, state = model.generate(prompt, 9)  # crosses three segment boundaries
    seq = prompt
    with torch.no_grad():
        for _ in range(9):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq)
    assert state.segments == 14 // 4 and state.pending.shape == (2, 14 % 4)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("t", [2, 9])
def test_causal_perturbing_the_future_leaves_the_past(mode, t):
    model = make(mode)
    tokens = torch.randint(0, V, (2, 17))
    changed = tokens.clone()
    changed[:, t + 1:] = (tokens[:, t + 1:] + 1 + torch.randint(0, V - 1, (2, 16 - t))) % V
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_write_memory_sees_the_whole_segment_in_windowed_layers():
    # window 1 everywhere: text sees only itself, so the first token of segment 0 reaches segment 1 only if
    # the write tokens attend to it.
    model = make("plain")
    model = build_model(dataclasses.replace(model.cfg, window=1)).double()
    tokens = torch.randint(0, V, (1, 8))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % V
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[0, 1:4], b[0, 1:4])  # same segment: out of every text window
    assert (a[0, 4:] - b[0, 4:]).abs().min() > 0  # every token of segment 1 hears it through memory


def test_bottleneck_text_sees_only_its_window_and_memory():
    model = make("bottleneck")  # bottleneck_window 1
    tokens = torch.randint(0, V, (1, 8))
    changed = tokens.clone()
    changed[0, 1] = (tokens[0, 1] + 1) % V
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[0, [0, 2, 3]], b[0, [0, 2, 3]])
    assert not torch.equal(a[0, 1], b[0, 1]) and (a[0, 4:] - b[0, 4:]).abs().min() > 0


def test_api_shapes_and_state():
    model = make("plain")
    out = model(torch.randint(0, V, (3, 10)))
    assert out[0] is out.logits and out.logits.shape == (3, 10, V) and out.loss is None
    assert isinstance(out.state, RMTState) and out.state.memory.shape == (3, 2, 16)
    assert out.state.pending.shape == (3, 2) and out.state.segments == 2
    assert out.state.memory.requires_grad and not out.state.detach().memory.requires_grad
    with pytest.raises(NotImplementedError, match="pipeline"):
        model.stages()


# ---- bad settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rmt, key", [
    (dict(num_memory=0), "model.rmt.num_memory"),
    (dict(segment_len=0), "model.rmt.segment_len"),
    (dict(segment_len=65), "model.rmt.segment_len"),  # longer than model.max_seq_len = 64
    (dict(bptt_segments=-2), "model.rmt.bptt_segments"),
    (dict(bottleneck=True, bottleneck_window=0), "model.rmt.bottleneck_window"),
    (dict(bottleneck=True, bottleneck_window=5), "model.rmt.bottleneck_window"),
    (dict(positions="absolute"), "model.rmt.positions"),
    (dict(curriculum=[[10, 1]]), "model.rmt.curriculum"),
    (dict(curriculum=[[0, 1], [5, 2], [5, 4]]), "model.rmt.curriculum"),
    (dict(curriculum=[[0, 0]]), "model.rmt.curriculum"),
    (dict(curriculum=[[0, 1, 2]]), "model.rmt.curriculum"),
    (dict(curriculum=[[0, 1], [9, 17]]), "model.rmt.curriculum"),  # 17 × 4 tokens > max_seq_len
])
def test_bad_settings_name_the_key(rmt, key):
    with pytest.raises(ModelConfigError) as info:
        build_model(rmt_cfg(rmt=rmt))
    assert key in str(info.value) and "\n" not in str(info.value)


def test_bad_settings_through_the_config_tree():
    from memtrain.train.config import load_config
    from memtrain.train.configtree import ConfigError
    with pytest.raises(ConfigError, match="model.rmt.num_memory"):
        load_config(None, ["model.memory=rmt", "model.rmt.num_memory=0"])
    cfg = load_config(None, ["model.memory=rmt", "model.rmt.curriculum=[[0, 1], [100, 2]]"])
    assert cfg.model.rmt.curriculum == [[0, 1], [100, 2]]


def test_bad_inputs_raise_value_error():
    model = make("plain")
    with pytest.raises(ValueError, match="shorter than one segment"):
        model(torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 3)))
    with pytest.raises(ValueError, match="shorter than one segment"):
        model.replay_backward(torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 3)))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 7)))
    state = model(torch.randint(0, V, (2, 5))).state
    with pytest.raises(ValueError, match="batch"):
        model(torch.randint(0, V, (3, 4)), state=state)
    with pytest.raises(ValueError, match="RMTState"):
        model(torch.randint(0, V, (2, 4)), state=(state.memory,))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
