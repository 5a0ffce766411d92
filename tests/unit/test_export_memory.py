"""The exported modeling code of the memory models (RMT, Titans LMM / MAC / MAG / MAL) against the native model,
in process with random weights: logits, feeding tokens one by one through the cache, left padding, generate().

Sequences are longer than several RMT segments, MAC segments and memory chunks, and start / end mid-chunk.
"""
from __future__ import annotations

import pytest
import torch

from memtrain.model import ModelConfig, build_model
from memtrain.model.memory.rmt.config import RMTConfig
from memtrain.model.memory.titans.config import TitansConfig
from memtrain.train.config import Config
from memtrain.train.hf import convert
from memtrain.train.hf.configuration_memtrain import MemtrainConfig
from memtrain.train.hf.modeling_memtrain import MemtrainForCausalLM

TITANS = dict(segment_len=8, chunk_size=4, memory_heads=2, conv_size=3)
DEEP = dict(memory_depth=2, theta_init=0.01)  # a deep memory with a large step size diverges at random init
CASES = {
    # RMT with meta tokens, a windowed and a global layer, GQA, tied
    "rmt": dict(memory="rmt", num_meta_tokens=2, window=5, global_layers=[-1], n_kv_heads=2, tie_embeddings=True,
                rmt=RMTConfig(segment_len=8, num_memory=3)),
    # MemBottleneck mode, global positions, no meta tokens, untied
    "rmt_bottleneck": dict(memory="rmt", rmt=RMTConfig(segment_len=6, num_memory=2, bottleneck=True,
                                                       bottleneck_window=3, positions="global")),
    "lmm": dict(memory="lmm", num_meta_tokens=2, titans=TitansConfig(**TITANS)),
    "mac": dict(memory="mac", num_meta_tokens=2, n_kv_heads=2, titans=TitansConfig(**TITANS)),
    "mac_deep": dict(memory="mac", titans=TitansConfig(**{**TITANS, **DEEP, "conv_size": 0})),
    "mag_deep": dict(memory="mag", num_meta_tokens=2, window=6,
                     titans=TitansConfig(**{**TITANS, **DEEP, "memory_expansion": 1.5})),
    "mal": dict(memory="mal", window=6, global_layers=[-1], tie_embeddings=True, titans=TitansConfig(**TITANS)),
    # θ, η bounded (model.titans.theta_max / eta_max): the export must scale its gates alike
    "mag_bounded": dict(memory="mag", window=6, titans=TitansConfig(**TITANS, theta_max=0.01, eta_max=0.95)),
    "mal_deep_silu": dict(memory="mal", num_meta_tokens=1,
                          titans=TitansConfig(**{**TITANS, **DEEP, "memory_depth": 3, "memory_act": "silu"})),
}
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny ops: one thread is ~50x faster than contended intra-op threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# fp64 makes the comparison exact (the two sides differ only in summation order): random models with a large init
# amplify fp32 rounding through the recurrent memory, and the deep memory diverges (NaN, natively) above ~0.1.
STD = {"mac_deep": 0.1, "mag_deep": 0.1, "mal_deep_silu": 0.1}


def make(case: str, init_std: float | None = None, dtype: torch.dtype = torch.float64):
    """A random native model and its conversion to the HF class (loaded strictly), in `dtype`."""
    init_std = init_std or STD.get(case, 0.3)
    m = ModelConfig(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                    max_seq_len=128, init_std=init_std, **CASES[case])
    torch.manual_seed(0)
    native = build_model(m).eval()
    state = {k: v.detach() for k, v in native.state_dict().items()}
    conf = convert.hf_config(Config(model=m), step=0, source="test", dtype="float32", special_ids=SPECIAL)
    hf = MemtrainForCausalLM(MemtrainConfig(**{k: v for k, v in conf.items() if k != "auto_map"})).eval()
    missing, unexpected = hf.load_state_dict(convert.native_to_hf(state, m), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if m.tie_embeddings else set())
    return native.to(dtype), hf.to(dtype), m


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_native(case):
    ids = torch.randint(0, 100, (3, 37), generator=torch.Generator().manual_seed(1))
    for dtype, std, tol in ((torch.float64, None, 1e-10), (torch.float32, 0.1, 1e-4)):
        native, hf, m = make(case, std, dtype)
        with torch.no_grad():
            ref = native(ids).logits
            diff = (ref - hf(ids, use_cache=False).logits).abs().max().item()
        print(f"{case} {dtype}: max |logits native - HF| = {diff:.3g} (max |logit| {ref.abs().max().item():.3g})")
        assert diff <= tol, diff


@pytest.mark.parametrize("case", CASES)
def test_cached_pieces_equal_full_forward(case):
    """Prefill 7 tokens, then pieces of 1, 3 and 1 tokens...: the cache carries memory and keys exactly."""
    _, hf, m = make(case)
    ids = torch.randint(0, m.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        out = hf(ids[:, :7], use_cache=True)
        steps, cache, t = [out.logits], out.past_key_values, 7
        for n in [1, 3] * 20:
            if t >= 30:
                break
            out = hf(ids[:, t:t + n], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            t += n
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-10
    assert cache.memtrain_seen == [30, 30]


@pytest.mark.parametrize("case", ["rmt", "mac", "mag_deep", "mal"])
def test_left_padded_batch_equals_rows_alone(case):
    """Pad tokens never enter memory or attention: logits and greedy generations of a left-padded batch are
    those of each prompt alone."""
    _, hf, m = make(case)
    prompts = [torch.randint(4, m.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 4, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), 3)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=3)
    with torch.no_grad():
        batched_logits = hf(ids, attention_mask=mask, use_cache=False).logits
    batched = hf.generate(ids, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone_logits = hf(p[None], use_cache=False).logits[0]
        assert (batched_logits[i, width - len(p):] - alone_logits).abs().max().item() <= 1e-10
        alone = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[0, len(p):]
        assert torch.equal(batched[i], alone)
    assert len(set(batched.flatten().tolist())) > 5  # not a degenerate repetition: the test can see errors


@pytest.mark.parametrize("case", ["rmt", "mac", "mal_deep_silu"])
def test_generate_equals_native_generate(case):
    """HF generate() with its cache (memory carried step to step) == the native model's own stateful greedy loop."""
    native, hf, m = make(case)
    prompt = torch.randint(4, m.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    ref, _ = native.generate(prompt, 25)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False,
                      eos_token_id=None, pad_token_id=3)
    assert torch.equal(out, ref)
    assert len(set(ref[:, 11:].flatten().tolist())) > 8  # diverse tokens: a wrong memory would show


@pytest.mark.parametrize("case", CASES)
def test_native_shapes_and_round_trip(case):
    native, _, m = make(case)
    state = {k: v.detach().clone() for k, v in native.state_dict().items()}
    assert convert.native_shapes(m) == {k: tuple(v.shape) for k, v in state.items()}
    state["embed.tokens.weight"][m.vocab_size:] = 0  # padding rows come back as zeros
    if "head.proj.weight" in state:
        state["head.proj.weight"][m.vocab_size:] = 0
    back = convert.hf_to_native(convert.native_to_hf(state, m), m)
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)


@pytest.mark.parametrize("case", ["rmt", "mag_deep"])
def test_beam_search_with_the_cache_equals_recomputation(case):
    """Beam search reorders the per-row memory states with the beams: same result as recomputing every step."""
    _, hf, m = make(case)
    prompt = torch.randint(4, m.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, num_beams=3,
              eos_token_id=None, pad_token_id=3)
    assert torch.equal(hf.generate(prompt, **kw), hf.generate(prompt, use_cache=False, **kw))
