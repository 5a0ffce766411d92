"""What per-token memory updates cost: Titans training steps at memory chunk b = 1 against b = 16, in one run.

    python benchmarks/titans_chunk_cost.py [--variants lmm mac mag mal] [--rounds 3] [--steps 3] [--threads 1]

The long-context preset (configs/experiments/long_context.toml) updates the memory per token (b = 1) because
chunks of 16 overshoot with the gates needle training learns (docs/titans.md#stability). This measures the price
on the preset's own models and batches: one training step (forward + backward of the answer loss, as the
experiment trains) on a batch of `train.batch_size` examples of `train_len` tokens, for each variant at b = 1 and
b = 16, and the sliding-window baseline as the dense reference. Rounds alternate the models (window, then each
variant at b = 1 and b = 16), so drifting machine load hits all of them; the best step of each is reported. One
JSON line per model, then one per variant with the step-time ratios b=1 / b=16 (how many times slower per-token
updates are) and b=1 / window, b=16 / window.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memtrain.model.transformer import build_model  # noqa: E402
from memtrain.train.experiment.config import load_experiment_config, variant_model  # noqa: E402
from memtrain.train.experiment.training import training_batch  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "long_context.toml"


def step_seconds(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Wall seconds of one forward + backward of the answer loss."""
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x).logits[:, -1].float(), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["lmm", "mac", "mag", "mal"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model and round (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_experiment_config(PRESET, ["train.one_segment_steps=0"])  # the training-length model throughout
    step = cfg.train.steps - 1  # a step at the training length (after the curriculum)
    models = {"window": build_model(variant_model(cfg, "window"))}
    for v in args.variants:
        for b in (1, 16):
            c = load_experiment_config(PRESET, ["train.one_segment_steps=0", f"model.titans.chunk_size={b}"])
            torch.manual_seed(0)
            models[f"{v}_b{b}"] = build_model(variant_model(c, v))
    x, y = training_batch(step, cfg, "window", "cpu")
    tokens = x.numel()
    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            step_seconds(model, x, y)  # warm-up
            for _ in range(args.steps):
                best[name] = min(best[name], step_seconds(model, x, y))
    for name, s in best.items():
        print(json.dumps({"model": name, "batch": list(x.shape), "best_step_s": round(s, 4),
                          "tokens_per_s": round(tokens / s), "threads": args.threads}), flush=True)
    for v in args.variants:
        b1, b16, w = best[f"{v}_b1"], best[f"{v}_b16"], best["window"]
        print(json.dumps({"variant": v, "b1_over_b16_time": round(b1 / b16, 2), "b1_over_window_time":
                          round(b1 / w, 2), "b16_over_window_time": round(b16 / w, 2)}), flush=True)


if __name__ == "__main__":
    main()
