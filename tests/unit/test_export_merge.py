"""Merging checkpoint shards (memtrain/train/hf/merge.py) on fabricated layouts: pipeline stages x tensor parallel x data
parallel, the tied embedding on two stages, and the refusals. The real PP = 2 / TP = 2 runs are in
tests/e2e/test_export.py (slow)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from memtrain.model import ModelConfig, build_model
from memtrain.train.config import Config
from memtrain.train.hf import ExportError, merge

M = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, num_meta_tokens=2,
                tie_embeddings=True)
# the stages of a 2-stage pipeline as PipelineEngine.model_state() names them; the tied embedding on both
STAGES = [lambda n: n.startswith(("embed.", "blocks.0.")),
          lambda n: n.startswith(("blocks.1.", "head.", "embed.tokens"))]
SPLIT = {"blocks.0.attn.qkv.weight": 0, "blocks.1.attn.qkv.weight": 0, "blocks.0.mlp.down.weight": 1,
         "blocks.1.mlp.down.weight": 1}


def fake_layout(root: Path, *, tp: int, dp: int, pp: int, tamper=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint directory of world tp*dp*pp rank files (tp fastest, then dp, then pp) of one random model."""
    torch.manual_seed(0)
    full = {k: v.detach().clone() for k, v in build_model(M).state_dict().items()}
    ckpt = root / "step_00000001"
    ckpt.mkdir(parents=True)
    world = tp * dp * pp
    meta = {"config": dataclasses.asdict(Config(model=M)), "format": "memtrain-checkpoint-v1",
            "layout": {"world": world, "rank": 0, "tp": tp, "dp": dp, "tp_rank": 0, "dp_rank": 0, "pp": pp,
                       "pp_rank": 0},
            "partition_dims": {n: SPLIT.get(n) for n in full}}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    for rank in range(world):
        tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        keep = STAGES[pp_rank] if pp > 1 else (lambda n: True)
        state = {n: (t.chunk(tp, dim=SPLIT[n])[tp_rank] if n in SPLIT else t).clone()
                 for n, t in full.items() if keep(n)}
        if tamper:
            tamper(rank, state)
        torch.save({"model": state, "step": 1}, ckpt / f"rank{rank:05d}.pt")
    return ckpt, full


@pytest.mark.parametrize("tp, dp, pp", [(1, 1, 2), (2, 1, 2), (2, 2, 2), (2, 2, 1)])
def test_merge_is_the_union_of_the_stages_tp_merged(tmp_path, tp, dp, pp):
    ckpt, full = fake_layout(tmp_path, tp=tp, dp=dp, pp=pp)
    assert merge.model_shard_ranks(merge.read_meta(ckpt)["layout"]) == \
        [[s * dp * tp + t for t in range(tp)] for s in range(pp)]
    merged = merge.merge_model_state(ckpt, merge.read_meta(ckpt))
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)


def test_tied_embedding_differing_between_stages_is_refused(tmp_path):
    def tamper(rank, state):
        if rank == 1:  # the last stage's copy of the tied embedding
            state["embed.tokens.weight"][0, 0] += 1
    ckpt, _ = fake_layout(tmp_path, tp=1, dp=1, pp=2, tamper=tamper)
    with pytest.raises(ExportError, match="embed.tokens.weight differs between pipeline stages"):
        merge.merge_model_state(ckpt, merge.read_meta(ckpt))


def test_missing_stage_file_and_bad_layout_are_refused(tmp_path):
    ckpt, _ = fake_layout(tmp_path, tp=2, dp=1, pp=2)
    (ckpt / "rank00003.pt").unlink()
    with pytest.raises(ExportError, match="incomplete: 1 of 4 rank files missing"):
        merge.merge_model_state(ckpt, merge.read_meta(ckpt))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["layout"]["pp"] = 3
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="does not multiply"):
        merge.read_meta(ckpt)
