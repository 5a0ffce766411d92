"""What a new user meets in the first hour: short runs, composed configs, the SLURM script, the launcher's port."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.train.config import load_config
from memtrain.train.configtree import ConfigError
from memtrain.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_clamps_warmup_with_a_note():
    cfg = load_config(ROOT / "configs/demo.toml", ["schedule.steps=20"])  # demo's warmup_steps is 30
    s = cfg.schedule
    assert s.warmup() == 20 and "warming up over all 20 steps" in s.notes()[0]
    assert [round(lr_factor(i, s), 3) for i in (0, 19)] == [0.05, 1.0]
    frac = load_config(ROOT / "configs/demo.toml", ["schedule.steps=200", "schedule.warmup_fraction=0.05"]).schedule
    assert frac.warmup() == 10 and not frac.notes()
    with pytest.raises(ConfigError, match="warmup_fraction"):
        load_config(ROOT / "configs/demo.toml", ["schedule.warmup_fraction=1.5"])


def test_a_config_names_its_base_and_overrides_it(tmp_path):
    tp2 = load_config(ROOT / "configs/tp2.toml")
    demo = load_config(ROOT / "configs/demo.toml")
    assert tp2.model == demo.model and tp2.parallel.tp == 2 and tp2.data.batch_size == 8
    assert tp2.optim == demo.optim and tp2.data.seq_len == demo.data.seq_len
    (tmp_path / "a.toml").write_text('base = "b.toml"\n[model]\nd_model = 64\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "missing.toml"\n')
    with pytest.raises(ConfigError, match="'missing.toml' was not found"):
        load_config(tmp_path / "c.toml")
    # nested tables merge key by key: the base's other model keys survive
    (tmp_path / "d.toml").write_text(f'base = "{ROOT / "configs/demo.toml"}"\n[model.titans]\nchunk_size = 8\n')
    d = load_config(tmp_path / "d.toml")
    assert d.model.titans.chunk_size == 8 and d.model.d_model == demo.model.d_model


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_launches_one_node_launcher_per_node(tmp_path):
    """Run slurm.sbatch under a simulated 2-node allocation: `scontrol` and `srun` are small scripts in PATH
    (srun runs its command once per node with SLURM_NODEID set) and the launcher records its arguments."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    bin_dir.mkdir(), submit.mkdir()
    _fake_bin(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    _fake_bin(bin_dir, "srun", 'shift  # --kill-on-bad-exit\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    _fake_bin(bin_dir, "launcher", f'echo "$@" >> {tmp_path}/launches\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
           "MEMTRAIN_LAUNCHER": str(bin_dir / "launcher")}
    proc = subprocess.run(["bash", str(ROOT / "memtrain/launch/slurm.sbatch"), "--config", "configs/demo.toml",
                           "--set", "model.rmt.curriculum=[[0, 1], [100, 2]]"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (submit / "runs" / "hostfile-4242").read_text() == "node-a slots=8\nnode-b slots=8\n"
    launches = (tmp_path / "launches").read_text().splitlines()
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert f"--hostfile runs/hostfile-4242 --no-ssh --node-rank {rank} --nproc 8 --master-addr node-a" in line
        assert "--master-port 24242 -- --config configs/demo.toml --set model.rmt.curriculum=[[0, 1], [100, 2]]" \
            in line  # the argument with spaces and brackets arrives whole


def test_launcher_picks_a_free_port_on_one_machine_and_a_fixed_one_across_machines(tmp_path):
    run = [str(ROOT / "memtrain/launch/run.sh"), "--dry-run"]
    one = subprocess.run([*run, "--nproc", "2", "--", "--config", "configs/demo.toml"], capture_output=True,
                         text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    port = int(one.stdout.split("--master_port ")[1].split()[0])
    assert f"master port {port} (a free one" in one.stderr and port != 29500
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    many = subprocess.run([*run, "--hostfile", str(hosts), "--", "--config", "configs/demo.toml"],
                          capture_output=True, text=True, timeout=60)
    assert "--master_port 29500" in many.stdout  # every node must agree without talking first
