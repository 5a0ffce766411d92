"""The decoder language model as a flat list of stages.

    tokens [B, T] -> Embed -> h [B, P+T, D] -> Block × L -> Head -> logits [B, T, V]

Each stage takes and returns plain tensors, so the same modules can run in one process, as DeepSpeed
pipeline `LayerSpec`s, or slice by slice under context parallelism (docs/distributed.md). Meta tokens are
prepended by `Embed` and removed by `Head`; in between they are ordinary positions that every query
may attend to.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .factory import LayerFactory
from .layers import Block, RMSNorm


CHECKPOINT_MODES = ("none", "full", "selective")


@functools.cache
def _matmul_ops() -> frozenset:
    """The aten matmul overloads every projection (nn.Linear, megatron's layers, einsum) dispatches to."""
    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in ("mm", "addmm", "bmm", "baddbmm") if hasattr(aten, name))


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep what the matmuls produced (the costly part to recompute, and small
    next to attention scores and memory-kernel intermediates), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in _matmul_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def run_checkpointed(mode: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its activations recomputed in the backward per `mode`: "none" (kept), "full" (all
    recomputed: only the inputs are kept) or "selective" (matmul outputs kept, the rest recomputed). Outside
    autograd (no grad, eval) it is a plain call."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    context = {}
    if mode == "selective":
        context["context_fn"] = lambda: create_selective_checkpoint_contexts(_keep_matmuls)
    return checkpoint(fn, *args, use_reentrant=False, **context, **kwargs)


class LMOutput(NamedTuple):
    """Model output; a tuple so `out[0]` is the logits. With TP > 1 the logits are this rank's vocab slice."""

    logits: torch.Tensor
    """`[B, T, V]` (padding rows of the vocabulary removed at TP = 1)."""
    loss: torch.Tensor | None = None
    """Mean next-token loss when targets were given."""
    state: Any = None
    """Recurrent state to pass to the next call (memory models, e.g. `memtrain.model.memory.rmt.model.RMTState`); None otherwise."""


def prepend(prefix: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """The one place the learned prefix rows enter a sequence: prefix `[P, D]` (meta tokens; None = no rows) in
    front of h `[B, N, D]` -> `[B, P + N, D]`, in h's dtype, the same rows for every sequence of the batch."""
    if prefix is None:
        return h
    return torch.cat([prefix.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1), h], dim=1)


class Embed(nn.Module):
    """Token embedding plus the learned meta tokens: ids `[B, T]` -> h `[B, P + T, D]` (under sequence parallelism
    this rank's rows `[B, (P + T) / tp, D]`: memtrain/model/factory.py, `RegionOps`)."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory):
        super().__init__()
        self.region = factory.region
        self.tokens = factory.embedding(cfg.padded_vocab_size, cfg.d_model, std=cfg.init_std)
        # Meta tokens are replicated on every TP rank: their gradients agree because h is replicated.
        self.meta = nn.Parameter(torch.randn(cfg.num_meta_tokens, cfg.d_model) * cfg.init_std) \
            if cfg.num_meta_tokens else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.region.scatter(prepend(self.meta, self.tokens(ids)))


class Head(nn.Module):
    """Final norm, meta tokens dropped, output projection: h `[B, P + T, D]` -> logits `[B, T, V_local]`.

    Under sequence parallelism h is this rank's rows: the norm runs on them, the projection on the whole sequence
    (gathered by `region.enter`), so every TP rank gets the logits of every position for its vocabulary slice.

    Logits of vocabulary padding rows are pushed to the dtype's minimum so they never take probability
    mass: the loss is then the same whatever the padding (and thus whatever the TP size).
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, embed: Embed):
        super().__init__()
        self.num_prefix = cfg.num_meta_tokens
        self.vocab_size = cfg.vocab_size
        self.region = factory.region
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, factory.region)
        tied = embed.tokens if cfg.tie_embeddings else None
        self.proj = factory.lm_head(cfg.d_model, cfg.padded_vocab_size, std=cfg.init_std, tied=tied)
        start, end = factory.vocab_range(cfg.padded_vocab_size)
        self.register_buffer("pad_mask", torch.arange(start, end) >= cfg.vocab_size, persistent=False)
        self.has_padding = end > cfg.vocab_size  # a Python bool: no device sync per forward

    def forward(self, h: torch.Tensor, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Logits of rows [start, stop) of the whole sequence (default: all rows after the meta tokens)."""
        start = self.num_prefix if start is None else start
        if self.region.active:  # the norm on this rank's rows, then the whole sequence for the projection
            x = self.region.narrow(self.region.enter(self.norm(h)), start, stop)
        else:
            x = self.norm(h[:, start:stop])
        logits = self.proj(x)
        if self.has_padding:
            logits = logits.masked_fill(self.pad_mask, torch.finfo(logits.dtype).min)
        return logits


def build_parts(model: nn.Module, cfg: ModelConfig, factory: LayerFactory, block: type) -> None:
    """`model.embed`, `model.blocks` (of class `block`) and `model.head`, each drawn from its own random stream
    (seeded from one draw of the current one), so a part's initial weights do not depend on which other parts
    this process builds. Parts `factory.holds` declines are built on the meta device: a pipeline stage builds
    only its own layers, and a model too large for one device is never whole anywhere."""
    base = int(torch.randint(0, 2**31 - 1, (), device="cpu"))  # the CPU generator, whatever the default device

    def part(name: str, index: int, make):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base + index)
            if factory.holds is None or factory.holds(name):
                return make()
            with torch.device("meta"):
                return make()

    model.embed = part("embed", 0, lambda: Embed(cfg, factory))
    model.blocks = nn.ModuleList(part(f"blocks.{i}", i + 1, lambda i=i: block(cfg, factory, i))
                                 for i in range(cfg.n_layers))
    model.head = part("head", cfg.n_layers + 1, lambda: Head(cfg, factory, model.embed))


class DecoderLM(nn.Module):
    """Decoder LM with meta tokens, GQA, RoPE, SwiGLU and per-layer global or windowed attention."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory | None = None):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size is 0: set it or let the trainer take it from the dataset")
        factory = factory or LayerFactory()
        if cfg.kv_heads % factory.tp_size or cfg.padded_vocab_size % factory.tp_size:
            raise ValueError(
                f"tensor-parallel size {factory.tp_size} must divide model.n_kv_heads={cfg.kv_heads} "
                f"and the padded vocabulary {cfg.padded_vocab_size}")
        self.cfg = cfg
        self.factory = factory
        self.activation_checkpoint = "none"
        build_parts(self, cfg, factory, Block)

    def set_activation_checkpoint(self, mode: str) -> None:
        """Recompute each block's activations in the backward: "none", "full" or "selective" (see
        `run_checkpointed`). Every memory kind runs its blocks through `run_block`, so all of them obey it."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpoint mode {mode!r} is not one of {', '.join(CHECKPOINT_MODES)}")
        self.activation_checkpoint = mode

    def run_block(self, fn, *args, **kwargs):
        """One block's call `fn(*args, **kwargs)` (a block, or its `step`) under this model's checkpoint mode."""
        return run_checkpointed(self.activation_checkpoint, fn, *args, **kwargs)

    def stages(self) -> list[nn.Module]:
        """The model as a flat sequence of tensor -> tensor stages (for pipeline parallelism)."""
        return [self.embed, *self.blocks, self.head]

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ValueError for inputs the model cannot take (cheap checks, before any compute)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        B, T = tokens.shape
        if B == 0 or T == 0:
            raise ValueError(f"empty batch: tokens have shape {tuple(tokens.shape)}")
        T = T * self.factory.sequence.size  # under context parallelism `tokens` is this rank's slice
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        lo, hi = (int(v) for v in torch.aminmax(tokens))  # one device sync for both bounds
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got min {lo} max {hi}")

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        """tokens `[B, T]` (and optional targets `[B, T]`) -> LMOutput(logits `[B, T, V]`, mean loss).

        Under context parallelism (`factory.sequence`) tokens, targets and logits are this rank's slice of the
        sequence and the loss is the mean over the slice (ranks hold equal slices: their mean is the full loss).
        """
        self.check_tokens(tokens)
        offset = self.factory.sequence.text_offset(tokens.shape[1])  # rotary position of the first token
        h = self.embed(tokens)
        for block in self.blocks:
            h = self.run_block(block, h, pos_offset=offset)
        return self.lm_output(self.head(h), targets)

    def lm_output(self, logits: torch.Tensor, targets: torch.Tensor | None, state: Any = None) -> LMOutput:
        """The tail every kind's forward ends with: mean loss over logits `[B, T, V_local]` when targets are given,
        and (TP = 1) the vocabulary padding columns cut from the logits returned."""
        loss = None if targets is None else self.factory.cross_entropy(logits, targets).mean()
        if self.factory.tp_size == 1:
            logits = logits[..., : self.cfg.vocab_size]
        return LMOutput(logits, loss, state)

    def num_params(self, *, embedding: bool = True) -> int:
        """Parameters on this rank (tied weights once); `embedding=False` leaves out the token embedding."""
        n = sum(p.numel() for p in self.parameters() if not p.is_meta)  # a pipeline stage: its own parts
        if not embedding and not self.embed.tokens.weight.is_meta:
            n -= self.embed.tokens.weight.numel()
        return n


def build_model(cfg: ModelConfig, factory: LayerFactory | None = None) -> DecoderLM:
    """Build the model of kind `cfg.memory` (memtrain/model/memory) with layers from `factory` (plain when None)."""
    from .memory import memory_spec
    return memory_spec(cfg.memory).build(cfg, factory)
