"""DeepSpeed's pipeline engine behind the `Engine` protocol (memtrain/train/engines/__init__.py).

    engine = PipelineEngine(model, cfg, layout, run_dir, bf16)   # model: DecoderLM built on every rank, same seed
    loss, norm = engine.train_step(batches)                     # all micro-batches: forward, backward, update

The stages themselves (layers, tied embedding, DeepSpeed topology) are built by memtrain/launch/pipeline.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from memtrain.launch.config import LayoutError, check_layout
from memtrain.launch.shm import release_shm_buffers
from memtrain.launch.groups import Layout, tensor_parallel_group
from memtrain.launch.pipeline import build_pipeline, stage_parameters
from memtrain.model.transformer import DecoderLM

from ..optim import build_optimizer, build_scheduler, clip_gradients
from ..sharded import load_tensors, save_tensors
from . import checkpoint_interval, micro_batches
from .state import EngineTensors, engine_tensors, restore_small_state, small_state


class PipelineEngine:
    """DeepSpeed's PipelineEngine (over `memtrain.launch.pipeline.build_pipeline`'s stages) behind `Engine`.

    DeepSpeed runs every micro-batch of a step inside its `train_batch` (forward, backward, gradient reduction,
    update). ZeRO 0 or 1; with ZeRO 0 in fp32 we clip with `grad_norm` over the stages: DeepSpeed's own fp32
    clip counts replicated weights on one rank of the whole pipe × tp slice only, which gets the norm wrong.
    """

    def __init__(self, model: DecoderLM, cfg, layout: Layout, run_dir: Path | None, bf16: bool, *,
                 activation_checkpoint_interval: int | None = None):
        import deepspeed

        from memtrain.launch.deepspeed_config import deepspeed_json

        # the rules of the layout (ZeRO 0/1, stages <= layers, the kind's own) as this process runs it: the
        # layout's sizes, on a pipeline engine
        check_layout(model.cfg, dataclasses.replace(cfg.parallel, tp=layout.tp, pp=layout.pp, cp=layout.cp,
                                                    engine="deepspeed"), cfg.data.seq_len)
        if activation_checkpoint_interval is None:
            activation_checkpoint_interval = checkpoint_interval(cfg.parallel)
        self.model = model
        self.layout, self.stage = layout, layout.pp_rank
        self.pipe = build_pipeline(model, layout, activation_checkpoint_interval=activation_checkpoint_interval)
        optimizer = build_optimizer(self.pipe, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule)
        self.zero_stage = cfg.parallel.zero_stage
        self.grad_clip = cfg.optim.grad_clip
        # ZeRO 0 in fp32: we clip (DeepSpeed's fp32 clip gets the norm wrong under PP: see the class docstring).
        self.own_clip = self.zero_stage == 0 and not bf16
        self.json = deepspeed_json(micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                                   zero_stage=self.zero_stage, grad_clip=0.0 if self.own_clip else self.grad_clip,
                                   bf16=bf16)
        self.json["pipeline"] = {"activation_checkpoint_interval": activation_checkpoint_interval}
        if model.factory.region.active:
            # DeepSpeed splits a stage's output over the TP ranks for the send and all-gathers it on arrival, which
            # assumes TP ranks hold the same tensor; under sequence parallelism each holds its own rows: send whole
            self.json["pipeline"].update(pipe_partitioned=False, grad_partitioned=False)
        if layout.rank == 0 and run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed.json").write_text(json.dumps(self.json, indent=2))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.pipe, optimizer=optimizer, lr_scheduler=scheduler, config=self.json)
        release_shm_buffers()  # DeepSpeed's CPU all-reduce buffers leave /dev/shm with the last rank
        self.module = self.engine.module  # the PipelineModule (not callable like the model: use train_step)
        self.tp_group = tensor_parallel_group() if layout.tp > 1 else None
        grid = self.pipe.mpu()
        self.pipe_group = grid.get_pipe_parallel_group() if grid.get_pipe_parallel_world_size() > 1 else None
        self.params = list(self.pipe.parameters())
        # the gradient norm counts the last stage's second copy of a tied weight (`ds_pipe_replicated`) not at all
        self.counted = [p for p in self.params if not getattr(p, "ds_pipe_replicated", False)]
        self._norm = float("nan")
        # context parallel: every stage gets this rank's slice of the sequences (the blocks exchange halos)
        self._local = model.factory.sequence.local_slice if layout.cp > 1 else None
        self._take_model_step = self.engine._take_model_step
        self.engine._take_model_step = self._clip_then_step  # runs inside DeepSpeed's train_batch, after the reductions

    def _clip_then_step(self, *args, **kwargs):
        if self.own_clip:
            self._norm = clip_gradients(self.params, self.grad_clip, self.tp_group, self.pipe_group,
                                        counted=self.counted)
        return self._take_model_step(*args, **kwargs)

    def train_step(self, batches: list, tokens: int | None = None) -> tuple[float, float]:
        """One optimizer step over the micro-batches `batches` (objects with .inputs/.targets, or pairs; whole
        sequences, cut here to `tokens` and to this rank's CP slice); returns (loss averaged over micro-batches
        and data (× context) parallel ranks, on every rank; the global gradient norm)."""
        if len(batches) != self.engine.micro_batches:
            raise ValueError(f"the pipeline engine takes {self.engine.micro_batches} micro-batches a step "
                             f"(optim.grad_accum), got {len(batches)}")
        self.model.train()
        loss = self.engine.train_batch(iter(micro_batches(batches, tokens, self._local)))
        if not self.own_clip:
            norm = self.engine.get_global_grad_norm()
            self._norm = float(norm) if norm is not None else float("nan")
        return float(loss), self._norm

    @torch.no_grad()
    def eval_loss(self, batches: list) -> float:
        """Mean loss over `batches` (no update), averaged over data-parallel ranks, on every rank."""
        self.model.eval()
        pairs = micro_batches(batches, None, self._local)
        return float(self.engine.eval_batch(iter(pairs), num_micro_batches=len(pairs)))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        """This stage's weights (TP shards) under DecoderLM names; merge stages by taking the union."""
        return {name: p.detach() for name, p in stage_parameters(self.pipe, self.model).items()}

    def state_tensors(self) -> EngineTensors:
        # the last stage's copy of the tied embedding is the first stage's, partitioned differently: saved once
        tied = frozenset({"embed.tokens.weight"}) if self.model.cfg.tie_embeddings and self.stage > 0 else frozenset()
        return engine_tensors(stage_parameters(self.pipe, self.model), self.engine.optimizer, self.layout,
                              skip_save=tied)

    def save(self, directory: Path) -> dict:
        save_tensors(directory / "state", self.state_tensors().save)
        return small_state(self.engine.optimizer, self.scheduler, self.engine)

    def load(self, directory: Path, state: dict) -> None:
        tensors = self.state_tensors()
        load_tensors(directory / "state", tensors.load)
        tensors.finish()
        restore_small_state(state, self.engine.optimizer, self.scheduler, self.engine)
