"""memtrain/train/memory_stats.py: gate statistics per layer over the text tokens only, collected only while active."""
from __future__ import annotations

import pytest
import torch

from memtrain.model import ModelConfig, build_model
from memtrain.model.memory.titans.config import TitansConfig
from memtrain.train.memory_stats import GateStats


def _model(memory: str, meta: int = 2):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=32,
                      num_meta_tokens=meta, window=4, global_layers=[-1], memory=memory,
                      attention_backend="reference", titans=TitansConfig(segment_len=5, chunk_size=4, memory_heads=2,
                                                                         conv_size=2))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # gates that differ along the text, so a wrong token set changes the numbers
        for block in model.blocks:
            block.memory.gates.weight.normal_(0, 0.5)
    return model


def _layer0_reference(model, ids) -> dict[str, float]:
    """Gate statistics of block 0 computed by hand: its memory reads the normalised embeddings' text positions."""
    block, P = model.blocks[0], model.cfg.num_meta_tokens
    norm = block.attn_norm if block.kind == "mag" else block.mem_norm
    with torch.no_grad():
        g = torch.sigmoid(block.memory.gates(norm(model.embed(ids))[:, P:])).reshape(-1, 3)
    out = {}
    for j, name in enumerate(("theta", "eta", "alpha")):
        out.update({f"{name}_mean": float(g[:, j].mean()), f"{name}_min": float(g[:, j].min()),
                    f"{name}_max": float(g[:, j].max())})
    return out


@pytest.mark.parametrize("memory, meta", [("mac", 2), ("mal", 2), ("mag", 0), ("lmm", 2)])
def test_statistics_cover_the_text_tokens_only(memory, meta):
    model = _model(memory, meta)
    B, T = 2, 13  # MAC: segments of 5 (5 + 5 + 3), every one counted
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    stats = GateStats.attach(model)
    model(ids)  # inactive: nothing recorded
    assert stats.collect() == {}
    stats.active = True
    with torch.no_grad():
        model(ids)
    heads = model.blocks[0].memory.heads
    assert [layer.count for layer in stats.layers] == [B * T * heads] * 2  # no meta positions
    got = stats.collect()
    assert not stats.active and stats.collect() == {}  # collect resets
    assert len(got) == 2 * 3 * 3 and all(0.0 < v < 1.0 for v in got.values())
    for i in range(2):
        for name in ("theta", "eta", "alpha"):
            assert got[f"memory/layer{i}/{name}_min"] <= got[f"memory/layer{i}/{name}_mean"] \
                <= got[f"memory/layer{i}/{name}_max"]
            assert got[f"memory/layer{i}/{name}_min"] < got[f"memory/layer{i}/{name}_max"]  # varies along text
    if memory != "mac":  # the MAC memory reads attention outputs: no hand reference for it
        for key, want in _layer0_reference(model, ids).items():
            assert abs(got[f"memory/layer0/{key}"] - want) < 1e-6, key
    stats.remove()
    stats.active = True
    model(ids)
    assert stats.collect() == {}


def test_statistics_accumulate_over_micro_batches():
    model = _model("mal")
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(2))
    stats = GateStats.attach(model)
    stats.active = True
    model(ids[:2]).logits.sum().backward()  # a training forward pass, gradients and all
    model(ids[2:])
    got = stats.collect()
    for key, want in _layer0_reference(model, ids).items():
        assert abs(got[f"memory/layer0/{key}"] - want) < 1e-6, key


def test_models_without_titans_memory_get_none():
    assert GateStats.attach(build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4))) is None
