"""Files of an export besides config.json: sharded safetensors, tokenizer, generation config, model card.

Weights are always written as `model-XXXXX-of-YYYYY.safetensors` plus `model.safetensors.index.json`, even
when there is one shard: one layout for every model size, so tools (and `import_hf`) never branch on it.
transformers loads the index form whenever no single `model.safetensors` exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memtrain.model.memory import memory_spec

from . import ExportError

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 bytes (transformers' convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ExportError(f"--max-shard-size {text!r} is not a size like 2GB, 500MB or 1000000")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ExportError(f"--max-shard-size {text!r} must be positive")
    return size


def write_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Write `tensors` in insertion order into shards of at most `max_shard_bytes` (a bigger tensor gets a
    shard of its own) and the index; returns the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_sharded(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export (index form, or a single model.safetensors as transformers writes it)."""
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads((model_dir / INDEX).read_text())
            files = list(dict.fromkeys(index["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{model_dir / INDEX} is unreadable ({e.__class__.__name__}: {e}); "
                              f"re-export the model or restore the file") from None
        out: dict[str, torch.Tensor] = {}
        for file in files:
            out.update(_load(model_dir / str(file)))
        return out
    single = model_dir / "model.safetensors"
    if single.is_file():
        return _load(single)
    raise ExportError(f"{model_dir} holds no {INDEX} or model.safetensors")


def _load(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one is safetensors' own error type, not an OSError."""
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e.__class__.__name__}: {e}); it is truncated "
                          f"or corrupt: re-export the model or download the file again") from None


def find_tokenizer(cfg_tree: dict[str, Any], ckpt: Path, override: str | None) -> Path:
    """The sentencepiece model the checkpoint was trained with: --tokenizer, else the dataset manifest's file.

    `data.path` is resolved as written (relative to the current directory), then relative to the repository
    root and to the run directory, because training usually runs from the repository root.
    """
    if override:
        path = Path(override)
        if not path.is_file():
            raise ExportError(f"--tokenizer {override} does not exist")
        return path
    data_path = Path(str(cfg_tree.get("data", {}).get("path", "")))
    repo = Path(__file__).resolve().parents[3]
    candidates = [data_path] if data_path.is_absolute() else \
        [data_path, repo / data_path, ckpt.parent.parent / data_path]
    for d in candidates:
        manifest = d / "manifest.json"
        if manifest.is_file():
            try:
                raw = json.loads(manifest.read_text())
                tok = d / raw["tokenizer"]["file"]
                sha = raw["tokenizer"].get("sha256")
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
                raise ExportError(f"{manifest} is unreadable ({e}); pass --tokenizer FILE") from None
            if not tok.is_file():
                raise ExportError(f"tokenizer {tok} named by {manifest} is missing; pass --tokenizer FILE")
            if sha and hashlib.sha256(tok.read_bytes()).hexdigest() != sha:
                raise ExportError(f"tokenizer {tok} does not match the sha256 in {manifest}; pass --tokenizer FILE")
            return tok
    raise ExportError(f"cannot find the training dataset {data_path} (for its tokenizer); pass --tokenizer FILE")


def special_ids(tokenizer: Path, model_vocab: int) -> tuple[dict[str, int], dict[str, str]]:
    """({bos,eos,pad}_token_id, {unk,bos,eos,pad}_token strings) of a sentencepiece model."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tokenizer))
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{tokenizer} is not a sentencepiece model ({e})") from None
    if sp.get_piece_size() > model_vocab:
        raise ExportError(f"tokenizer {tokenizer} has {sp.get_piece_size()} pieces, more than the model's "
                          f"vocabulary {model_vocab}: it is not this model's tokenizer")
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    tokens = {f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in ids.items() if k != "unk"}, tokens


def write_tokenizer(out: Path, tokenizer: Path, tokens: dict[str, str], max_len: int) -> None:
    """tokenizer.json (the fast tokenizer `AutoTokenizer` loads without remote code), tokenizer.model with its
    sentencepiece class (`trust_remote_code=True` loads that one), tokenizer_config.json, special_tokens_map.json.
    Both give the training tokenizer's ids."""
    from .fast_tokenizer import write_fast_tokenizer
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    write_fast_tokenizer(out, tokenizer, tokens)
    conf = {"tokenizer_class": "PreTrainedTokenizerFast",
            "auto_map": {"AutoTokenizer": ["tokenization_memtrain.MemtrainTokenizer", None]},
            **tokens, "padding_side": "left", "model_max_length": max_len, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")


def write_generation_config(out: Path, ids: dict[str, int | None]) -> None:
    import transformers
    conf = {**ids, "do_sample": False, "transformers_version": transformers.__version__}
    (out / "generation_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def write_model_card(out: Path, cfg, *, step: int, source: str, dtype: str, num_params: int) -> None:
    """README.md: what the model is, how to load it, and the architecture and memory settings."""
    m = cfg.model
    windows = ", ".join("global" if m.layer_window(i) is None else f"window {m.layer_window(i)}"
                        for i in range(m.n_layers))
    rows = [("parameters", f"{num_params:,}"), ("layers", m.n_layers), ("d_model", m.d_model),
            ("attention heads (query / key-value)", f"{m.n_heads} / {m.kv_heads} (head dim {m.head_dim})"),
            ("SwiGLU hidden width", m.ffn_width), ("vocabulary", f"{m.vocab_size} (sentencepiece BPE)"),
            ("max text length", m.max_seq_len), ("rotary base", m.rope_theta), ("tied embeddings", m.tie_embeddings),
            ("meta tokens", m.num_meta_tokens), ("attention per layer", windows), ("memory", m.memory),
            ("weights dtype", dtype), ("training step", step)]
    spec = memory_spec(m.memory)
    memory = spec.describe(m) or f"No recurrent memory (`memory = \"{m.memory}\"`)"
    settings = spec.settings_of(m)
    if settings is not None:
        rows.append(("memory settings", ", ".join(f"{k}={v}" for k, v in asdict(settings).items())))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""---
library_name: transformers
tags: [memtrain, custom_code, text-generation]
---

# memtrain decoder LM (step {step})

Exported by `python -m memtrain.train.export_hf` from the memtrain checkpoint `{source}`.
Architecture: pre-norm decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP)
{"with " + str(m.num_meta_tokens) + " learned meta tokens prepended to every sequence (Hymba-style, visible to "
 "every query, kept as a prefix in the KV cache)" if m.num_meta_tokens else "without meta tokens"}.
{memory}. The exported logits equal the training code's (see docs/export.md in memtrain).

| setting | value |
|---|---|
{table}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
batch = tok(["def main(", "import"], return_tensors="pt", padding=True)  # left padding
out = model.generate(**batch, max_new_tokens=32, do_sample=False)
print(tok.batch_decode(out[:, batch.input_ids.shape[1]:]))
```

The tokenizer adds no BOS/EOS (training packed documents separated by the EOS token).
The full training configuration is in `config.json` under `memtrain.config`.
"""
    (out / "README.md").write_text(text)
