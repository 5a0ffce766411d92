"""The training loop: data stream -> model -> AdamW, with progress bar, tensorboard and checkpoints.

Runs as one process (`python -m memtrain.train`) or as every rank of a launcher (`torchrun`), with tensor
parallelism from megatron-core layers and data parallelism by gradient averaging.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from memtrain.data.stream import build_stream, merge_states
from memtrain.launch.groups import Layout, collective_device, init_parallel
from memtrain.launch.config import LayoutError, check_vocabulary
from memtrain.model import LayerFactory, build_model
from memtrain.model.memory import memory_spec

from .checkpoint import (FORMAT, CheckpointError, all_ok, is_complete, list_checkpoints, load_checkpoint,
                         read_meta, save_checkpoint)
from .dashboards import Dashboards, check_wandb
from .rundir import RunDirError, claim_run_dir, trim_metrics
from .config import Config, ConfigError
from .configtree import to_toml
from .engines import build_engine
from .errors import TrainingDiverged


def resolve_device(name: str) -> torch.device:
    """The device `device = name` means here (Config.check_device has refused what this machine lacks)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _agree(value: str) -> str:
    """Rank 0's `value` on every rank (each rank's clock may name a different default run directory)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_weights_only(path: Path) -> bool:
    """An imported checkpoint: weights and config only, no optimizer, stream or RNG state."""
    return "imported_from" in read_meta(path)


def _layout_text(layout: dict[str, Any]) -> str:
    return " x ".join(f"{k}={layout.get(k, 1)}" for k in ("dp", "tp", "pp", "cp") if layout.get(k, 1) > 1) or "1 rank"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and lists only: what a weights-only load reads back."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # a checkpoint written before the state became tensors: numpy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Owns the model, optimizer, schedule, stream and run directory of one training run."""

    def __init__(self, cfg: Config, run_dir: str | Path | None, *, resume: str = "none", overwrite: bool = False,
                 default_run_dir: str = "runs/default"):
        self.cfg = cfg
        cfg.check_device()  # precision, flash-attn, CUDA: one line before anything is built or written
        check_wandb(cfg.logging.wandb)
        self.device = resolve_device(cfg.device)
        self.layout: Layout = init_parallel(cfg.parallel, self.device)  # model rules: cfg.validate
        self.is_main = self.layout.rank == 0
        self.run_dir = Path(run_dir) if run_dir else Path(_agree(default_run_dir))
        seed_everything(cfg.seed)  # same on every rank: TP shards are cut from identical full weights

        self.stream = build_stream(cfg.data, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.stream.vocab_size
        elif cfg.model.vocab_size < self.stream.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
                              f"vocabulary {self.stream.vocab_size}: set it to 0 to take the dataset's")
        try:  # the one rule that waited for the vocabulary (cfg.validate ran before it was known)
            check_vocabulary(cfg.model, cfg.parallel)
        except LayoutError as e:
            raise ConfigError(str(e)) from None

        # the run directory is claimed (locked, checked) before the model is built: a mistake costs nothing
        self.lock = self._claim_run_dir(resume, overwrite)

        factory = LayerFactory()
        if self.layout.tp > 1:
            from memtrain.launch.tensor_parallel import MegatronFactory
            factory = MegatronFactory(sequence_parallel=cfg.parallel.sequence_parallel)
        if self.layout.cp > 1:  # context parallel: this rank holds a slice of every sequence
            from memtrain.launch.context_parallel import ContextParallel  # rules: cfg.validate (check_layout)
            factory.sequence = ContextParallel()
        self.memory = memory_spec(cfg.model.memory)  # what varies by memory kind is asked of its spec
        if self.layout.pp > 1:
            # a pipeline stage builds its own layers only; the others exist as shapes on the meta device
            from memtrain.launch.pipeline import stage_parts
            factory.holds = stage_parts(cfg.model, self.layout.pp, self.layout.pp_rank).__contains__
            with torch.device(self.device):
                self.model = build_model(cfg.model, factory)
        else:
            self.model = build_model(cfg.model, factory).to(self.device)
        if self.layout.pp == 1:  # pipeline engines recompute whole stages' blocks themselves (their interval)
            self.model.set_activation_checkpoint(cfg.parallel.activation_checkpoint)
        from .memory_stats import GateStats  # Titans gate statistics (every rank alike; rank 0 logs them)
        self.gate_stats = GateStats.attach(self.model)
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_path = self._find_checkpoint(resume)
        if resume_path is not None and _is_weights_only(resume_path):
            # imported weights (python -m memtrain.train.import_hf) start a new run: loaded before the engine
            # exists, so DeepSpeed's fp32 master copies are made from them
            self._load_weights_only(resume_path)
            resume_path = None
        self.engine = build_engine(self.model, cfg, self.layout, self.run_dir, self.device)
        self.step = 0
        self.stop_requested = False
        self.metrics = None
        self.writer = None
        if resume_path is not None:
            self._resume(resume_path)
        self._on_main(self._open_logs)  # only now, with the resume accepted, is anything of this run written

    def _on_main(self, work):
        """`work()` on rank 0; its error (one line) raised on every rank, so none waits in a collective for a rank
        that already stopped. Returns rank 0's result (None elsewhere)."""
        result, message = None, ""
        if self.is_main:
            try:
                result = work()
            except RunDirError as e:
                message = str(e)
            except Exception as e:  # noqa: BLE001 - a locked-out or full disk, W&B without a login
                message = f"run directory {self.run_dir} cannot be used: {str(e).strip().splitlines()[0][:200]}"
        message = _agree(message)
        if message:
            raise RunDirError(message)
        return result

    def _open_logs(self) -> None:
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        trim_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.writer = Dashboards(self.run_dir, self.cfg, self.step)  # tensorboard (+ W&B)

    def _claim_run_dir(self, resume: str, overwrite: bool):
        """Rank 0 locks and checks the run directory (memtrain/train/rundir.py); every rank raises its error."""
        def claim():
            most, least = self._checkpoint_bytes()
            return claim_run_dir(self.run_dir, resume=resume, overwrite=overwrite, checkpoint_bytes=most,
                                 minimum_bytes=least)
        return self._on_main(claim)

    def _checkpoint_bytes(self) -> tuple[int, int]:
        """(upper estimate, lower bound) of one checkpoint of the whole run: fp32 weights and two Adam moments,
        written once whatever the layout (sharded: memtrain/train/sharded.py). The parameters are counted from
        the config's shapes (the export's table): nothing is allocated."""
        from .hf.convert import native_shapes
        n = sum(math.prod(shape) for shape in native_shapes(self.cfg.model).values())
        return int(n * 4 * 3 * 1.05), int(n * 4 * 3)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save(self) -> Path:
        """A checkpoint of this step: each rank writes the rectangles of weights and moments it owns (sharded,
        any layout can resume it) and a small file of its own (stream, RNG, schedule); see docs/distributed.md."""
        state = {"stream": self._stream_state(), "rng": rng_state(), "step": self.step}
        from memtrain.launch.tensor_parallel import partition_dim
        from .sharded import placement
        shapes = {n: list(placement(getattr(p, "ds_shape", None) or p.shape, partition_dim(p), 0,
                                    self.layout.tp).shape) for n, p in self.model.named_parameters()}
        meta = {"config": dataclasses.asdict(self.cfg), "layout": dataclasses.asdict(self.layout),
                "shapes": shapes, "format": FORMAT}
        return save_checkpoint(self.ckpt_root, self.step, state, meta, rank=self.layout.rank,
                               keep=self.cfg.checkpoint.keep,
                               write_extra=lambda d: state.update(engine=self.engine.save(d)))

    def _stream_state(self) -> dict:
        """The job's data position, the same on every rank: with several data lanes each DP rank knows only the
        cursors of the lanes it reads, so the ranks' states are gathered and merged (one collective)."""
        state = self.stream.state_dict()
        if self.stream.lanes == 1 or not (dist.is_initialized() and self.layout.world > 1):
            return state
        states: list[Any] = [None] * self.layout.world
        dist.all_gather_object(states, state)
        return merge_states(states)

    def _find_checkpoint(self, resume: str) -> Path | None:
        """The checkpoint `--resume` names: none, auto (newest complete one, if any) or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            found = list_checkpoints(self.ckpt_root)
            return found[-1] if found else None  # nothing to resume: a fresh run
        path = Path(resume)
        if not is_complete(path):
            raise ConfigError(f"--resume {path}: not a complete checkpoint (meta.json or a rank's file is missing); "
                              f"complete ones are listed in RUN_DIR/checkpoints/")
        return path

    def _load_weights_only(self, path: Path) -> None:
        """Model weights from a one-file TP = 1 checkpoint, cut to this rank's TP shards."""
        from memtrain.launch.tensor_parallel import shard_full
        state, _ = load_checkpoint(path, 0)
        params = dict(self.model.named_parameters())
        full = {k: shard_full(v, params[k], self.layout.tp_rank, self.layout.tp) if k in params else v
                for k, v in state["model"].items()}
        self.model.load_state_dict(full)

    def _resume(self, path: Path) -> None:
        """Continue the run of checkpoint `path`, written at this layout or any other (resharded on load)."""
        meta = read_meta(path)
        if meta.get("format") != FORMAT:
            raise ConfigError(f"checkpoint {path} has format {meta.get('format')!r} (written by an older memtrain, "
                              f"before sharded checkpoints); this version resumes {FORMAT!r} only: finish the run "
                              f"with the version that wrote it, or export its weights (memtrain export-hf) and "
                              f"import them (memtrain import-hf)")
        saved_model = meta["config"]["model"]
        changed = sorted(k for k, v in dataclasses.asdict(self.cfg.model).items() if saved_model.get(k) != v)
        if changed:
            raise ConfigError(f"checkpoint {path} holds another model (model.{', model.'.join(changed)} differ): "
                              f"resume with the checkpoint's config ({path.parent.parent / 'config.toml'})")
        saved = meta["layout"]
        same_layout = all(saved.get(k, 1) == getattr(self.layout, k) for k in ("world", "tp", "pp", "cp", "dp"))
        # the stream position is global and the schedule the same on every rank: at another layout every rank
        # takes rank 0's file (its RNG too: no per-rank random state survives a change of layout)
        problem = None
        try:
            state, _ = load_checkpoint(path, self.layout.rank if same_layout else 0)
        except CheckpointError as e:
            problem = e
        if not all_ok(problem is None):  # every rank reads its file before any goes on (the load is collective)
            raise problem or CheckpointError(f"another rank could not read its part of checkpoint {path} (see its "
                                             f"error): resume from another one (RUN_DIR/checkpoints/)")
        if "engine" not in state:
            raise CheckpointError(f"checkpoint {path}: rank file holds no engine state (not written by memtrain?)")
        self.engine.load(path, state["engine"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if not same_layout and self.is_main:
            print(f"resumed step {self.step} of a run saved at layout {_layout_text(saved)} on "
                  f"{_layout_text(dataclasses.asdict(self.layout))}", flush=True)

    # ---- one step --------------------------------------------------------------------------------

    def _tokens_this_step(self) -> int:
        """Tokens of each sample used at this step (a curriculum of the memory kind grows it; else seq_len)."""
        curriculum = self.memory.tokens_for_step
        if curriculum is None:
            return self.cfg.data.seq_len
        return curriculum(self.cfg.model, self.step, self.cfg.data.seq_len)

    def _divergence_message(self, loss: float) -> str:
        """What went wrong at the step being trained, what to try, and which checkpoint is intact."""
        hint = self.memory.divergence_hint(self.cfg.model)
        saved = list_checkpoints(self.ckpt_root)
        return (f"loss became {loss} at step {self.step + 1}: lower optim.lr or check the data"
                + (f"; {hint}" if hint else "")
                + (f"; newest intact checkpoint: {saved[-1]}" if saved else "; no checkpoint was written yet"))

    def train_step(self, batches: list, tokens: int | None = None) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches cut to `tokens` (default: this step's curriculum
        length); returns (loss averaged over DP, grad norm)."""
        return self.engine.train_step(batches, tokens=tokens or self._tokens_this_step())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `logging.eval_batches` batches of the val stream (same ones every time)."""
        stream = iter(build_stream(self.cfg.data, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp, split="val"))
        return self.engine.eval_loss([next(stream) for _ in range(self.cfg.logging.eval_batches)])

    # ---- the loop --------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        """True once any rank got SIGTERM/SIGINT (ranks agree, so they all save the same step)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=collective_device())
        if dist.is_initialized() and self.layout.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True  # finish the step in flight, then save and leave
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)

    def _log(self, scalars: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": self.step, **scalars}) + "\n")
            self.metrics.flush()
        if self.writer is not None and (self.step % self.cfg.logging.every == 0 or self.step == self.cfg.schedule.steps
                                        or any(k.startswith("eval/") for k in scalars)):
            self.writer.log(self.step, scalars)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.schedule.steps
        bar = None
        if self.is_main and cfg.logging.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        self._install_signal_handlers()
        from .flops import FORMULA, flops_per_token, peak_flops
        precision = getattr(self.engine, "precision", "fp32")  # MFU against the peak of what the matmuls run in
        peak, peak_source = peak_flops(self.device, cfg.logging.peak_tflops, precision)
        flops: dict[int, float] = {}  # FLOPs per token by sequence length (the RMT curriculum changes it)
        if self.is_main:
            print(f"# MFU: FLOPs/token = {FORMULA}; peak {peak / 1e12:.2f} TFLOP/s per device from {peak_source}",
                  flush=True)
        stream = iter(self.stream)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        losses: list[float] = []
        eval_loss = None
        t_last = time.perf_counter()
        interrupted = False
        smooth = None  # tokens/s shown on the progress bar
        while self.step < total:
            batches = [next(stream) for _ in range(cfg.optim.grad_accum)]
            lr = self.engine.lr  # the rate this step uses (the schedule moves on inside the step)
            if self.gate_stats is not None:  # collected only on the steps whose scalars reach tensorboard
                self.gate_stats.active = (self.step + 1) % cfg.logging.every == 0 or self.step + 1 == total
            n = self._tokens_this_step()  # of this step (a curriculum moves it with the step)
            loss, norm = self.train_step(batches, n)
            if not math.isfinite(loss):
                raise TrainingDiverged(self._divergence_message(loss))
            self.step += 1
            now = time.perf_counter()
            tokens = cfg.data.batch_size * n * self.layout.dp * cfg.optim.grad_accum
            tok_s = tokens / max(now - t_last, 1e-9)
            t_last = now
            if n not in flops:
                flops[n] = flops_per_token(self.model, n, self.layout.tp)
            mfu = tok_s * flops[n] / (peak * self.layout.world)
            losses.append(loss)
            gates = self.gate_stats.collect() if self.gate_stats is not None else {}
            self._log({"loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tok_s, "mfu": mfu, **gates})
            if cfg.logging.eval_every and (self.step % cfg.logging.eval_every == 0 or self.step == total):
                eval_loss = self.evaluate()
                self._log({"eval/loss": eval_loss})
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if bar is not None:
                # smoothed over ~10 steps: a single step's rate jumps with logging, evaluation and checkpoints
                smooth = tok_s if smooth is None else 0.9 * smooth + 0.1 * tok_s
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{smooth:,.0f}",
                                mfu=f"{smooth * flops[n] / (peak * self.layout.world):.1%}")
                bar.update(1)
            if self._should_stop():
                interrupted = True
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                self.save()
        if bar is not None:
            bar.close()
        if self.metrics is not None:
            self.metrics.close()
        done = self.ckpt_root / f"step_{self.step:08d}"
        ckpt = done if not losses and (done / "meta.json").is_file() else self.save()  # nothing new: keep it
        if self.writer is not None:
            self.writer.close()
        summary = {"steps": self.step, "interrupted": interrupted, "trained": len(losses),
                   "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                   "last10_loss": float(np.mean(losses[-10:])) if losses else None, "eval_loss": eval_loss,
                   "checkpoint": str(ckpt), "tensorboard": str(self.run_dir / "tb")}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
