"""Faults an operator meets (docs/reliability.md): stop signals, crafted checkpoints, two runs in one directory,
refused resumes, crash + resume logs, unusable run directories, a full disk, leftovers, shared memory.
Each test failed on the code before these guarantees existed."""
from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.spawn import free_port
from tests.e2e.test_train import ROOT, TINY, read_metrics

RUN = [str(ROOT / "memtrain" / "launch" / "run.sh")]
EXIT_STOPPED = 75


def args_for(dataset: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "configs/demo.toml", *TINY, "--set", f"data.path=\"{dataset}\"", "--set", "data.batch_size=4",
            "--set", f"schedule.steps={steps}", "--set", "schedule.warmup_steps=1", "--set", "logging.every=1",
            "--run-dir", str(run_dir), *extra]


def train(dataset: Path, run_dir: Path, steps: int, *extra: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrain.train", *args_for(dataset, run_dir, steps, *extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _ranks_of(run_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "memtrain.train" in cmd and str(run_dir) in cmd and "deepspeed.launcher" not in cmd:
            found.append(p)
    return found


def _default_sigint() -> None:
    """SIGINT as a terminal gives it. A job started in the background of a non-interactive shell (`cmd &`, as a CI
    harness may start the suite) inherits SIGINT ignored, and a shell cannot trap a signal ignored at its entry."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["term-to-script", "ctrl-c-to-group"])
def test_sigterm_to_the_launcher_reaches_every_rank_which_saves_and_exits_75(tiny_dataset, tmp_path, how):
    """SIGTERM to run.sh (what schedulers send), or SIGINT to its whole process group (Ctrl-C in a terminal,
    which would also reach DeepSpeed's launcher if it shared the group: it would kill the ranks and exit 1)."""
    run = tmp_path / "run"
    port = free_port()
    launcher = subprocess.Popen([*RUN, "--nproc", "2", "--master-port", str(port), "--",
                                 *args_for(tiny_dataset, run, 100000)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 900
        while not (run / "metrics.jsonl").is_file() or len(read_metrics(run)) < 2:
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        if how == "term-to-script":
            launcher.send_signal(signal.SIGTERM)
        else:
            os.killpg(launcher.pid, signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            for rank in _ranks_of(run):  # never leave ranks training for the rest of the suite
                rank.kill()
    assert launcher.returncode == EXIT_STOPPED, out[-3000:]
    assert "stopped at step" in out and "--resume auto" in out, out[-3000:]
    from memtrain.train.checkpoint import list_checkpoints
    (ckpt,) = list_checkpoints(run / "checkpoints")
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < 100000 and [m["step"] for m in read_metrics(run)][-1] == step
    time.sleep(1)
    assert not _ranks_of(run), "ranks outlived the launcher"
    # DeepSpeed's CPU all-reduce buffers of this run are gone from /dev/shm
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


class _Exploit:
    """Unpickling this runs a shell command: what a crafted checkpoint could do to a weights_only=False load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_run(tmp_path: Path, dataset: Path) -> tuple[Path, Path]:
    """A run directory whose newest checkpoint's rank file is a crafted pickle (its config is a real one)."""
    real = tmp_path / "real"
    assert train(dataset, real, 1).returncode == 0
    marker = tmp_path / "pwned"
    step = real / "checkpoints" / "step_00000001"
    with open(step / "rank00000.pt", "wb") as f:
        pickle.dump({"model": _Exploit(marker)}, f)
    with open(step / "state" / ".metadata", "wb") as f:  # the sharded tensors' index is a pickle too
        pickle.dump(_Exploit(marker), f)
    return real, marker


def test_a_crafted_checkpoint_runs_no_code_on_resume_or_export(tiny_dataset, tmp_path):
    run, marker = _crafted_run(tmp_path, tiny_dataset)
    one_line_error(train(tiny_dataset, run, 2, "--resume", "auto"), "refusing to load")
    assert not marker.exists()
    export = subprocess.run([sys.executable, "-m", "memtrain.train.export_hf", "--checkpoint", str(run), "--out",
                             str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode != 0 and "refusing to load" in export.stderr and "Traceback" not in export.stderr, \
        export.stderr[-2000:]
    assert not marker.exists()
    # a genuine rank file next to a crafted index: the resume reads the index only through the safe unpickler
    assert train(tiny_dataset, tmp_path / "genuine", 1).returncode == 0
    (run / "checkpoints" / "step_00000001" / "rank00000.pt").write_bytes(
        (tmp_path / "genuine" / "checkpoints" / "step_00000001" / "rank00000.pt").read_bytes())
    one_line_error(train(tiny_dataset, run, 2, "--resume", "auto"), "refusing to load", ".metadata")
    assert not marker.exists()


def test_one_run_per_run_directory(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "memtrain.train", *args_for(tiny_dataset, run, 100000)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        second = train(tiny_dataset, run, 2, "--resume", "auto")
        one_line_error(second, "in use by another run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == EXIT_STOPPED
    # the lock died with its process: the directory can be resumed now, but not restarted by accident
    one_line_error(train(tiny_dataset, run, 1), "holds checkpoints of an earlier run", "--resume auto", "--overwrite")
    assert train(tiny_dataset, run, 2, "--overwrite").returncode == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]


def test_refused_resume_writes_nothing_and_resume_trims_the_logs(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, 4, "--set", "checkpoint.every=2", "--set", "checkpoint.keep=5").returncode == 0
    config = (run / "config.toml").read_text()
    other = train(tiny_dataset, run, 6, "--set", "model.n_layers=3", "--resume", "auto")
    one_line_error(other, "holds another model", "model.n_layers")
    assert (run / "config.toml").read_text() == config  # the file its own message points to is intact

    # a crash after step 4 was logged but before its checkpoint: the resumed run repeats steps 3 and 4
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    assert train(tiny_dataset, run, 4, "--set", "checkpoint.every=2", "--set", "checkpoint.keep=5",
                 "--resume", "auto").returncode == 0
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_the_intact_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"  # a learning rate of 1e30 makes the weights overflow within a few steps
    proc = train(tiny_dataset, run, 20, "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0",
                 "--set", "checkpoint.every=1")
    line = one_line_error(proc, "loss became", "lower optim.lr", "newest intact checkpoint")
    failed = int(line.split(" at step ")[1].split(":")[0])
    logged = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert logged == list(range(1, failed)) and f"step_{failed - 1:08d}" in line  # the step before is saved


def test_unusable_run_directory_fails_before_the_model_is_built(tiny_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = train(tiny_dataset, blocker / "run", 2)
    one_line_error(proc, "is not writable", "--run-dir")
    assert "parameters on this rank" not in proc.stdout  # no model was built


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, 2).returncode == 0
    # every file may now grow to 64 KB only: the next checkpoint's rank file cannot be written
    proc = train(tiny_dataset, run, 4, "--resume", "auto", preexec_fn=_limit_file_size(64 * 1024))
    one_line_error(proc, "could not write checkpoint", "step_00000004", "previous ones are kept")
    from memtrain.train.checkpoint import list_checkpoints, load_checkpoint
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    load_checkpoint(run / "checkpoints" / "step_00000002")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_save_are_removed_by_the_next_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, 2).returncode == 0
    leftover = run / "checkpoints" / ".tmp-step_00000003"
    leftover.mkdir()
    (leftover / "rank00000.pt").write_bytes(b"half")
    assert train(tiny_dataset, run, 3, "--resume", "auto").returncode == 0
    assert not leftover.exists()


def test_rotation_is_atomic_and_a_step_directory_missing_rank_files_is_not_complete(tmp_path, monkeypatch):
    import torch

    from memtrain.train import checkpoint as ck
    root = tmp_path / "checkpoints"
    meta = {"layout": {"world": 1}}
    for step in (1, 2):
        ck.save_checkpoint(root, step, {"model": {"w": torch.ones(2)}}, meta, keep=5)
    real_rmtree = ck.shutil.rmtree

    def killed(path, *a, **kw):  # the process dies while deleting the oldest checkpoint, after its rename
        if Path(path).name == ".trash-step_00000001" and not (root / "step_00000001").exists():
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **kw)
    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(root, 3, {"model": {"w": torch.ones(2)}}, meta, keep=2)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    # the interrupted deletion left no step_* directory behind that looks complete but is not
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert not (root / "step_00000001").exists()
    # a directory an older version half-deleted (meta.json kept, rank files gone) is not listed either
    half = root / "step_00000009"
    half.mkdir()
    (half / "meta.json").write_text(json.dumps({"step": 9, "layout": {"world": 2}}))
    (half / "rank00000.pt").write_bytes(b"x")
    assert half not in ck.list_checkpoints(root)
    assert ck.remove_leftovers(root) and not list(root.glob(".trash-*"))


def test_stale_shared_memory_buffers_are_reclaimed(tmp_path):
    from memtrain.launch import shm
    stale = Path("/dev/shm") / f"{shm.PREFIX}_{os.getuid()}_127.0.0.1_1_0"
    live = Path("/dev/shm") / f"{shm.PREFIX}_{os.getuid()}_127.0.0.1_1_1"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    with open(live, "rb"):  # a running job's buffer is open (or mapped): it stays
        reclaimed = shm.reclaim_stale_buffers()
    try:
        assert stale in reclaimed and not stale.exists()
        assert live.exists()
    finally:
        live.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
