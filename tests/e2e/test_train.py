"""`python -m memtrain.train` end to end on a tiny config: the loss falls, logs and checkpoints appear."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=2", "--set", "model.num_meta_tokens=4", "--set", "model.window=16",
        "--set", "model.global_layers=[-1]", "--set", "data.seq_len=64", "--set", "data.batch_size=8",
        "--set", "optim.lr=3e-3", "--set", "schedule.warmup_steps=5", "--set", "logging.every=5",
        "--set", "logging.progress=false", "--set", "device=cpu"]


def train(dataset: Path, run_dir: Path, *extra: str, steps: int = 60, launcher: list[str] | None = None):
    args = [*(launcher or [sys.executable]), "-m", "memtrain.train", "--config", "configs/demo.toml", *TINY,
            "--set", f"data.path=\"{dataset}\"", "--set", f"schedule.steps={steps}", "--run-dir", str(run_dir),
            *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_logs_and_checkpoints(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = train(tiny_dataset, run, "--set", "checkpoint.every=25", "--set", "checkpoint.keep=2")
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 61))
    first = sum(m["loss"] for m in metrics[:5]) / 5
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(512)=6.2: a clearly visible drop
    assert "checkpoint:" in proc.stdout and "run directory:" in proc.stdout  # the start banner, not the config
    assert "[model]" not in proc.stdout and "[model]" in (run / "config.toml").read_text()
    assert "Transformer Engine" not in proc.stderr  # third-party noise filtered (-v keeps it)
    assert (run / "config.toml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000050", "step_00000060"]  # every 25, keep 2, plus the final one

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= tags


def test_resume_continues_the_same_run(tiny_dataset, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_dataset, straight, steps=20)
    pieces = tmp_path / "pieces"
    train(tiny_dataset, pieces, "--set", "checkpoint.every=10", steps=20)
    # continue from step 10 in a fresh directory holding only that checkpoint
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (pieces / "checkpoints" / "step_00000010").rename(resumed / "checkpoints" / "step_00000010")
    train(tiny_dataset, resumed, "--resume", "auto", steps=20)
    a = [m["loss"] for m in read_metrics(straight)][10:]
    b = [m["loss"] for m in read_metrics(resumed)]
    assert a == b


RMT = ["--set", "model.memory=\"rmt\"", "--set", "model.rmt.segment_len=16", "--set", "model.rmt.num_memory=4"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"], ["parallel.cp=2"], ["parallel.pp=2", *RMT],
                                    ["parallel.tp=2 parallel.sequence_parallel=true"]],
                         ids=["tp2", "pp2", "cp2", "rmt-pp2", "tp2-sp"])
def test_model_parallel_run_matches_single_process(tiny_dataset, tmp_path, layout):
    """Tensor-, pipeline- or context-parallel training over 2 ranks follows the single-process run step by step
    (CP: each rank trains on half of every sequence, DeepSpeed averages gradients over DP × CP; RMT with PP: the
    RMT pipeline schedule, memory sent from the last stage back to the first; SP: 4 meta + 64 tokens, 34 rows per
    TP rank between the regions)."""
    parallel_set = [arg for setting in layout[0].split() for arg in ("--set", setting)]
    model_set = layout[1:]
    single = tmp_path / "single"
    train(tiny_dataset, single, *model_set, steps=8)
    parallel = tmp_path / "parallel"
    from tests.dist.spawn import free_port
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]
    train(tiny_dataset, parallel, *parallel_set, *model_set, steps=8, launcher=launcher)
    a, b = read_metrics(single), read_metrics(parallel)
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"]), (x, y)


def two_rank_resume_losses(dataset: Path, tmp_path: Path, *common: str) -> tuple[list[float], list[float], Path]:
    """Losses of steps 5-8 of an 8-step 2-rank run in one go, and of 4 steps + stop + resume + 4 more."""
    from tests.dist.spawn import free_port

    def launcher():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]

    straight = tmp_path / "straight"
    train(dataset, straight, *common, steps=8, launcher=launcher())
    first = tmp_path / "first"
    train(dataset, first, *common, "--set", "checkpoint.every=4", steps=8, launcher=launcher())
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "step_00000004").rename(resumed / "checkpoints" / "step_00000004")
    train(dataset, resumed, *common, "--resume", "auto", steps=8, launcher=launcher())
    return [m["loss"] for m in read_metrics(straight)][4:], [m["loss"] for m in read_metrics(resumed)], straight


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(1, "fp32"), (3, "fp32"), (0, "bf16")])
def test_deepspeed_dp2_exact_resume(tiny_dataset, tmp_path, zero, precision):
    """2n steps in one go == n steps, stop, resume, n more: identical losses at every step (DP = 2, ZeRO; bf16
    without ZeRO keeps an fp32 master per weight, whose moments the checkpoint must hold)."""
    from memtrain.train.config import cpu_supports_bf16
    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16")
    a, b, straight = two_rank_resume_losses(tiny_dataset, tmp_path, "--set", f"parallel.zero_stage={zero}",
                                            "--set", "data.batch_size=4", "--set", f'precision="{precision}"')
    assert json.loads((straight / "deepspeed.json").read_text())["zero_optimization"]["stage"] == zero
    assert a == b


@pytest.mark.slow
def test_rmt_pipeline_exact_resume(tiny_dataset, tmp_path):
    """RMT at PP = 2 (its own schedule): 8 steps in one go == 4 steps, stop, resume, 4 more, loss for loss."""
    a, b, _ = two_rank_resume_losses(tiny_dataset, tmp_path, "--set", "parallel.pp=2", "--set", "optim.grad_accum=2",
                                     "--set", "data.batch_size=4", *RMT)
    assert a == b


def test_memory_replay_with_accumulation_equals_plain_bptt(tiny_dataset, tmp_path):
    """Trainer.train_step with RMT memory replay and grad_accum = 2 updates the weights as plain BPTT does."""
    from memtrain.train.config import load_config
    from memtrain.train.trainer import Trainer

    def one_step(replay: bool):
        cfg = load_config(None, [
            "model.memory=\"rmt\"", "model.rmt.segment_len=16", "model.rmt.num_memory=2", "model.d_model=32",
            "model.n_layers=2", "model.n_heads=4", f"model.rmt.memory_replay={'true' if replay else 'false'}",
            f"data.path=\"{tiny_dataset}\"", "data.seq_len=48", "data.batch_size=2", "optim.grad_accum=2",
            "optim.lr=1e-3", "schedule.warmup_steps=0", "schedule.steps=1", "parallel.engine=\"torch\"",
            "device=\"cpu\"", "logging.progress=false"])
        trainer = Trainer(cfg, tmp_path / f"replay_{replay}")
        stream = iter(trainer.stream)
        loss, norm = trainer.train_step([next(stream), next(stream)])
        return loss, norm, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    loss_a, norm_a, weights_a = one_step(replay=False)
    loss_b, norm_b, weights_b = one_step(replay=True)
    assert abs(loss_a - loss_b) < 1e-5 and abs(norm_a - norm_b) < 1e-5 * norm_a
    for name, w in weights_a.items():
        assert float((w - weights_b[name]).abs().max()) < 1e-6, name


def test_wandb_offline_logs_the_tensorboard_scalars(tiny_dataset, tmp_path):
    """`logging.wandb = true` in offline mode (no network): a W&B run in RUN_DIR/wandb with the same tags."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    train(tiny_dataset, run, "--set", "logging.wandb=true", "--set", 'logging.wandb_mode="offline"', "--set",
          "logging.every=1", steps=3)
    (datastore,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = datastore.read_bytes()
    for tag in (b"train/loss", b"train/lr", b"train/grad_norm", b"train/tokens_per_s", b"train/mfu"):
        assert tag in records, tag
    assert (run / "wandb_id").read_text().strip() in datastore.name
