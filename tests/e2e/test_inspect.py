"""`python -m memtrain.train.inspect registers | attention` on a checkpoint trained for a few steps on the tiny dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=2", "--set", "model.num_meta_tokens=4", "--set", "model.window=16",
        "--set", "model.global_layers=[-1]", "--set", "data.seq_len=32", "--set", "data.batch_size=4",
        "--set", "schedule.steps=4", "--set", "schedule.warmup_steps=1", "--set", "logging.progress=false",
        "--set", "device=cpu"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inspect") / "run"
    proc = subprocess.run([sys.executable, "-m", "memtrain.train", "--config", "configs/demo.toml", *TINY,
                           "--set", f"data.path=\"{tiny_dataset}\"", "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.py"
    path.write_text((ROOT / "memtrain" / "train" / "checkpoint.py").read_text())
    return path


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrain.train.inspect", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_registers_and_attention_on_a_trained_checkpoint(trained, text_file, tmp_path):
    out = tmp_path / "reg"
    proc = inspect("registers", "--checkpoint", str(trained), "--text", str(text_file), "--out", str(out),
                   "--k", "3", "--max-windows", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("registers.md", "registers.json", "norms.png", "attention_share.png"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "registers.json").read_text())
    assert rep["num_windows"] == 2 and rep["tokens_per_window"] == 32 and rep["num_meta"] == 4

    # the same numbers, computed directly from the loaded model's hidden states and the reference attention
    from tests.unit.test_inspect import direct_block_probs
    from memtrain.train.inspect.load import load_checkpoint_model, text_windows
    loaded = load_checkpoint_model(trained)
    ids = text_windows(loaded.tokenizer, text_file, 32, 2)
    model = loaded.model
    with torch.no_grad():
        h = model.embed(ids)
        for layer, block in enumerate(model.blocks):
            norms = h[:, 4:].norm(dim=-1)
            row = rep["rows"][layer]
            assert row["text_median"] == pytest.approx(float(norms.flatten().median()), rel=1e-5)
            probs = direct_block_probs(model, h, layer)[:, :, 5:]  # text queries after the first
            assert torch.allclose(probs.sum(-1), torch.ones(()).double(), atol=1e-9)
            assert row["share_first"] == pytest.approx(float(probs[..., 4].mean()), abs=1e-6)
            assert row["share_meta"] == pytest.approx(float(probs[..., :4].sum(-1).mean()), abs=1e-6)
            h = block(h)

    out = tmp_path / "att"
    proc = inspect("attention", "--checkpoint", str(trained / "checkpoints"), "--text", str(text_file),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "attention_layer0.png").stat().st_size > 0 and (out / "attention_layer1.png").is_file()
    att = json.loads((out / "attention.json").read_text())
    assert att["regions"] == {"meta": [0, 4], "text": [4, 36]}
    for q in att["quadrants"]:
        assert q["processing"] + q["write"] + q["read"] + q["text_text"] == pytest.approx(1.0, abs=1e-9)
    assert "memory→memory (processing)" in (out / "attention.md").read_text()


def test_bad_inputs_give_one_line_and_exit_2(trained, text_file, tmp_path, capsys):
    from memtrain.train.inspect.__main__ import main
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["registers", "--checkpoint", str(tmp_path / "nope"), "--text", str(text_file)], "does not exist"),
        (["attention", "--checkpoint", str(trained), "--text", str(empty)], "is empty"),
        (["registers", "--checkpoint", str(trained), "--text", str(tmp_path / "missing.txt")], "does not exist"),
        (["registers", "--checkpoint", str(trained), "--text", str(text_file), "--k", "0"], "--k must be positive"),
        (["registers-experiment", "--config", str(tmp_path / "none.toml")], "not found"),
    ]
    for argv, message in cases:
        assert main([*argv[:1], *argv[1:], *(["--out", str(tmp_path / "o")] if argv[0] != "registers-experiment"
                                            else [])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    # and through the real entry point (exit status of the process)
    proc = inspect("registers", "--checkpoint", str(tmp_path / "nope"), "--text", str(text_file), "--out",
                   str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained_mac(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny Titans MAC checkpoint (2 steps: the inspector needs a checkpoint, not a trained model)."""
    run = tmp_path_factory.mktemp("inspect_mac") / "run"
    mac = ["--set", "model.memory=\"mac\"", "--set", "model.titans.segment_len=16", "--set",
           "model.titans.chunk_size=8", "--set", "model.titans.memory_heads=2", "--set", "schedule.steps=2"]
    proc = subprocess.run([sys.executable, "-m", "memtrain.train", "--config", "configs/demo.toml", *TINY, *mac,
                           "--set", f"data.path=\"{tiny_dataset}\"", "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_attention_maps_of_a_titans_mac_checkpoint(trained_mac, text_file, tmp_path):
    out = tmp_path / "mac"
    proc = inspect("attention", "--checkpoint", str(trained_mac), "--text", str(text_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not available" not in proc.stdout
    for name in ("attention_layer0.png", "attention_layer1.png", "attention.json", "attention.md", "gates.png"):
        assert (out / name).stat().st_size > 0, name
    att = json.loads((out / "attention.json").read_text())
    P, n = 4, 32
    assert att["regions"] == {"meta": [0, P], "text": [P, P + n]}
    assert att["key_regions"] == {"persistent": [0, P], "retrieved": [P, P + n], "segment": [P + n, P + 2 * n]}
    assert len(att["shares"]) == 2 * (4 + 1)  # 2 blocks × (4 heads + the mean)
    for row in att["shares"]:
        assert row["persistent"] + row["retrieved"] + row["segment"] == pytest.approx(1.0, abs=1e-9)
    md = (out / "attention.md").read_text()
    assert "| layer | head | persistent | retrieved | segment |" in md and "## Memory gates" in md
