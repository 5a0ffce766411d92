"""`python -m memtrain.train.export_hf --checkpoint CKPT_OR_RUN_DIR --out DIR [--dtype bf16|fp32] [--max-shard-size 2GB]`

Writes a Hugging Face model directory loadable offline with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`:

    config.json (auto_map, HF fields, the full memtrain config)   configuration/modeling/tokenization_memtrain.py
    model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json   tokenizer.model, tokenizer_config.json,
    special_tokens_map.json   generation_config.json   README.md (model card)

Steps: resolve the checkpoint (a run directory means its newest complete checkpoint), check it is complete,
merge the TP shards (memtrain/train/hf/merge.py), check the tensors against the config, convert names and layouts and
trim the vocabulary padding (memtrain/train/hf/convert.py), then write everything into a temporary sibling directory that
is renamed to DIR at the end, so a failed export leaves nothing behind and never touches an existing DIR.
Bad input prints one line `error: ...` on stderr and exits with code 2. See docs/export.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from memtrain.train.hf import TEMPLATE_FILES, ExportError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train.export_hf", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    p.add_argument("--tokenizer", help="sentencepiece model to ship (default: the training dataset's)")
    p.add_argument("--sample", metavar="PROMPT",
                   help="after exporting, load DIR through transformers and print a greedy continuation of PROMPT")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens generated for --sample (default 48)")
    return p.parse_args(argv)


def check_out_dir(out: Path) -> None:
    """The output must be new or an empty directory: an export never overwrites anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} exists and is not an empty directory; choose a new --out")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished export from `tmp` to `out` (an empty `out` directory is replaced)."""
    check_out_dir(out)  # again: it may have been filled while we worked
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the export is an ordinary directory
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def export(checkpoint: Path, out: Path, *, dtype: str = "fp32", max_shard_size: str = "2GB",
           tokenizer: str | None = None) -> Path:
    """Export `checkpoint` (or a run directory's newest checkpoint) to the HF directory `out`; returns `out`."""
    import torch

    from memtrain.train.hf import convert, files, merge

    out = Path(out)
    check_out_dir(out)
    max_bytes = files.parse_size(max_shard_size)
    ckpt = merge.resolve_checkpoint(Path(checkpoint)).resolve()
    meta = merge.read_meta(ckpt)
    merge.check_complete(ckpt, meta["layout"])
    cfg = convert.build_config(meta["config"], str(ckpt))
    native = merge.merge_model_state(ckpt, meta)
    convert.check_native(native, cfg.model, f"checkpoint {ckpt}")
    tok_path = files.find_tokenizer(meta["config"], ckpt, tokenizer)
    ids, tokens = files.special_ids(tok_path, cfg.model.vocab_size)
    torch_dtype = getattr(torch, DTYPES[dtype])
    hf = {k: v.to(torch_dtype) for k, v in convert.native_to_hf(native, cfg.model).items()}
    step = int(meta.get("step", 0))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out.name}-", dir=out.parent))
    try:
        conf = convert.hf_config(cfg, step=step, source=str(ckpt), dtype=DTYPES[dtype], special_ids=ids)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        template_dir = Path(__file__).resolve().parent / "hf"
        for name in TEMPLATE_FILES:
            shutil.copyfile(template_dir / name, tmp / name)
        files.write_sharded(hf, tmp, max_bytes)
        files.write_tokenizer(tmp, tok_path, tokens, cfg.model.max_seq_len)
        files.write_generation_config(tmp, ids)
        files.write_model_card(tmp, cfg, step=step, source=str(ckpt), dtype=DTYPES[dtype],
                               num_params=sum(t.numel() for t in hf.values()))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(Path(args.checkpoint), Path(args.out), dtype=args.dtype, max_shard_size=args.max_shard_size,
                     tokenizer=args.tokenizer)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # disk full, permissions: the environment, not the input (exit 1), still one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"exported to {out}")
    if args.sample is not None:
        print(f"greedy sample through transformers:\n{args.sample}{sample(out, args.sample, args.sample_tokens)}")
    return 0


def sample(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by the export loaded with AutoModelForCausalLM / AutoTokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    batch = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, batch["input_ids"].shape[1]:])


if __name__ == "__main__":
    sys.exit(main())
