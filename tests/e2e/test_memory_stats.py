"""`python -m memtrain.train` on a tiny Titans MAC model logs the memory gates' statistics (memtrain/train/memory_stats.py)."""
from __future__ import annotations

from tests.e2e.test_train import read_metrics, train


def test_titans_run_logs_gate_statistics(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_dataset, run, "--set", "model.memory=\"mac\"", "--set", "model.titans.segment_len=32",
          "--set", "model.titans.chunk_size=16", "--set", "logging.every=2", "--set", "data.batch_size=2", steps=5)
    tags = [f"memory/layer{i}/{gate}_{stat}" for i in range(2) for gate in ("theta", "eta", "alpha")
            for stat in ("mean", "min", "max")]
    metrics = read_metrics(run)
    logged = [m["step"] for m in metrics if tags[0] in m]
    assert logged == [2, 4, 5], logged  # every logging.every steps and the last one, not in between
    for m in metrics:
        if m["step"] in logged:
            assert all(0.0 < m[t] < 1.0 for t in tags), m
            assert m["memory/layer1/alpha_min"] <= m["memory/layer1/alpha_mean"] <= m["memory/layer1/alpha_max"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert set(tags) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("memory/layer0/theta_mean")] == [2, 4, 5]
