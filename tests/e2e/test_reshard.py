"""A checkpoint saved at one layout resumes at another (docs/distributed.md, "Checkpoints").

For the baseline, MAC and RMT: 4 steps at each source layout, saving at step 2; then the step-2 checkpoint resumed
at a target layout, saved again at once, and trained to step 4. Checked: every weight and AdamW moment the target
saves equals the source's bit for bit (loaded, resharded, written back), and the target's losses at steps 3-4 equal
the uninterrupted single-process run's (the global batch is the same everywhere: 8 sequences = batch 2 x dp x
grad_accum). Ranks are real gloo processes; one spawn per layout runs all three kinds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist.spawn import run_ranks

COMMON = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.num_meta_tokens=4",
          "model.window=16", "model.global_layers=[-1]", "data.seq_len=32", "data.batch_size=2", "optim.lr=3e-3",
          "schedule.warmup_steps=2", "schedule.steps=4", "logging.every=1", "logging.progress=false",
          'device="cpu"', "checkpoint.keep=5"]
KINDS = {
    "baseline": [],
    "mac": ['model.memory="mac"', "model.titans.segment_len=16", "model.titans.chunk_size=8",
            "model.titans.memory_heads=2"],
    "rmt": ['model.memory="rmt"', "model.rmt.segment_len=16", "model.rmt.num_memory=4"],
    # two data lanes: each DP rank knows only its lane's cursor, so the saved stream state is a merge over ranks
    "lanes": ["data.lanes=2"],
}
LANE_LAYOUTS = {"dp1", "dp2"}  # the data lanes matter where the DP size changes; other layouts skip the kind
GLOBAL_BATCH = 4  # micro-batches of 2 sequences per step over all data-parallel ranks
LAYOUTS = {  # name: (world size, parallel settings)
    "dp1": (1, []),
    "dp2": (2, ["parallel.zero_stage=1"]),
    "dp4": (4, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}
MOVES = [("dp2", "dp1"), ("dp1", "dp2"), ("tp2", "dp1"), ("pp2", "dp1"), ("tp2pp2", "dp4")]


def _kinds(*layouts: str) -> list[str]:
    return [k for k in KINDS if k != "lanes" or set(layouts) <= LANE_LAYOUTS]


CASES = [(kind, move) for move in MOVES for kind in _kinds(*move)]


def _config(dataset: Path, kind: str, layout: str):
    from memtrain.train.config import load_config
    world, parallel = LAYOUTS[layout]
    dp = world // (2 if "tp2" in layout else 1) // (2 if "pp2" in layout else 1)
    if kind == "lanes":
        dataset = _sharded(dataset)
    overrides = [*COMMON, *KINDS[kind], *parallel, f'data.path="{dataset}"', f"optim.grad_accum={GLOBAL_BATCH // dp}"]
    if kind == "rmt" and layout == "dp2":
        overrides.remove("parallel.zero_stage=1")  # the RMT's own backward refuses ZeRO (docs/rmt.md)
    return load_config(None, overrides)


def _sharded(dataset: Path) -> Path:
    """The same text prepared into several train shards (the shared tiny dataset has one; a lane needs one)."""
    return dataset.with_name(dataset.name + "_sharded")


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _source(rank: int, world: int, dataset: str, root: str, layout: str) -> dict:
    """4 steps of every kind at `layout`, with a checkpoint at step 2."""
    from memtrain.train.trainer import Trainer
    out = {}
    for kind in _kinds(layout):
        cfg = _config(Path(dataset), kind, layout)
        cfg.checkpoint.every = 2
        run = Path(root) / f"{kind}-{layout}"
        Trainer(cfg, run).fit()
        out[kind] = _losses(run) if rank == 0 else None
    return out


def _target(rank: int, world: int, dataset: str, root: str, layout: str, sources: list[str]) -> dict:
    """Every kind resumed from each source's step-2 checkpoint at `layout`: saved again at once, then 2 more steps."""
    import torch.distributed as dist

    from memtrain.train.trainer import Trainer
    out = {}
    for kind in _kinds(layout):
        for source in [s for s in sources if kind in _kinds(s)]:
            run = Path(root) / f"{kind}-{source}-to-{layout}"
            if rank == 0:
                shutil.copytree(Path(root) / f"{kind}-{source}" / "checkpoints" / "step_00000002",
                                run / "checkpoints" / "step_00000002")
            dist.barrier()
            trainer = Trainer(_config(Path(dataset), kind, layout), run, resume="auto")
            trainer.save()  # the state as loaded, at this layout
            trainer.fit()
            out[kind, source] = _losses(run) if rank == 0 else None
    return out


def _saved(ckpt: Path) -> dict[str, torch.Tensor]:
    from memtrain.train.sharded import read_all
    return read_all(ckpt / "state")


@pytest.fixture(scope="module")
def reshard_runs(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    subprocess.run([sys.executable, "-m", "memtrain.data.prepare", "--source", "stdlib", "--max-files", "40",
                    "--vocab-size", "512", "--out", str(_sharded(tiny_dataset)), "--quiet", "--val-every", "10",
                    "--shard-tokens", "20000"], check=True, timeout=900)
    losses = {}
    for layout in sorted({a for a, _ in MOVES}):
        world = LAYOUTS[layout][0]
        losses[layout] = run_ranks(_source, world, str(tiny_dataset), str(root), layout)[0]
    resumed = {}
    for target in sorted({b for _, b in MOVES}):
        sources = [a for a, b in MOVES if b == target]
        resumed.update({(kind, source, target): v for (kind, source), v in
                        run_ranks(_target, LAYOUTS[target][0], str(tiny_dataset), str(root), target, sources)[0].items()})
    return root, losses, resumed


@pytest.mark.slow
@pytest.mark.parametrize("kind,move", CASES, ids=[f"{k}-{a}-to-{b}" for k, (a, b) in CASES])
def test_checkpoint_resumes_at_another_layout(reshard_runs, kind, move):
    root, losses, resumed = reshard_runs
    source, target = move
    saved = _saved(root / f"{kind}-{source}" / "checkpoints" / "step_00000002")
    again = _saved(root / f"{kind}-{source}-to-{target}" / "checkpoints" / "step_00000002")
    assert set(saved) == set(again)
    assert any(name.startswith("optim.exp_avg_sq.") for name in saved)
    for name in saved:
        assert torch.equal(saved[name], again[name]), name
    reference = losses["dp1"][kind]  # the uninterrupted single-process run
    after = resumed[kind, source, target]  # steps 3 and 4: the resumed run's own metrics start after step 2
    assert len(after) == 2 and len(reference) == 4
    for got, want in zip(after, reference[2:]):
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (after, reference)
