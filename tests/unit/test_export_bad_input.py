"""Bad input to export_hf / import_hf: one line on stderr, exit code 2, nothing written or overwritten.

Checkpoints are fabricated in process (a random tiny model saved like `Trainer.save`), no training needed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.model import ModelConfig, build_model
from memtrain.train import export_hf, import_hf
from memtrain.train.checkpoint import save_checkpoint
from memtrain.train.config import Config

ROOT = Path(__file__).resolve().parents[2]


def fake_checkpoint(run_dir: Path, *, step: int = 5, **model) -> Path:
    """A complete single-process checkpoint of a random tiny model, written by memtrain.train.checkpoint."""
    cfg = Config(model=ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=64, num_meta_tokens=2, **model))
    net = build_model(cfg.model)
    meta = {"config": dataclasses.asdict(cfg),
            "layout": {"world": 1, "rank": 0, "tp": 1, "dp": 1, "tp_rank": 0, "dp_rank": 0},
            "partition_dims": {n: None for n, _ in net.named_parameters()}, "format": "memtrain-checkpoint-v1"}
    return save_checkpoint(run_dir / "checkpoints", step, {"model": net.state_dict(), "step": step}, meta)


def edit_meta(ckpt: Path, fn) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    fn(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def run_export(capsys, *args: str) -> tuple[int, str]:
    code = export_hf.main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_interrupted_save_is_refused(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "run")
    tmp = ckpt.parent / ".tmp-step_00000009"
    shutil.copytree(ckpt, tmp)
    (tmp / "meta.json").unlink()
    code, err = run_export(capsys, "--checkpoint", str(tmp), "--out", str(tmp_path / "hf"))
    assert_one_line_error(code, err, "interrupted")
    shutil.rmtree(ckpt)  # the run now holds only the interrupted save
    code, err = run_export(capsys, "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert_one_line_error(code, err, "no complete checkpoint")
    assert not (tmp_path / "hf").exists()


def test_missing_rank_file_is_refused(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "run")
    edit_meta(ckpt, lambda m: m["layout"].update(world=2, tp=2))  # rank00001.pt was never written
    code, err = run_export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    assert_one_line_error(code, err, "incomplete", "rank00001.pt")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["config"]["model"].update(d_model=48), ["does not match its config"]),
    (lambda m: m["config"]["model"].update(n_layers=3), ["does not match its config", "missing"]),
    (lambda m: m["config"]["model"].update(no_such_key=1), ["does not fit", "no_such_key"]),
    # a plain model's tensors under a Titans config: the memory parameters are missing
    (lambda m: m["config"]["model"].update(memory="mal"), ["does not match its config", "blocks.0.mem_norm.weight"]),
    (lambda m: m["config"]["model"].update(memory="xl"), ["memory", "xl"]),
    (lambda m: m.update(format="something-else"), ["format"]),
])
def test_checkpoint_from_another_config_is_refused(tmp_path, capsys, edit, words):
    ckpt = fake_checkpoint(tmp_path / "run")
    edit_meta(ckpt, edit)
    code, err = run_export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export")]


def test_non_empty_output_is_never_overwritten(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_export(capsys, "--checkpoint", str(ckpt), "--out", str(out))
    assert_one_line_error(code, err, "not an empty directory")
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    assert import_hf.main(["--model", str(out), "--out", str(out)]) == 2
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_shard_size_and_missing_tokenizer(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "run")
    code, err = run_export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--max-shard-size", "2XB")
    assert_one_line_error(code, err, "--max-shard-size")
    edit_meta(ckpt, lambda m: m["config"]["data"].update(path=str(tmp_path / "nowhere")))
    code, err = run_export(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "--tokenizer")
    assert not (tmp_path / "a").exists()


def test_import_refuses_what_is_not_a_memtrain_export(tmp_path, capsys):
    src = tmp_path / "foreign"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert import_hf.main(["--model", str(src), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err, "not a memtrain export")
    assert import_hf.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "ck")]) == 2
    assert not (tmp_path / "ck").exists()


def fake_export(out: Path) -> Path:
    """A minimal import_hf input: config.json and a single model.safetensors (as transformers saves one)."""
    from safetensors.torch import save_file

    from memtrain.train.hf import convert
    cfg = Config(model=ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    out.mkdir()
    conf = convert.hf_config(cfg, step=5, source="test", dtype="float32", special_ids={})
    (out / "config.json").write_text(json.dumps(conf))
    save_file(convert.native_to_hf(build_model(cfg.model).state_dict(), cfg.model), str(out / "model.safetensors"))
    return out


def test_import_of_a_truncated_safetensors_file_names_it(tmp_path, capsys):
    src = fake_export(tmp_path / "hf")
    weights = src / "model.safetensors"
    assert import_hf.main(["--model", str(src), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code = import_hf.main(["--model", str(src), "--out", str(tmp_path / "ck")])
    assert_one_line_error(code, capsys.readouterr().err, str(weights), "truncated")
    assert not (tmp_path / "ck").exists()


def test_import_of_a_config_json_that_is_not_an_object_names_it(tmp_path, capsys):
    src = fake_export(tmp_path / "hf")
    (src / "config.json").write_text(json.dumps([{"model_type": "memtrain"}]))
    code = import_hf.main(["--model", str(src), "--out", str(tmp_path / "ck")])
    assert_one_line_error(code, capsys.readouterr().err, str(src / "config.json"), "not an object")
    assert not (tmp_path / "ck").exists()


def test_cli_errors_show_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memtrain.train.export_hf", "--checkpoint", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "does not exist" in proc.stderr
