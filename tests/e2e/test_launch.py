"""The launchers: DeepSpeed's runner through memtrain/launch/run.sh, two nodes on one machine, and a rank that dies."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.spawn import free_port
from tests.e2e.test_train import TINY, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RUN = [str(ROOT / "memtrain" / "launch" / "run.sh")]


def train_args(dataset: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "configs/demo.toml", *TINY, "--set", f"data.path=\"{dataset}\"", "--set", "data.batch_size=4",
            "--set", f"schedule.steps={steps}", "--run-dir", str(run_dir), *extra]


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_node(tiny_dataset, tmp_path):
    one = tmp_path / "one_node"
    # generous limits: the first DeepSpeed launch on a fresh machine JIT-compiles its shared-memory op
    proc = subprocess.run([*RUN, "--nproc", "2", "--master-port", str(free_port()), "--",
                           *train_args(tiny_dataset, one, 6)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    two = tmp_path / "two_nodes"
    port = str(free_port())
    nodes = [subprocess.Popen([*RUN, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(r),
                               "--master-addr", "127.0.0.1", "--master-port", port, "--",
                               *train_args(tiny_dataset, two, 6)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=900)
        assert node.returncode == 0, out[-2000:]
    assert [m["loss"] for m in read_metrics(two)] == [m["loss"] for m in read_metrics(one)]


def _rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline():
                return child
        except psutil.Error:
            pass
    return None


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_and_the_checkpoints_stay_usable(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_dataset, run, 500, "--set", "checkpoint.every=2", "--set", "checkpoint.keep=10")
    launcher = subprocess.Popen([*RUN, "--nproc", "2", "--master-port", str(free_port()), "--", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 900
        while not (run / "checkpoints" / "step_00000004").is_dir():
            assert launcher.poll() is None and time.time() < deadline, "training did not reach step 4"
            time.sleep(0.2)
        victim = _rank_process(launcher, 1)
        assert victim is not None
        victim.kill()  # SIGKILL: no chance to clean up
        killed_at = time.time()
        out, _ = launcher.communicate(timeout=120)
        stopped_after = time.time() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert stopped_after < 60, stopped_after
    assert "lost contact with another rank" in out, out[-3000:]

    from memtrain.train.checkpoint import list_checkpoints, load_checkpoint
    complete = list_checkpoints(run / "checkpoints")
    assert complete and all((c / "rank00000.pt").is_file() and (c / "rank00001.pt").is_file() for c in complete)
    last_step = int(complete[-1].name.split("_")[1])
    load_checkpoint(complete[-1], 1)  # loads: nothing half-written was renamed into place

    resumed = subprocess.run([*RUN, "--nproc", "2", "--master-port", str(free_port()), "--",
                              *train_args(tiny_dataset, run, last_step + 2), "--resume", "auto"],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    steps = [m["step"] for m in read_metrics(run)]
    assert steps[-2:] == [last_step + 1, last_step + 2]
