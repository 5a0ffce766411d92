"""`python -m memtrain.train.import_hf --model DIR --out CKPT`: a Hugging Face export back to a memtrain checkpoint.

DIR is a directory written by `python -m memtrain.train.export_hf` (its config.json carries the full memtrain config
under `memtrain.config`). CKPT becomes a memtrain-checkpoint-v1 directory for one process (layout world = tp =
dp = 1): `meta.json` (step 0, the config, the layout, partition_dims all null, format) and `rank00000.pt`
holding `{"model": state_dict, "step": 0}` in fp32, plus `config.toml` (the resolved config, for
`python -m memtrain.train --config CKPT/config.toml --resume CKPT`). Optimizer, scheduler, data-stream and RNG state
are absent: continued pretraining starts them fresh (warm-up included), see docs/export.md.

QKV rows are re-fused in the group-interleaved layout and the vocabulary padding rows come back as zeros
(they are masked out of the logits and never looked up), so export -> import -> export gives identical weights.
Bad input prints one line `error: ...` on stderr and exits with code 2; CKPT must not exist or be empty.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from memtrain.train.checkpoint import FORMAT_V1 as FORMAT  # weights and config only, one rank file
from memtrain.train.hf import ExportError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.train.import_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="directory written by python -m memtrain.train.export_hf")
    p.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    return p.parse_args(argv)


def import_hf(model_dir: Path, out: Path) -> Path:
    """Convert the export `model_dir` into the checkpoint directory `out`; returns `out`."""
    import torch

    from memtrain.train.configtree import to_toml
    from memtrain.train.export_hf import check_out_dir, publish
    from memtrain.train.hf import convert, files

    model_dir, out = Path(model_dir), Path(out)
    check_out_dir(out)
    conf_file = model_dir / "config.json"
    if not conf_file.is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        conf = json.loads(conf_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{conf_file} is unreadable ({e})") from None
    if not isinstance(conf, dict):
        raise ExportError(f"{conf_file} holds a JSON {type(conf).__name__}, not an object of settings; "
                          f"restore the config.json written by python -m memtrain.train.export_hf")
    section = conf.get("memtrain")
    tree = section.get("config") if isinstance(section, dict) else None
    if conf.get("model_type") != "memtrain" or not isinstance(tree, dict):
        raise ExportError(f"{model_dir} is not a memtrain export (config.json has no memtrain.config section)")
    cfg = convert.build_config(tree, str(model_dir))
    convert.check_hf_config(conf, cfg, str(model_dir))

    hf = files.read_sharded(model_dir)
    native = {k: v.to(torch.float32) for k, v in convert.hf_to_native(hf, cfg.model).items()}
    convert.check_native(native, cfg.model, f"the weights in {model_dir}")
    extra = sorted(set(hf) - set(convert.native_to_hf(native, cfg.model)))
    if extra:
        raise ExportError(f"{model_dir} holds tensors the config does not describe: {extra[:3]}")

    meta = {"step": 0, "config": tree,
            "layout": {"world": 1, "rank": 0, "tp": 1, "dp": 1, "tp_rank": 0, "dp_rank": 0},
            "partition_dims": {name: None for name in native}, "format": FORMAT,
            "imported_from": {"model": str(model_dir), "step": conf["memtrain"].get("step"),
                              "source": conf["memtrain"].get("source")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-import-{out.name}-", dir=out.parent))
    try:
        torch.save({"model": native, "step": 0}, tmp / "rank00000.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "config.toml").write_text(to_toml(cfg))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = import_hf(Path(args.model), Path(args.out))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"imported to {out} (resume with: python -m memtrain.train --config {out / 'config.toml'} --resume {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
