"""Pipeline parallelism: the decoder as a DeepSpeed PipelineModule, and an engine behind our interface.

    pipe = build_pipeline(model, layout)               # model: DecoderLM built on every rank, same seed
    engine = PipelineEngine(model, cfg, layout, run_dir, bf16)
    loss = engine.train_batch(batches)                 # all micro-batches: forward, backward, update
    norm = engine.step()                               # the gradient norm of that update

Layers (DeepSpeed passes one tensor from layer to layer; see docs/pipeline.md):

    0      token embedding           ids [B, T] -> h [B, T, D]      TiedLayerSpec "tokens" when tied
    1      meta-token prefix         h -> [B, P + T, D]             Embed.meta
    2..L+1 blocks                    h -> h                         blocks.i
    L+2    head                      h -> logits [B, T, V / tp]     head (norm, projection, padding mask)
    L+3    tied weight, last stage   logits -> logits               TiedLayerSpec "tokens" (tied only)

The model is a DecoderLM or a TitansDecoderLM (memory lmm/mac/mag/mal: a TitansBlock runs its memory over the
whole sequence inside its forward, from M_0, so the blocks are tensor -> tensor layers like the baseline's). RMT
has its own schedule (memtrain/launch/rmt_pipeline.py: its memory cycles from the last stage back to the first).

Every rank builds the whole DecoderLM with the same seed, so its weights are the single-process ones,
and the PipelineModule keeps the stage's own modules (the same objects, not copies). With tied
embeddings the head keeps projecting with `embed.tokens`; the last stage registers that module as
DeepSpeed's tied module "tokens", so it owns the weight, its gradient is all-reduced with the first
stage's and it is updated alike. Ranks are laid out as megatron's groups are (tp fastest, then cp, dp, pp)
by DeepSpeed's PipeModelDataParallelTopology, whose data axis is data × context parallel. Context parallel
inside a stage: each rank gets its slice of the sequences (`train_batch`), the blocks reach the other slices
through `factory.sequence` (halo, gathered K/V, memory hand-off) exactly as without pipelining.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from memtrain.model.config import TITANS_KINDS
from memtrain.model.titans import TitansDecoderLM
from memtrain.model.transformer import DecoderLM

from .config import LayoutError
from .groups import Layout

TIED_KEY = "tokens"


def check_pipeline_model(memory: str, pp: int) -> None:
    """Raise LayoutError (one line) when a model of kind `memory` cannot be split into `pp` > 1 stages.

    The baseline and the Titans models (lmm/mac/mag/mal) pipeline: a Titans block runs its memory over the whole
    sequence inside its own forward (training starts every sequence from M_0), so only hidden states cross
    stages. RMT does not: its memory cycles from the last stage of segment s back to the first stage of segment s+1,
    which DeepSpeed's schedule (one pass per micro-batch) cannot express; memtrain/launch/rmt_pipeline.py runs it.
    """
    if pp > 1 and memory == "rmt":
        raise LayoutError(f"DeepSpeed's pipeline schedule cannot run model.memory='rmt' at parallel.pp={pp} (its "
                          f"memory cycles from the last stage back to the first): use memtrain.launch.rmt_pipeline."
                          f"RMTPipelineEngine, which the trainer picks for RMT")
    if pp > 1 and memory != "none" and memory not in TITANS_KINDS:
        raise LayoutError(f"parallel.pp={pp} does not support model.memory={memory!r}: set parallel.pp=1")


class _Existing(TiedLayerSpec):
    """A TiedLayerSpec that hands over a module already built (and initialised) instead of building one."""

    def __init__(self, key: str, module: nn.Module, forward_fn=None):
        super().__init__(key, type(module), forward_fn=forward_fn, tied_weight_attr=["weight"])
        self.module = module

    def build(self, log: bool = False) -> nn.Module:
        return self.module


class MetaPrefix(nn.Module):
    """Prepends the learned meta tokens (the parameter `Embed.meta`, shared): `[B, T, D]` -> `[B, P + T, D]`."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.meta = embed.meta  # the same Parameter object (or None without meta tokens)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.meta is None:
            return h
        return torch.cat([self.meta.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1), h], dim=1)


def _tied_weight_holder(module: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Forward of the last stage's tied layer: the head already projected with the weight; pass through."""
    return logits


class PipelineLoss:
    """`loss_fn(logits, targets)` for DeepSpeed: the model's (vocab-parallel) cross entropy, mean over tokens."""

    def __init__(self, factory):
        self.factory = factory

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.factory.cross_entropy(logits, targets).mean()


def layer_prefixes(model: DecoderLM) -> list[str]:
    """DecoderLM module name of each pipeline layer index (the table in this module's docstring)."""
    n = model.cfg.n_layers
    prefixes = ["embed.tokens", "embed", *(f"blocks.{i}" for i in range(n)), "head"]
    if model.cfg.tie_embeddings:
        prefixes.append("embed.tokens")
    return prefixes


def pipeline_to_model_names(model: DecoderLM, keys) -> dict[str, str]:
    """DecoderLM names of PipelineModule state-dict / parameter keys.

    `"{i}.rest"` is layer i's `rest` (DecoderLM name `layer_prefixes(model)[i] + ".rest"`), and
    `"tied_modules.tokens.rest"` is the tied token embedding (`"embed.tokens.rest"`). The files of a
    DeepSpeed pipeline checkpoint, `layer_{i:02d}-model_{tp:02d}-model_states.pt`, hold layer i's `rest` keys.
    """
    prefixes = layer_prefixes(model)
    names = {}
    for key in keys:
        head, rest = key.split(".", 1)
        if head == "tied_modules":
            tied, rest = rest.split(".", 1)
            assert tied == TIED_KEY, key
            names[key] = f"embed.tokens.{rest}"
        else:
            names[key] = f"{prefixes[int(head)]}.{rest}"
    return names


def build_pipeline(model: DecoderLM, layout: Layout, *, activation_checkpoint_interval: int = 0,
                   partition_method: str | None = None) -> PipelineModule:
    """The DeepSpeed PipelineModule of `model` over the layout's tp × cp × dp × pp ranks (collective).

    `activation_checkpoint_interval` k > 0 recomputes every k consecutive blocks in the backward instead of
    keeping their activations (1: per layer); embedding and head are never recomputed. Blocks are split
    evenly over stages by default (`partition_method` takes DeepSpeed's names: "parameters", "uniform", ...).
    """
    check_pipeline_model(model.cfg.memory, layout.pp)
    if type(model) is not DecoderLM and not isinstance(model, TitansDecoderLM):
        raise LayoutError(f"parallel.pp={layout.pp}: {type(model).__name__} has no pipeline stages: set parallel.pp=1")
    if layout.pp > model.cfg.n_layers:
        raise LayoutError(f"parallel.pp={layout.pp} is more pipeline stages than model.n_layers="
                          f"{model.cfg.n_layers} blocks: set parallel.pp <= {model.cfg.n_layers} or add layers")
    if model.factory.tp_size != layout.tp:
        raise LayoutError(f"the model was built for tensor-parallel size {model.factory.tp_size}, the layout has "
                          f"parallel.tp={layout.tp}: build it with memtrain.launch.tensor_parallel.MegatronFactory")
    import deepspeed
    if not deepspeed.comm.is_initialized():  # PipelineModule talks through deepspeed.comm (wraps torch's group)
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    tied = model.cfg.tie_embeddings
    tokens = model.embed.tokens
    layers: list = [_Existing(TIED_KEY, tokens) if tied else tokens, MetaPrefix(model.embed), *model.blocks,
                    model.head]
    if tied:
        layers.append(_Existing(TIED_KEY, tokens, forward_fn=_tied_weight_holder))
    block_types = sorted({type(b).__name__ for b in model.blocks})
    # DeepSpeed's data axis is data × context parallel (cp fastest): the pipeline engine averages gradients and
    # losses over it, which is right for CP ranks too (equal slices of the same sequences).
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp * layout.cp)
    coord = topology.get_coord(layout.rank)
    data_rank = layout.cp_rank + layout.cp * layout.dp_rank
    if (coord.pipe, coord.data, coord.model) != (layout.pp_rank, data_rank, layout.tp_rank):
        raise RuntimeError(f"rank {layout.rank}: DeepSpeed topology {coord} disagrees with the layout {layout}")
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and (
            ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True),
            ps.get_tensor_model_parallel_rank()) != tuple(coord):
        raise RuntimeError(f"rank {layout.rank}: megatron-core's groups disagree with DeepSpeed's topology {coord}")
    return PipelineModule(
        layers=layers, topology=topology, loss_fn=PipelineLoss(model.factory),
        partition_method=partition_method or f"type:^({'|'.join(block_types)})$",
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=block_types)  # never the embedding: its input (ids) needs no gradient


def stage_parameters(pipe: PipelineModule, model: DecoderLM) -> dict[str, nn.Parameter]:
    """This stage's parameters under their DecoderLM names (the tied weight on first and last stage)."""
    named = dict(pipe.named_parameters())
    return {model_name: named[key] for key, model_name in pipeline_to_model_names(model, named).items()}


def pipeline_grad_norm(pipe: PipelineModule, tp_group=None) -> float:
    """Global gradient L2 norm of the whole model, the single-process number.

    TP-split parameters are summed over the TP group, replicated ones (norms, meta tokens) counted once per
    stage, the second copy of the tied weight (`ds_pipe_replicated`) not at all; stages sum over the pipe.
    DeepSpeed's own fp32 clip counts replicated weights on one rank of the whole pipe × tp slice only.
    """
    from memtrain.launch.tensor_parallel import partition_dim
    split = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in pipe.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if partition_dim(p) is None:
            replicated += sq
        else:
            split += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(split, group=tp_group)
    total = split + replicated
    grid = pipe.mpu()
    if grid.get_pipe_parallel_world_size() > 1:
        dist.all_reduce(total, group=grid.get_pipe_parallel_group())
    return float(total.sqrt())


class PipelineEngine:
    """DeepSpeed's PipelineEngine behind the interface of memtrain.train.engine.DeepSpeedEngine, plus `train_batch`.

    DeepSpeed runs every micro-batch of a step inside `train_batch` (forward, backward, gradient reduction,
    update), so `backward(loss)` does not exist here: the trainer calls `train_batch(batches)`, then `step()`
    for the gradient norm. ZeRO 0 or 1; with ZeRO 0 in fp32 the clip uses `pipeline_grad_norm`.
    """

    def __init__(self, model: DecoderLM, cfg, layout: Layout, run_dir: Path | None, bf16: bool, *,
                 activation_checkpoint_interval: int | None = None):
        import deepspeed

        from memtrain.launch.deepspeed_config import deepspeed_json
        from memtrain.train.optim import build_optimizer, build_scheduler

        if cfg.parallel.zero_stage > 1:
            raise LayoutError(f"parallel.zero_stage={cfg.parallel.zero_stage} cannot run with parallel.pp="
                              f"{layout.pp}: set parallel.zero_stage=1 or parallel.pp=1")
        if activation_checkpoint_interval is None:
            activation_checkpoint_interval = getattr(cfg.parallel, "activation_checkpoint_interval", 0)
        self.model = model
        self.pipe = build_pipeline(model, layout, activation_checkpoint_interval=activation_checkpoint_interval)
        optimizer = build_optimizer(self.pipe, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule)
        self.zero_stage = cfg.parallel.zero_stage
        self.grad_clip = cfg.optim.grad_clip
        # ZeRO 0 in fp32: we clip (DeepSpeed's fp32 clip gets the norm wrong under PP, see pipeline_grad_norm).
        self.own_clip = self.zero_stage == 0 and not bf16
        self.json = deepspeed_json(micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                                   zero_stage=self.zero_stage, grad_clip=0.0 if self.own_clip else self.grad_clip,
                                   bf16=bf16)
        self.json["pipeline"] = {"activation_checkpoint_interval": activation_checkpoint_interval}
        if layout.rank == 0 and run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed.json").write_text(json.dumps(self.json, indent=2))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.pipe, optimizer=optimizer, lr_scheduler=scheduler, config=self.json)
        self.module = self.engine.module  # the PipelineModule (not callable like the model: use train_batch)
        self.tp_group = None
        if layout.tp > 1:
            from memtrain.launch.groups import tensor_parallel_group
            self.tp_group = tensor_parallel_group()
        self._norm = float("nan")
        # context parallel: every stage gets this rank's slice of the sequences (the blocks exchange halos)
        self._local = model.factory.sequence.local_slice if layout.cp > 1 else None
        self._take_model_step = self.engine._take_model_step
        self.engine._take_model_step = self._clip_then_step  # runs inside train_batch, after the reductions

    def _clip_then_step(self, *args, **kwargs):
        if self.own_clip:
            self._norm = pipeline_grad_norm(self.pipe, self.tp_group)
            if self.grad_clip > 0 and self._norm > self.grad_clip:
                scale = self.grad_clip / (self._norm + 1e-6)
                for p in self.pipe.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return self._take_model_step(*args, **kwargs)

    def _pairs(self, batches, tokens: int | None):
        for b in batches:
            x, y = (b.inputs, b.targets) if hasattr(b, "inputs") else b
            if tokens:
                x, y = x[:, :tokens], y[:, :tokens]
            yield (self._local(x), self._local(y)) if self._local is not None else (x, y)

    def train_batch(self, batches, tokens: int | None = None) -> float:
        """One optimizer step over the micro-batches `batches` (objects with .inputs/.targets, or pairs);
        returns the loss averaged over micro-batches and data (× context) parallel ranks, on every rank.
        Batches are whole sequences: under context parallelism each rank takes its slice here."""
        if len(batches) != self.engine.micro_batches:
            raise ValueError(f"the pipeline engine takes {self.engine.micro_batches} micro-batches a step "
                             f"(optim.grad_accum), got {len(batches)}")
        loss = self.engine.train_batch(iter(list(self._pairs(batches, tokens))))
        if not self.own_clip:
            norm = self.engine.get_global_grad_norm()
            self._norm = float(norm) if norm is not None else float("nan")
        return float(loss)

    @torch.no_grad()
    def eval_batch(self, batches, tokens: int | None = None) -> float:
        """Mean loss over `batches` (no update), averaged over data-parallel ranks, on every rank."""
        pairs = list(self._pairs(batches, tokens))
        return float(self.engine.eval_batch(iter(pairs), num_micro_batches=len(pairs)))

    def backward(self, loss: torch.Tensor) -> None:
        raise RuntimeError("the pipeline engine runs forward and backward together: call train_batch(batches)")

    def step(self) -> float:
        """The update already ran inside `train_batch`; report its global gradient norm."""
        return self._norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        """This stage's weights (TP shards) under DecoderLM names; merge stages by taking the union."""
        return {name: p.detach() for name, p in stage_parameters(self.pipe, self.model).items()}

    def save(self, directory: Path) -> dict:
        from memtrain.launch.deepspeed_config import save_engine_state
        save_engine_state(self.engine, directory)
        return {}

    def load(self, directory: Path, state: dict) -> None:
        from memtrain.launch.deepspeed_config import load_engine_state
        load_engine_state(self.engine, directory, LayoutError(
            f"checkpoint {directory} holds no DeepSpeed pipeline state: resume with the same parallel.engine "
            f"and parallel.pp"))

