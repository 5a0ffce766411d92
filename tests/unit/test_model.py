"""The decoder LM: shapes, meta tokens, causality, windowed layers, input errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memtrain.model import ModelConfig, build_model


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                attention_backend="reference")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("P", [0, 1, 5])
@pytest.mark.parametrize("tied", [False, True])
def test_shapes_and_output_api(P, tied):
    model = build_model(tiny(num_meta_tokens=P, tie_embeddings=tied))
    tokens = torch.randint(0, 97, (2, 11))
    out = model(tokens)
    assert out.logits.shape == (2, 11, 97) and out[0] is out.logits and out.loss is None
    out = model(tokens, tokens)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny(tie_embeddings=True))
    names = [n for n, _ in model.named_parameters()]
    assert "embed.tokens.weight" in names and not any(n.startswith("head.proj") for n in names)
    untied = build_model(tiny())
    assert untied.num_params() - model.num_params() == model.embed.tokens.weight.numel()


@pytest.mark.parametrize("kw", [dict(), dict(num_meta_tokens=4, window=3, global_layers=[1])])
def test_causal_perturbing_the_future_leaves_the_past(kw):
    model = build_model(tiny(**kw)).double()
    tokens = torch.randint(0, 97, (2, 20))
    t = 9
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_meta_tokens_are_seen_by_every_query_in_windowed_layers():
    # window 1: a text token sees only itself and the meta tokens; the last logits still depend on them
    model = build_model(tiny(num_meta_tokens=2, window=1, n_layers=2)).double()
    tokens = torch.randint(0, 97, (1, 30))
    model(tokens).logits[0, -1].sum().backward()
    assert model.embed.meta.grad.abs().sum() > 0


def test_window_limits_what_a_token_sees():
    # two windowed layers of window 2: receptive field 3 tokens; token 10 cannot see token 0
    model = build_model(tiny(window=2, n_layers=2)).double()
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 97
    a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[0, 10], b[0, 10])
    assert not torch.equal(a[0, 2], b[0, 2])


def test_global_layers_override_the_window():
    cfg = tiny(window=4, n_layers=4, global_layers=[0, -1])
    assert [cfg.layer_window(i) for i in range(4)] == [None, 4, 4, None]


def test_zero_meta_tokens_is_the_plain_baseline():
    model = build_model(tiny())
    assert model.embed.meta is None


@pytest.mark.parametrize("tokens, match", [
    (torch.tensor([[1, 2, 97]]), "token ids"),
    (torch.tensor([[-1, 2]]), "token ids"),
    (torch.zeros(0, 5, dtype=torch.long), "empty"),
    (torch.zeros(2, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 65, dtype=torch.long), "max_seq_len"),
    (torch.zeros(5, dtype=torch.long), r"\[B, T\]"),
])
def test_bad_inputs_raise_value_error(tokens, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny())(tokens)


def test_padding_rows_never_take_probability_mass():
    cfg = tiny(vocab_size=50, vocab_pad_multiple=64)
    model = build_model(cfg)
    logits = model.head(model.embed(torch.randint(0, 50, (1, 4))))
    assert logits.shape[-1] == 64
    assert torch.softmax(logits.float(), -1)[..., 50:].max() == 0


def test_attention_backends_agree_inside_the_model():
    cfg = tiny(num_meta_tokens=3, window=5, global_layers=[0])
    ref = build_model(cfg).double()
    fast = build_model(dataclasses.replace(cfg, attention_backend="sdpa")).double()
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 97, (2, 33))
    torch.testing.assert_close(fast(tokens).logits, ref(tokens).logits, rtol=0, atol=1e-10)
