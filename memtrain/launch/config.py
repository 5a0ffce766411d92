"""Configuration of the parallel layout (the trainer hands this section to `launch`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memtrain.model.config import ModelConfig


class LayoutError(ValueError):
    """The requested parallel layout does not fit the world size or the model; the message says which."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core layers); must divide the attention heads and KV heads."""

    dp: int = 0
    """Data-parallel size; 0 takes what is left of the world size after tensor, context and pipeline
    parallelism."""

    pp: int = 1
    """Pipeline-parallel stages (DeepSpeed's PipelineModule over memtrain/launch/pipeline.py's stages; a memory kind
    may bring its own schedule, the RMT's is memtrain/train/engines/rmt_pipeline.py); at most model.n_layers, and
    only with parallel.zero_stage 0 or 1 (0 for RMT). Ranks are ordered tp fastest, then cp, then dp, then pp
    (megatron's order)."""

    cp: int = 1
    """Context-parallel size: each of cp ranks holds a contiguous slice of every sequence (data.seq_len / cp
    tokens; memtrain/launch/context_parallel.py). Ranks are ordered tp fastest, then cp, then dp, then pp (megatron-core's
    order); CP peers read the same batches. Gradients are averaged, and ZeRO partitions, over data × context
    parallel ranks. With parallel.pp > 1 each stage is context parallel (not for model.memory = "rmt")."""

    sequence_parallel: bool = False
    """Megatron-LM's sequence parallelism inside tensor parallelism: between the TP regions (attention, memory,
    MLP) each of the parallel.tp ranks holds 1/tp of the sequence's rows, so norms, residuals and the activations
    saved for them are not replicated (all-gather in, reduce-scatter out instead of one all-reduce). Needs
    parallel.tp > 1 and sequences whose rows (meta tokens included) divide by parallel.tp. docs/distributed.md."""

    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""

    timeout_s: int = 600
    """Seconds a collective may wait for the other ranks before the job stops (a hung or lost rank)."""

    engine: str = "auto"
    """Who runs the optimizer step: deepspeed, torch (plain loop), or auto (deepspeed when more than one
    process or zero_stage > 0, else torch)."""

    activation_checkpoint: str = "none"
    """Recompute activations in the backward instead of storing them, on every engine: none; full (keep only
    each block's input, recompute the block); selective (keep the matmul outputs, recompute attention and the
    memory's internals). Memory/time per mode: docs/distributed.md. Pipelines: full = one block per
    checkpoint (see activation_checkpoint_interval); not with context parallelism yet."""

    activation_checkpoint_interval: int = 0
    """Pipeline engines: recompute every k consecutive blocks in the backward instead of storing their
    activations (1 = every block, 0 = as activation_checkpoint says)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (partitions optimizer state, gradients, parameters over data × context
    parallel ranks)."""


def check_layout(model: ModelConfig, parallel: ParallelConfig, seq_len: int) -> None:
    """Every rule that ties the model to the parallel layout and the training length, for every memory kind: its
    spec (memtrain/model/memory) answers what varies by kind. Raises LayoutError (one line, naming the fix).

    The world-size arithmetic (which sizes divide the world) is `groups.resolve_layout`'s; this needs no world.
    """
    from memtrain.model.errors import ModelConfigError
    from memtrain.model.memory import memory_spec
    spec = memory_spec(model.memory)
    p = parallel
    try:
        spec.check_run(model, p, seq_len)  # the kind's own rules first: they name the kind's fix
    except ModelConfigError as e:
        raise LayoutError(str(e)) from None
    if spec.own_backward(model) and p.zero_stage:
        raise LayoutError(f"model.memory={model.memory!r} runs its own backward here (e.g. memory replay), which "
                          f"DeepSpeed's ZeRO cannot wrap: set parallel.zero_stage=0 (the torch engine runs it)")
    if model.n_heads % p.tp or model.kv_heads % p.tp:
        raise LayoutError(f"parallel.tp={p.tp} must divide model.n_heads={model.n_heads} "
                          f"and model.n_kv_heads={model.kv_heads}")
    check_vocabulary(model, p)
    if p.activation_checkpoint != "none" and p.cp > 1:
        raise LayoutError(f"parallel.activation_checkpoint={p.activation_checkpoint!r} does not run with "
                          f"parallel.cp={p.cp} yet (recomputing a block would repeat its rank-to-rank hand-offs): "
                          f"set parallel.activation_checkpoint='none' or parallel.cp=1")
    if p.activation_checkpoint == "selective" and p.pp > 1:
        raise LayoutError(f"parallel.activation_checkpoint='selective' does not run with parallel.pp={p.pp} "
                          f"(the pipeline engines recompute whole blocks): use 'full'")
    if p.cp > 1:
        if seq_len % p.cp:
            raise LayoutError(f"data.seq_len={seq_len} is not divisible by parallel.cp={p.cp}: every CP rank "
                              f"holds an equal slice; use a multiple of {p.cp}")
        local = seq_len // p.cp
        segment = spec.segment(model)
        if segment and local % segment[0]:
            raise LayoutError(f"parallel.cp={p.cp} gives slices of {local} tokens, not a multiple of "
                              f"{segment[1]}={segment[0]}: each rank must hold whole segments")
        least = spec.cp_min_slice(model)
        if least and local < least[0]:
            raise LayoutError(f"parallel.cp={p.cp} gives slices of {local} tokens, fewer than {least[1]} = "
                              f"{least[0]}: use a longer data.seq_len or a smaller cp")
        if p.zero_stage == 3 and spec.cp_sequential(model):
            raise LayoutError(f"parallel.zero_stage=3 cannot run parallel.cp={p.cp} with model.memory="
                              f"{model.memory!r}: its CP ranks run one after another (memory handed rank to "
                              f"rank) while ZeRO-3 gathers every weight with a collective, a deadlock; use "
                              f"parallel.zero_stage <= 2")
    if p.sequence_parallel:  # after the CP rules: the rows below count this rank's CP slice
        if p.tp == 1:
            raise LayoutError("parallel.sequence_parallel=true splits the sequence over the tensor-parallel ranks: "
                              "set parallel.tp > 1, or parallel.sequence_parallel=false")
        for rows, what in spec.sequence_rows(model, seq_len // p.cp):
            if rows % p.tp:
                raise LayoutError(f"parallel.sequence_parallel=true splits sequences of {rows} rows ({what}) over "
                                  f"parallel.tp={p.tp} ranks: change those settings so it divides by {p.tp}, or set "
                                  f"parallel.sequence_parallel=false")
    if p.pp > 1:
        if spec.pipeline == "unsupported":
            raise LayoutError(f"parallel.pp={p.pp} does not support model.memory={model.memory!r}: "
                              f"set parallel.pp=1")
        if p.engine == "torch":
            raise LayoutError(f"parallel.pp={p.pp} runs on a pipeline engine: set parallel.engine='deepspeed' "
                              f"or 'auto'")
        if p.pp > model.n_layers:
            raise LayoutError(f"parallel.pp={p.pp} is more pipeline stages than model.n_layers={model.n_layers}"
                              f" blocks: set parallel.pp <= {model.n_layers} or add layers")
        if p.zero_stage > 1:
            raise LayoutError(f"parallel.zero_stage={p.zero_stage} cannot run with parallel.pp={p.pp} "
                              f"(DeepSpeed's pipeline takes ZeRO 0 or 1): set parallel.zero_stage=1")


def check_vocabulary(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The padded vocabulary splits evenly over TP ranks (nothing to check while model.vocab_size is 0, i.e. taken
    from the dataset later: the trainer calls this again once it is known)."""
    if model.vocab_size and model.padded_vocab_size % parallel.tp:
        raise LayoutError(f"parallel.tp={parallel.tp} must divide the padded vocabulary {model.padded_vocab_size} "
                          f"(set model.vocab_pad_multiple to a multiple of {parallel.tp})")
