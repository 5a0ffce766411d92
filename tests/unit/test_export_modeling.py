"""The exported modeling code against the native model, in process and without training (random weights).

Covers what end-to-end tests with barely trained models cannot probe well: fp32 logits across layouts (meta
tokens, windows, GQA, tied/untied, vocabulary padding), the KV cache with the meta-token prefix and sliding-window
layers past the window, left padding, and the name/shape mapping in memtrain/train/hf/convert.py.
"""
from __future__ import annotations

import pytest
import torch

from memtrain.model import ModelConfig, build_model
from memtrain.train.config import Config
from memtrain.train.hf import convert
from memtrain.train.hf.configuration_memtrain import MemtrainConfig
from memtrain.train.hf.modeling_memtrain import MemtrainForCausalLM

CASES = {
    # meta tokens, windowed + global layers, GQA, tied, vocabulary padding (100 -> 128)
    "meta_window_gqa_tied": dict(num_meta_tokens=3, window=8, global_layers=[-1], n_kv_heads=2, tie_embeddings=True),
    # the plain baseline: no meta tokens, all global, MHA, untied
    "baseline_untied": dict(num_meta_tokens=0, window=0, n_kv_heads=0, tie_embeddings=False),
    # windows without meta tokens, a multi-query layout (one kv head)
    "window_mqa": dict(num_meta_tokens=0, window=5, n_kv_heads=1),
}
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def make(case: str) -> tuple[torch.nn.Module, MemtrainForCausalLM, ModelConfig]:
    """A random native model (larger init std: diverse greedy tokens) and its conversion to the HF class."""
    m = ModelConfig(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=3, n_heads=4, ffn_hidden=48,
                    max_seq_len=128, init_std=0.3, **CASES[case])
    torch.manual_seed(0)
    native = build_model(m).eval()
    state = {k: v.detach() for k, v in native.state_dict().items()}
    hf_state = convert.native_to_hf(state, m)
    conf = convert.hf_config(Config(model=m), step=0, source="test", dtype="float32", special_ids=SPECIAL)
    hf = MemtrainForCausalLM(MemtrainConfig(**{k: v for k, v in conf.items() if k != "auto_map"})).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if m.tie_embeddings else set())
    if m.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return native, hf, m


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_native(case):
    native, hf, m = make(case)
    ids = torch.randint(0, m.vocab_size, (3, 40))
    with torch.no_grad():
        ref = native(ids).logits
        diff = (ref - hf(ids, use_cache=False).logits).abs().max().item()
    print(f"{case}: max |logits native - HF| = {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_equals_full_forward(case):
    """Prefill 7 tokens, then feed 30 one by one through the cache (well past the window of 5 or 8)."""
    _, hf, m = make(case)
    ids = torch.randint(0, m.vocab_size, (2, 37))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        out = hf(ids[:, :7], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(7, 37):
            out = hf(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    if m.num_meta_tokens:  # the meta tokens sit in the cache as a per-layer prefix shared by the batch
        assert len(cache.memtrain_prefix) == m.n_layers
        assert cache.memtrain_prefix[0][0].shape == (1, m.kv_heads, m.num_meta_tokens, m.head_dim)
    assert cache.get_seq_length() == 37  # text tokens only: what generate() relies on
    if m.window:  # windowed layers keep at most window - 1 keys (transformers' sliding-window cache layers)
        assert cache.layers[0].keys.shape[2] <= m.window - 1


@pytest.mark.parametrize("case", CASES)
def test_left_padding_changes_nothing(case):
    _, hf, m = make(case)
    rows = [torch.randint(4, m.vocab_size, (n,)) for n in (12, 5, 9)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 3)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with torch.no_grad():
        batched = hf(ids, attention_mask=mask, use_cache=False).logits
        for i, r in enumerate(rows):
            alone = hf(r[None], use_cache=False).logits[0]
            assert (batched[i, width - len(r):] - alone).abs().max().item() <= 1e-4


def test_generate_left_padded_batch_equals_single_rows():
    _, hf, m = make("meta_window_gqa_tied")
    prompts = [torch.randint(4, m.vocab_size, (n,)) for n in (6, 2, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), 3)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=3)
    batched = hf.generate(ids, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[0, len(p):]
        assert torch.equal(batched[i], alone)
    assert len(set(batched.flatten().tolist())) > 5  # not a degenerate repetition: the test can see errors


@pytest.mark.parametrize("overrides", [CASES["meta_window_gqa_tied"], CASES["baseline_untied"],
                                       dict(n_heads=8, n_kv_heads=2, num_meta_tokens=2)])
def test_native_shapes_match_the_model(overrides):
    m = ModelConfig(vocab_size=90, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    for k, v in overrides.items():
        setattr(m, k, v)
    want = {k: tuple(v.shape) for k, v in build_model(m).state_dict().items()}
    assert convert.native_shapes(m) == want


def test_qkv_split_and_vocab_trim_round_trip():
    native, _, m = make("meta_window_gqa_tied")
    state = {k: v.detach().clone() for k, v in native.state_dict().items()}
    state["embed.tokens.weight"][m.vocab_size:] = 0  # padding rows come back as zeros
    back = convert.hf_to_native(convert.native_to_hf(state, m), m)
    assert state.keys() == back.keys()
    assert all(torch.equal(state[k], back[k]) for k in state)
    hf_state = convert.native_to_hf(state, m)
    assert hf_state["model.embed_tokens.weight"].shape == (m.vocab_size, m.d_model)
    # query head h must read kv head h // G: head 1's key rows are fused rows [(G+2)*Dh + G*Dh, ...)
    G, Dh = m.n_heads // m.kv_heads, m.head_dim
    k1 = state["blocks.0.attn.qkv.weight"][(G + 2) * Dh + G * Dh:(G + 2) * Dh + (G + 1) * Dh]
    assert torch.equal(hf_state["model.layers.0.self_attn.k_proj.weight"][Dh:2 * Dh], k1)
