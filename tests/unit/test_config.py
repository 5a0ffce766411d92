"""The config tree: every shipped file loads, every field is documented, bad input names the key."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.train.config import Config, load_config
from memtrain.train.configtree import ConfigError, field_docs, to_toml

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.toml"))


def test_there_are_config_files():
    assert CONFIG_FILES, "configs/ must ship at least one TOML file"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_file_loads(path):
    if path.parent.name == "experiments":
        # an experiment preset: its [train] table is a whole trainer config, checked like any other
        import tomllib

        from memtrain.train.configtree import build
        tree = tomllib.loads(path.read_text())
        if "experiment" not in tree:  # a long-context preset: its own config tree
            from memtrain.train.experiment.config import load_experiment_config
            load_experiment_config(path)
            return
        assert "train" in tree, "registers presets hold [experiment] and [train] tables"
        cfg = build(Config, tree["train"])
        cfg.validate()
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the printed form is itself a valid config that loads back to the same values
    again = load_config_text(to_toml(cfg), tmp=path.parent)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def load_config_text(text: str, tmp: Path) -> Config:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        Path(f.name).unlink()


def _all_sections(cls=Config):
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                 and dataclasses.is_dataclass(f.default_factory)):
            yield from _all_sections(f.default_factory)


def test_every_field_has_a_docstring():
    for cls in _all_sections():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_overrides_apply_and_convert_types():
    cfg = load_config(None, ["model.n_layers=3", "optim.lr=1e-3", "model.global_layers=[0, -1]",
                             "model.window=16", "device=cpu", "optim.grad_clip=2"])
    assert cfg.model.n_layers == 3 and cfg.optim.lr == 1e-3 and cfg.model.global_layers == [0, -1]
    assert cfg.device == "cpu" and cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)


@pytest.mark.parametrize("override, key", [
    ("model.n_layer=4", "model.n_layer"),                 # typo: unknown key
    ("modle.n_layers=4", "modle"),                        # typo: unknown section
    ("model.n_layers=2.5", "model.n_layers"),             # wrong type
    ("model.tie_embeddings=1", "model.tie_embeddings"),   # int is not bool
    ("model.global_layers=3", "model.global_layers"),     # not a list
    ("model.n_heads=5", "model.n_heads"),                 # heads do not divide the width
    ("model.n_kv_heads=3", "model.n_kv_heads"),           # kv heads do not divide heads
    ("parallel.tp=8", "parallel.tp"),                     # TP does not divide the heads
    ("model.window=100000", "model.window"),              # window larger than the sequence
    ("data.seq_len=999999", "data.seq_len"),              # longer than the model allows
    ("model.attention_backend=fast", "model.attention_backend"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert key in message and "\n" not in message


_RANGED_KEYS = ("optim.lr", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip",
                "checkpoint.every", "logging.eval_every")


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"),                         # NaN slips through `<= 0` tests
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.beta1=1.5", "optim.beta1"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("optim.beta2=-0.5", "optim.beta2"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.grad_clip=nan", "optim.grad_clip"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("checkpoint.every=-1", "checkpoint.every"),
    ("logging.eval_every=-1", "logging.eval_every"),
])
def test_out_of_range_optimizer_and_interval_values_name_exactly_that_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert key in message and "\n" not in message
    assert [k for k in _RANGED_KEYS if k in message] == [key], message


@pytest.mark.parametrize("override, key", [
    ("model.global_layers=[-1", "model.global_layers"),  # unclosed list
    ("data.path=\"data_cache/x", "data.path"),           # unterminated string
    ("model.rmt={segment_len=32", "model.rmt"),          # unclosed table
    ("optim.lr=1e", "optim.lr"),                         # half a number
    ("optim.lr=0x", "optim.lr"),
])
def test_malformed_set_value_is_a_toml_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="not a valid TOML value") as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(f"--set {key}=") and "\n" not in message


def test_bare_words_and_paths_stay_strings():
    cfg = load_config(None, ["model.memory=mac", "data.path=data_cache/x", "device=cpu"])
    assert (cfg.model.memory, cfg.data.path, cfg.device) == ("mac", "data_cache/x", "cpu")


def test_window_larger_than_sequence_is_checked_against_data_seq_len():
    with pytest.raises(ConfigError, match="model.window"):
        load_config(None, ["data.seq_len=64", "model.window=128"])


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrain.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--config", "configs/does_not_exist.toml"], "not found"),
    (["--config", "configs/demo.toml", "--set", "model.n_layerz=2"], "model.n_layerz"),
    (["--config", "configs/demo.toml", "--set", "parallel.tp=3"], "parallel.tp"),
    (["--set", "optim"], "KEY=VALUE"),
    (["--config", "configs/demo.toml", "--set", "model.global_layers=[-1"], "model.global_layers=[-1: not a valid TOML"),
    # an impossible layout: TP = 2 in a single process
    (["--config", "configs/demo.toml", "--set", "parallel.tp=2", "--set", "data.path=\"/nonexistent\""], "world size"),
    (["--config", "configs/demo.toml", "--set", "parallel.zero_stage=2", "--set", "parallel.engine=\"torch\""],
     "parallel.zero_stage"),
])
def test_cli_user_errors_are_one_line_exit_2(args, needle):
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_prints_resolved_config():
    proc = _run_cli("--config", "configs/demo.toml", "--set", "model.n_layers=3", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "n_layers = 3" in proc.stdout and "[model]" in proc.stdout
