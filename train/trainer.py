"""The training loop: data stream -> model -> AdamW, with progress bar, tensorboard and checkpoints.

Runs as one process (`python -m train`) or as every rank of a launcher (`torchrun`), with tensor
parallelism from megatron-core layers and data parallelism by gradient averaging.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.stream import build_stream
from launch.groups import Layout, data_parallel_group, init_parallel, tensor_parallel_group
from model import LayerFactory, build_model

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .configtree import to_toml
from .optim import average_gradients, build_optimizer, build_scheduler, clip_gradients


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available: set device='cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Trainer:
    """Owns the model, optimizer, schedule, stream and run directory of one training run."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: str = "none"):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        self.layout: Layout = init_parallel(cfg.parallel, self.device)
        self.is_main = self.layout.rank == 0
        seed_everything(cfg.seed)  # same on every rank: TP shards are cut from identical full weights

        self.stream = build_stream(cfg.data, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.stream.vocab_size
        elif cfg.model.vocab_size < self.stream.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
                              f"vocabulary {self.stream.vocab_size}: set it to 0 to take the dataset's")
        cfg.validate()  # again, now that the vocabulary is known

        factory = LayerFactory()
        if self.layout.tp > 1:
            from launch.tensor_parallel import MegatronFactory
            factory = MegatronFactory()
        self.model = build_model(cfg.model, factory).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.step = 0
        self.ckpt_root = self.run_dir / "checkpoints"
        self.writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if resume != "none":
            self._resume(resume)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "step": self.step,
        }
        meta = {"config": dataclasses.asdict(self.cfg), "layout": dataclasses.asdict(self.layout)}
        return save_checkpoint(self.ckpt_root, self.step, state, meta,
                               rank=self.layout.rank, keep=self.cfg.checkpoint.keep)

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            found = list_checkpoints(self.ckpt_root)
            if not found:
                return  # nothing to resume: a fresh run
            path = found[-1]
        else:
            path = Path(resume)
        state, meta = load_checkpoint(path, self.layout.rank)
        if meta["layout"]["world"] != self.layout.world or meta["layout"]["tp"] != self.layout.tp:
            raise ConfigError(f"checkpoint {path} was written with layout {meta['layout']}, this run has "
                              f"{dataclasses.asdict(self.layout)}: resume with the same layout")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # ---- one step --------------------------------------------------------------------------------

    def train_step(self, batch) -> tuple[float, float]:
        """Forward, backward, DP average, clip, update; returns (loss averaged over DP, grad norm)."""
        self.model.train()
        inputs = batch.inputs.to(self.device)
        targets = batch.targets.to(self.device)
        loss = self.model(inputs, targets).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dp_group = data_parallel_group() if self.layout.dp > 1 else None
        average_gradients(self.params, dp_group)
        norm = clip_gradients(self.params, self.cfg.optim.grad_clip,
                              tensor_parallel_group() if self.layout.tp > 1 else None)
        self.optimizer.step()
        self.scheduler.step()
        loss = loss.detach().float()
        if dp_group is not None:
            dist.all_reduce(loss, group=dp_group)
            loss /= self.layout.dp
        return float(loss), norm

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.schedule.steps
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * self.layout.dp
        bar = None
        if self.is_main and cfg.logging.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        stream = iter(self.stream)
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        losses: list[float] = []
        first_loss = None
        t_last = time.perf_counter()
        while self.step < total:
            batch = next(stream)
            loss, norm = self.train_step(batch)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}: lower optim.lr or check the data")
            self.step += 1
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            first_loss = loss if first_loss is None else first_loss
            losses.append(loss)
            lr = self.scheduler.get_last_lr()[0]
            if metrics is not None:
                metrics.write(json.dumps({"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                                          "tokens_per_s": tok_s}) + "\n")
                metrics.flush()
            if self.writer is not None and (self.step % cfg.logging.every == 0 or self.step == total):
                for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", norm),
                                   ("train/tokens_per_s", tok_s)):
                    self.writer.add_scalar(tag, value, self.step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                self.save()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        ckpt = self.save()
        if self.writer is not None:
            self.writer.close()
        summary = {"steps": self.step, "first_loss": first_loss, "final_loss": losses[-1] if losses else None,
                   "last10_loss": float(np.mean(losses[-10:])) if losses else None,
                   "checkpoint": str(ckpt), "tensorboard": str(self.run_dir / "tb")}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
