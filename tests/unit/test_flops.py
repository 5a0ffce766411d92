"""FLOP counting for MFU: the formula of docs/architecture.md#measuring on a model whose numbers are easy to count by hand."""
from __future__ import annotations

import torch

from memtrain.model import ModelConfig, build_model
from memtrain.train.flops import flops_per_token, matmul_weights, peak_flops


def test_matmul_weights_and_flops_by_hand():
    cfg = ModelConfig(vocab_size=128, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, num_meta_tokens=3, window=8, global_layers=[0], attention_backend="reference")
    model = build_model(cfg)
    per_layer = 32 * (2 * (4 // 2 + 2) * 8) + 32 * 32 + 3 * 32 * 64  # qkv (2 groups of 4 heads) + out + mlp
    head = 32 * 128
    assert matmul_weights(model) == 2 * per_layer + head  # untied: the embedding lookup is no matmul
    T = 100
    attention = 6 * 4 * 16 * (T + 3) + 6 * 4 * 16 * (8 + 3)  # layer 0 global, layer 1 window 8; + meta tokens
    assert flops_per_token(model, T) == 6 * (2 * per_layer + head) + attention


def test_tied_head_counts_the_shared_matrix_once():
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=4, ffn_hidden=64, tie_embeddings=True)
    assert matmul_weights(build_model(cfg)) == 32 * (3 * 32) + 32 * 32 + 3 * 32 * 64 + 128 * 32


def test_peak_override_and_measured_rate():
    assert peak_flops(torch.device("cpu"), 2.5) == (2.5e12, "logging.peak_tflops")
    rate, source = peak_flops(torch.device("cpu"))
    assert rate > 1e8 and "measured" in source


def test_memory_models_count_their_extra_work():
    base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, num_meta_tokens=2,
                attention_backend="reference")
    plain = build_model(ModelConfig(**base))
    T = 64
    from memtrain.model.memory.rmt.config import RMTConfig
    rmt = build_model(ModelConfig(**base, memory="rmt", rmt=RMTConfig(segment_len=16, num_memory=3)))
    per_pos = 6 * matmul_weights(rmt) + 2 * 6 * 4 * 16 * (2 + 2 * 3 + 16)
    assert flops_per_token(rmt, T) == per_pos * (2 + 2 * 3 + 16) / 16

    lmm = build_model(ModelConfig(**base, memory="lmm"))
    t = lmm.cfg.titans
    dh = t.head_dim(32)
    memory = 3 * 2 * t.memory_heads * (8 * dh * dh + 4 * t.chunk_size * dh)  # linear memory (depth 1)
    assert flops_per_token(lmm, T) == 6 * matmul_weights(lmm) + memory  # no attention in LMM blocks
    assert flops_per_token(plain, T) == 6 * matmul_weights(plain) + 2 * 6 * 4 * 16 * (T + 2)
