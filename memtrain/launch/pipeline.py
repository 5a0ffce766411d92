"""Pipeline parallelism: the decoder as a DeepSpeed PipelineModule (the stages; the engine that trains them is
memtrain/train/engines/pipeline.py).

    pipe = build_pipeline(model, layout)               # model: DecoderLM built on every rank, same seed

Layers (DeepSpeed passes one tensor from layer to layer; see docs/pipeline.md):

    0      token embedding           ids [B, T] -> h [B, T, D]      TiedLayerSpec "tokens" when tied
    1      meta-token prefix         h -> [B, P + T, D]             Embed.meta
    2..L+1 blocks                    h -> h                         blocks.i
    L+2    head                      h -> logits [B, T, V / tp]     head (norm, projection, padding mask)
    L+3    tied weight, last stage   logits -> logits               TiedLayerSpec "tokens" (tied only)

The model is any kind whose spec says `pipeline = "stages"` (memtrain/model/memory): the baseline, or Titans
lmm/mac/mag/mal (a TitansBlock runs its memory over the whole sequence inside its forward, from M_0, so the
blocks are tensor -> tensor layers like the baseline's). The RMT has its own schedule
(memtrain/train/engines/rmt_pipeline.py: its memory cycles from the last stage back to the first).

Every rank builds the whole DecoderLM with the same seed, so its weights are the single-process ones,
and the PipelineModule keeps the stage's own modules (the same objects, not copies). With tied
embeddings the head keeps projecting with `embed.tokens`; the last stage registers that module as
DeepSpeed's tied module "tokens", so it owns the weight, its gradient is all-reduced with the first
stage's and it is updated alike. Ranks are laid out as megatron's groups are (tp fastest, then cp, dp, pp)
by DeepSpeed's PipeModelDataParallelTopology, whose data axis is data × context parallel. Context parallel
inside a stage: each rank gets its slice of the sequences (the engine's `train_step`), the blocks reach the other slices
through `factory.sequence` (halo, gathered K/V, memory hand-off) exactly as without pipelining.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from memtrain.model.memory import memory_spec
from memtrain.model.transformer import DecoderLM, prepend

from .config import LayoutError
from .groups import Layout

TIED_KEY = "tokens"


def check_pipeline_model(memory: str, pp: int) -> None:
    """Raise LayoutError (one line) when a model of kind `memory` cannot be split into `pp` > 1 DeepSpeed stages.

    The kind's spec says how it pipelines (memtrain/model/memory): "stages" kinds (the baseline, the Titans
    models, whose blocks run their memory over the whole sequence inside their own forward) pass only hidden
    states between stages; "own" kinds (the RMT: its memory cycles from the last stage back to the first) run
    their own schedule, `spec.pipeline_engine`, which the engine builder picks.
    """
    spec = memory_spec(memory)
    if pp > 1 and spec.pipeline == "own":
        raise LayoutError(f"DeepSpeed's pipeline schedule cannot run model.memory={memory!r} at parallel.pp={pp}: "
                          f"use {spec.pipeline_engine.replace(':', '.')}, which the trainer picks for it")
    if pp > 1 and spec.pipeline != "stages":
        raise LayoutError(f"parallel.pp={pp} does not support model.memory={memory!r}: set parallel.pp=1")


class _Existing(TiedLayerSpec):
    """A TiedLayerSpec that hands over a module already built (and initialised) instead of building one."""

    def __init__(self, key: str, module: nn.Module, forward_fn=None):
        super().__init__(key, type(module), forward_fn=forward_fn, tied_weight_attr=["weight"])
        self.module = module

    def build(self, log: bool = False) -> nn.Module:
        return self.module


class MetaPrefix(nn.Module):
    """Prepends the learned meta tokens (the parameter `Embed.meta`, shared): `[B, T, D]` -> `[B, P + T, D]`, then
    (sequence parallelism) keeps this rank's rows, as `Embed.forward` does."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.meta = embed.meta  # the same Parameter object (or None without meta tokens)
        self.region = embed.region

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.region.scatter(prepend(self.meta, h))


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


def stage_parts(cfg, pp: int, stage: int) -> set[str]:
    """The model parts ("embed", "blocks.{i}", "head") pipeline stage `stage` of `pp` holds, computed from the config
    alone as `build_pipeline`'s PipelineModule partitions its layers (blocks balanced over the stages by DeepSpeed's
    `partition_balanced`, the embedding first, the head and the tied embedding's second copy last): what a rank
    builds with storage (`LayerFactory.holds`)."""
    from deepspeed.runtime import utils as ds_utils
    layers = ["embed", "embed", *(f"blocks.{i}" for i in range(cfg.n_layers)), "head"]
    if cfg.tie_embeddings:
        layers.append("embed")
    weights = [1 if name.startswith("blocks.") else 0 for name in layers]
    bounds = ds_utils.partition_balanced(weights=weights, num_parts=pp)
    return set(layers[bounds[stage]:bounds[stage + 1]])


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
