"""Load what an inspector needs: the model of a checkpoint, its tokenizer, and a text cut into windows.

    loaded = load_checkpoint_model(Path("runs/demo"))        # a checkpoint dir, or a run dir -> newest complete one
    ids = text_windows(loaded.tokenizer, Path("doc.txt"), seq_len=128, max_windows=8)   # [B, T] int64

Only tensor-parallel size 1 checkpoints are read (a TP > 1 run is refused with a one-line error; merging its shards
is what `memtrain.train.hf.merge` does for export, and can be reused here once needed). Every user mistake raises
`InspectError`, which the CLI prints as one line and exit code 2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtrain.data.tokenizer import Tokenizer


class InspectError(ValueError):
    """A problem the user can fix (missing checkpoint, empty text, unsupported model); one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Loaded:
    model: torch.nn.Module
    """The model in eval mode, float32, on CPU."""
    cfg: Any
    """The trainer's `Config` of the run (memtrain/train/config.py)."""
    tokenizer: Tokenizer
    ckpt: Path
    """The checkpoint directory actually read."""
    step: int


def load_checkpoint_model(path: Path, tokenizer: str | None = None) -> Loaded:
    """Model, config and tokenizer of checkpoint `path` (or a run directory's newest complete checkpoint)."""
    from memtrain.model import build_model
    from memtrain.train.hf import ExportError
    from memtrain.train.hf import files as hf_files
    from memtrain.train.hf import merge

    try:
        ckpt = merge.resolve_checkpoint(Path(path)).resolve()
        meta = merge.read_meta(ckpt)
    except ExportError as e:
        raise InspectError(str(e)) from None
    except OSError as e:
        raise InspectError(f"cannot read checkpoint {path}: {e}") from None
    cfg = _build_config(meta["config"], ckpt)
    try:
        tok_path = hf_files.find_tokenizer(meta["config"], ckpt, tokenizer)
        state = merge.merge_model_state(ckpt, meta)  # any layout: TP shards and pipeline stages merged
    except ExportError as e:
        raise InspectError(str(e)) from None
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InspectError(f"checkpoint {ckpt} does not match its config: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    model.float().eval()
    return Loaded(model, cfg, Tokenizer(str(tok_path)), ckpt, int(meta.get("step", 0)))


def _build_config(tree: dict[str, Any], ckpt: Path):
    from memtrain.train.config import Config
    from memtrain.train.configtree import ConfigError, build
    try:
        cfg = build(Config, json.loads(json.dumps(tree)))  # a deep copy: build may keep references
        from memtrain.model.memory import load_plugins
        load_plugins(cfg.plugins)  # modules that register the run's own memory kinds
        cfg.model.validate()
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise InspectError(f"the config saved in {ckpt} does not fit this memtrain version: {e}") from None
    if cfg.model.vocab_size <= 0:
        raise InspectError(f"the config saved in {ckpt} has model.vocab_size={cfg.model.vocab_size}")
    return cfg


def text_windows(tokenizer: Tokenizer, text_file: Path, seq_len: int, max_windows: int) -> torch.Tensor:
    """Token ids `[B, T]` of `text_file`: consecutive windows of `seq_len` tokens from its start, at most
    `max_windows` of them (B >= 1). A text shorter than one window gives one window of all its tokens (T < seq_len);
    otherwise only full windows are used, so every window has the same length."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise InspectError(f"text file {text_file} does not exist")
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InspectError(f"cannot read text file {text_file} as UTF-8: {e}") from None
    ids = tokenizer.encode(text)
    if not ids:
        raise InspectError(f"text file {text_file} is empty (no tokens); give a file with some text")
    if seq_len < 1 or max_windows < 1:
        raise InspectError(f"--seq-len and --max-windows must be >= 1, got {seq_len} and {max_windows}")
    t = torch.tensor(ids, dtype=torch.long)
    if len(ids) < seq_len:
        return t.unsqueeze(0)
    n = min(max_windows, len(ids) // seq_len)
    return t[: n * seq_len].view(n, seq_len)
