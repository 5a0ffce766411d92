"""Train one variant of the long-context experiment on freshly generated task examples.

Step s trains on examples s·B .. s·B + B − 1 of the "train" split of task `train.tasks[s % len]` (a pure function
of the step, so a resumed run sees exactly the batches the uninterrupted one would have). The loss is the
cross-entropy of the answer token only, predicted at the last prompt position: the one thing the task asks, and
far faster to learn than next-token loss on random filler. Memory models run the whole example in one call, the
memory carried across its segments (full backpropagation through time).

With `train.one_segment_steps`, a memory that runs in segments trains its first steps with each example as one
segment: the model is rebuilt for that segment length around the same parameters and optimizer state.

Checkpoints: RUN/variants/NAME/train.pt (model, optimizer, step, log), written atomically every
`train.checkpoint_every` steps and at the end; a finished variant (step == train.steps) is loaded, not retrained.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from memtrain.data.tasks.symbolic import symbolic_batch
from memtrain.model.transformer import build_model

from ..checkpoint import safe_torch_load
from .config import LongContextConfig, step_model, train_length, variant_model


def lr_at(step: int, cfg: LongContextConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr / 10 at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_batch(step: int, cfg: LongContextConfig, variant: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts `[B, T - 1]`, answers `[B]`) of training step `step`."""
    task = cfg.train.tasks[step % len(cfg.train.tasks)]
    B = cfg.train.batch_size
    x, y = symbolic_batch(task, train_length(step, cfg), cfg.seed, "train", step * B, B, cfg.events, cfg.filler)
    return torch.from_numpy(x[:, :-1]).to(device), torch.from_numpy(y).to(device)


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a half-written checkpoint


def _configured(model, opt: torch.optim.Optimizer, mcfg, cfg: LongContextConfig):
    """(model, optimizer) for model config `mcfg`: `model` itself when it already has it, else a model built for
    `mcfg` holding the same parameters and an optimizer with the same state (`train.one_segment_steps` changes
    only a segment length). Building draws no random numbers from the training's generator."""
    if model.cfg == mcfg:
        return model, opt
    with torch.random.fork_rng(devices=[]):
        new = build_model(mcfg)
    new.load_state_dict(model.state_dict())
    new.to(next(model.parameters()).device).train(model.training)
    new_opt = torch.optim.AdamW(new.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    new_opt.load_state_dict(opt.state_dict())
    return new, new_opt


def train_variant(cfg: LongContextConfig, variant: str, vdir: Path,
                  say: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict]:
    """Train (or resume, or just load) `variant`; returns (model in eval mode, info with the training log)."""
    device = torch.device(cfg.device)
    mcfg = variant_model(cfg, variant)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ckpt = vdir / "train.pt"
    step, log, seconds = 0, [], 0.0
    if ckpt.is_file():
        payload = safe_torch_load(ckpt, map_location=device)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        step, log, seconds = payload["step"], payload["log"], payload["seconds"]
    if step >= cfg.train.steps:
        model.eval()
        return model, {"steps": step, "log": log, "seconds": seconds, "params": model.num_params(), "resumed": True}
    vdir.mkdir(parents=True, exist_ok=True)
    model.train()
    t0, window_loss, window_acc, n = time.perf_counter() - seconds, 0.0, 0.0, 0
    while step < cfg.train.steps:
        if step <= cfg.train.one_segment_steps:  # the segment length changes only up to the switch
            model, opt = _configured(model, opt, step_model(cfg, variant, step), cfg)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = training_batch(step, cfg, variant, device)
        logits = model(x).logits[:, -1].float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        step += 1
        window_loss += loss.item()
        window_acc += (logits.argmax(-1) == y).float().mean().item()
        n += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            entry = {"step": step, "loss": window_loss / n, "acc": window_acc / n, "len": x.shape[1] + 1,
                     "seconds": round(time.perf_counter() - t0, 1)}
            log.append(entry)
            say(f"  {variant} step {step}/{cfg.train.steps} loss {entry['loss']:.3f} acc {entry['acc']:.2f} "
                f"len {entry['len']} ({entry['seconds']:.0f}s)")
            window_loss, window_acc, n = 0.0, 0.0, 0
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log,
                         "seconds": time.perf_counter() - t0, "variant": variant,
                         "params": model.num_params()})
    model.eval()
    return model, {"steps": step, "log": log, "seconds": time.perf_counter() - t0, "params": model.num_params(),
                   "resumed": False}
