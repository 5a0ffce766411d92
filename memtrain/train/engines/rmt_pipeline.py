"""Pipeline parallelism for the RMT (`model.memory = "rmt"`, `parallel.pp > 1`) with a schedule of our own.

    engine = RMTPipelineEngine(model, cfg, layout, run_dir, bf16)   # model: RMTDecoderLM, same seed everywhere
    loss, norm = engine.train_step(batches, tokens=n)               # every micro-batch: forward, backward, update

The RMT's memory leaves the last block of segment s and enters the first block of segment s + 1: a cycle through
the stages that DeepSpeed's schedule (one pass per micro-batch) cannot express. Here a work item is (segment s,
micro-batch m); stage p runs `segment_blocks` over its blocks for every item, stage 0 also `segment_input`
(embedding, meta tokens, memory rows), the last stage `segment_output` (head, loss, next memory):

    stage 0:      memory(s-1, m) ──► input ─► blocks ─► h ──►
    stage p:                               h ─► blocks ─► h ──►
    stage pp-1:                            h ─► blocks ─► logits, loss_s; memory(s, m) ──► stage 0

GPipe-like: every rank runs the forward of its items in the order sorted by (s, m), keeping their graphs, then
the backward in exactly the reverse order. Sends are non-blocking (`isend`, waited for before the reductions),
receives blocking into tensors whose shapes every stage computes itself (h `[B, N, D]`, N = P + M + l + M_write;
memory `[B, M, D]`). Every dependency points to an earlier item of that one global order (forward: (s, m) on
stage p - 1, or (s - 1, m) on the last stage; backward the mirror image), so the schedule cannot deadlock, and
with >= pp micro-batches the stages overlap. Backward: the last stage runs backward on loss_s + <memory_s, g>,
g being the memory gradient stage 0 sent from the backward of (s + 1, m) (none where `bptt_segments` detaches
the transition or no segment follows); every stage but the first sends the gradient of its input h to the
previous stage; stage 0 sends the gradient of its received memory to the last stage. A partial last segment
(T not a multiple of segment_len) writes no memory, as in the model. The sum of all loss_s is the torch
engine's mean loss, so the gradients are the single-process ones. After the backward: data-parallel mean, the
tied weight's two copies summed over megatron's embedding group (first + last stage), the one `grad_norm` (the
tied weight counted once, stages summed over the pipe group), clip, AdamW and LambdaLR (memtrain/train/optim.py).

Refused (one-line LayoutError): ZeRO, bf16, memory replay, context parallelism, pp < 2. Activation
checkpointing (`parallel.activation_checkpoint_interval` k): torch's non-reentrant checkpoint over every k
consecutive blocks of a stage. Tags tell the four message kinds apart on gloo; their order per rank pair is
the same on both sides (forward messages all precede backward ones), so untagged transports work too.
Stages (which blocks and parameters a stage holds): memtrain/launch/rmt_pipeline.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtrain.launch.config import LayoutError, check_layout
from memtrain.launch.groups import Layout, data_parallel_group, tensor_parallel_group
from memtrain.launch.rmt_pipeline import stage_blocks, stage_parameters

from ..optim import average_gradients, build_optimizer, build_scheduler, clip_gradients
from ..sharded import load_tensors, save_tensors
from . import checkpoint_interval, micro_batches
from .state import EngineTensors, engine_tensors, restore_small_state, small_state

HIDDEN, MEMORY, HIDDEN_GRAD, MEMORY_GRAD = range(4)  # p2p tags


class _Named:
    """`named_parameters()` of a stage, for memtrain.train.optim.build_optimizer (decay grouping by name and shape)."""

    def __init__(self, named: dict[str, nn.Parameter]):
        self.named = named

    def named_parameters(self):
        return iter(self.named.items())


class RMTPipelineEngine:
    """The RMT over `layout.pp` stages behind the `Engine` protocol (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg, layout: Layout, run_dir: Path | None, bf16: bool, *,
                 activation_checkpoint_interval: int | None = None):
        from memtrain.model.memory.rmt.model import RMTDecoderLM

        pp = layout.pp
        if not isinstance(model, RMTDecoderLM):
            raise LayoutError(f"RMTPipelineEngine runs model.memory='rmt', got {type(model).__name__}: use "
                              f"memtrain.train.engines.pipeline.PipelineEngine")
        if pp < 2:
            raise LayoutError(f"RMTPipelineEngine needs parallel.pp >= 2, got {pp}: use the torch engine")
        # the rules of the layout (ZeRO, CP, memory replay, stages <= layers) live in check_layout and the RMT spec
        # (the parallel section as this process runs it: the layout's sizes, on a pipeline engine)
        check_layout(model.cfg, dataclasses.replace(cfg.parallel, tp=layout.tp, pp=pp, cp=layout.cp,
                                                    engine="deepspeed"), cfg.data.seq_len)
        if bf16:
            raise LayoutError(f"bf16 cannot run with model.memory='rmt' at parallel.pp={pp} (the RMT pipeline "
                              f"trains in the weights' dtype): set precision='fp32'")
        if model.factory.tp_size != layout.tp:
            raise LayoutError(f"the model was built for tensor-parallel size {model.factory.tp_size}, the layout "
                              f"has parallel.tp={layout.tp}: build it with memtrain.launch.tensor_parallel.MegatronFactory")
        if activation_checkpoint_interval is None:
            activation_checkpoint_interval = checkpoint_interval(cfg.parallel)
        from megatron.core import parallel_state as ps

        self.model = self.module = model
        self.layout = layout
        self.stage, self.pp = layout.pp_rank, pp
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        stride = layout.tp * layout.cp * layout.dp  # rank = tp_rank + tp · (cp_rank + cp · (dp_rank + dp · pp_rank))
        self.prev_rank, self.next_rank = layout.rank - stride, layout.rank + stride
        self.first_rank = layout.rank - self.stage * stride
        self.last_rank = self.first_rank + (pp - 1) * stride
        self.blocks = stage_blocks(model.cfg.n_layers, pp, self.stage)
        self.named = stage_parameters(model, pp, self.stage)
        self.params = list(self.named.values())
        self.tied = model.cfg.tie_embeddings
        # the tied weight's gradient counts once in the norm, on stage 0 (the last stage holds its second copy)
        self.counted = [p for name, p in self.named.items()
                        if not (self.last and not self.first and self.tied and name == "embed.tokens.weight")]
        self.accum = cfg.optim.grad_accum
        self.grad_clip = cfg.optim.grad_clip
        self.interval = activation_checkpoint_interval
        self.optimizer = build_optimizer(_Named(self.named), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.dp_group = data_parallel_group() if layout.dp > 1 else None
        self.tp_group = tensor_parallel_group() if layout.tp > 1 else None
        self.pipe_group = ps.get_pipeline_model_parallel_group()
        self.embedding_group = ps.get_embedding_group() if self.tied and (self.first or self.last) else None
        self.replicas = layout.tp * layout.dp  # ranks of the last stage: the loss is summed over them
        self._norm = float("nan")
        self._sends: list = []
        self.optimizer.zero_grad(set_to_none=True)

    # ---- communication -----------------------------------------------------------------------------

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self._sends.append((dist.isend(tensor, dst, tag=tag), tensor))  # keep the buffer alive until the wait

    def _recv(self, shape: tuple, src: int, tag: int) -> torch.Tensor:
        p = self.model.memory_init
        buffer = torch.empty(shape, dtype=p.dtype, device=p.device)
        dist.recv(buffer, src, tag=tag)
        return buffer

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    # ---- schedule ----------------------------------------------------------------------------------

    def _pairs(self, batches, tokens: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = micro_batches(batches, tokens, None, self.model.memory_init.device)
        L = self.model.cfg.rmt.segment_len
        for x, _ in pairs:
            if x.shape[1] < L:  # every rank checks the same batch: all stop alike, none waits forever
                raise ValueError(f"training sequence of {x.shape[1]} tokens is shorter than one segment "
                                 f"(model.rmt.segment_len={L}): no memory would be written")
            self.model.check_tokens(x)
        return pairs

    def _blocks(self, h: torch.Tensor, num_text: int, num_write: int, s: int) -> torch.Tensor:
        k = self.interval
        if k <= 0 or not torch.is_grad_enabled():
            return self.model.segment_blocks(h, self.blocks, num_text, num_write, s)
        for start in range(self.blocks.start, self.blocks.stop, k):
            group = range(start, min(start + k, self.blocks.stop))
            h = checkpoint(self.model.segment_blocks, h, group, num_text, num_write, s, use_reentrant=False)
        return h

    def _forward(self, pairs, train: bool) -> tuple[torch.Tensor, dict]:
        """Forward of every item (s, m) in (s, m) order; returns this rank's loss sum and, when training, what
        the backward needs per item."""
        model, cfg = self.model, self.model.cfg
        L, M, P, D = cfg.rmt.segment_len, cfg.rmt.num_memory, cfg.num_meta_tokens, cfg.d_model
        segments = [-(-x.shape[1] // L) for x, _ in pairs]
        items = sorted((s, m) for m, n in enumerate(segments) for s in range(n))
        total = torch.zeros((), dtype=torch.float64, device=model.memory_init.device)
        saved = {}
        for s, m in items:
            x, y = pairs[m]
            B, T, n = x.shape[0], x.shape[1], segments[m]
            lo, hi = s * L, min(s * L + L, T)
            l, write = hi - lo, hi - lo == L
            w = M if write else 0
            carries = train and s > 0 and not model.memory_detached(s, n)  # does memory(s - 1) -> s carry gradient?
            h_in = memory = None
            if self.first:
                if s == 0:
                    memory = model.memory_init.unsqueeze(0).expand(B, -1, -1)  # gradients reach memory_init
                else:
                    memory = self._recv((B, M, D), self.last_rank, MEMORY).requires_grad_(carries)
                h = model.segment_input(x[:, lo:hi], memory, write=write)
            else:
                rows = model.factory.region.local_rows(P + M + l + w)  # sequence parallel: this rank's rows
                h = h_in = self._recv((B, rows, D), self.prev_rank, HIDDEN).requires_grad_(train)
            h = self._blocks(h, l, w, s)
            if not self.last:
                self._send(h, self.next_rank, HIDDEN)
                saved[s, m] = (h_in, memory if carries else None, h, None)
                continue
            logits, new_memory = model.segment_output(h, l, write=write)
            loss = model.factory.cross_entropy(logits, y[:, lo:hi]).sum() / (B * T * len(pairs))
            total += loss.detach().double()
            if s + 1 < n:  # a full segment with a successor: its memory goes back to stage 0
                self._send(new_memory, self.first_rank, MEMORY)
            carries_out = train and s + 1 < n and not model.memory_detached(s + 1, n)
            saved[s, m] = (h_in, None, loss, new_memory if carries_out else None)
        return total, saved

    def _backward(self, pairs, saved: dict) -> None:
        """Backward of every item in the exact reverse of the forward order."""
        M, D = self.model.cfg.rmt.num_memory, self.model.cfg.d_model
        for s, m in sorted(saved, reverse=True):
            h_in, memory, out, new_memory = saved.pop((s, m))
            B = pairs[m][0].shape[0]
            if self.last:
                tensors, grads = [out], [None]
                if new_memory is not None:  # d loss / d memory(s), from stage 0's backward of (s + 1, m)
                    tensors.append(new_memory)
                    grads.append(self._recv((B, M, D), self.first_rank, MEMORY_GRAD))
                torch.autograd.backward(tensors, grads)
            else:
                torch.autograd.backward(out, self._recv(tuple(out.shape), self.next_rank, HIDDEN_GRAD))
            if h_in is not None:
                self._send(h_in.grad, self.prev_rank, HIDDEN_GRAD)
            elif memory is not None:
                grad = memory.grad if memory.grad is not None else torch.zeros_like(memory)
                self._send(grad, self.last_rank, MEMORY_GRAD)

    def _mean_loss(self, total: torch.Tensor) -> float:
        """The last stage's loss sums, averaged over DP, on every rank (one all-reduce over the world)."""
        dist.all_reduce(total)  # only last-stage ranks hold a loss: tp · dp of them, TP ranks alike
        return float(total) / self.replicas

    # ---- the Engine protocol (memtrain/train/engines/__init__.py) ------------------------------------------

    def train_step(self, batches: list, tokens: int | None = None) -> tuple[float, float]:
        """One optimizer step over the micro-batches `batches` (objects with .inputs/.targets, or pairs; `tokens`
        cuts the sequences); returns (the loss averaged over micro-batches and data-parallel ranks, on every
        rank; the global gradient norm)."""
        if len(batches) != self.accum:
            raise ValueError(f"the RMT pipeline engine takes {self.accum} micro-batches a step "
                             f"(optim.grad_accum), got {len(batches)}")
        self.model.train()
        pairs = self._pairs(batches, tokens)
        total, saved = self._forward(pairs, train=True)
        self._backward(pairs, saved)
        self._wait_sends()
        self._update()
        return self._mean_loss(total), self._norm

    @torch.no_grad()
    def eval_loss(self, batches: list, tokens: int | None = None) -> float:
        """Mean loss over `batches` (no update), averaged over data-parallel ranks, on every rank."""
        self.model.eval()
        pairs = self._pairs(batches, tokens)
        total, _ = self._forward(pairs, train=False)
        self._wait_sends()
        return self._mean_loss(total)

    def _update(self) -> None:
        for p in self.params:  # every rank reduces the same buffers, even where a path skipped a weight
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(self.params, self.dp_group)
        if self.embedding_group is not None:  # embedding part (first) + projection part (last) of the tied weight
            dist.all_reduce(self.named["embed.tokens.weight"].grad, group=self.embedding_group)
        self._norm = clip_gradients(self.params, self.grad_clip, self.tp_group, self.pipe_group,
                                    counted=self.counted)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        """This stage's weights (TP shards) under RMTDecoderLM names; merge stages by taking the union."""
        return {name: p.detach() for name, p in self.named.items()}

    def state_tensors(self) -> EngineTensors:
        # the last stage's copy of the tied embedding equals the first stage's: saved once
        tied = frozenset({"embed.tokens.weight"}) if self.tied and not self.first else frozenset()
        return engine_tensors(self.named, self.optimizer, self.layout, skip_save=tied)

    def save(self, directory: Path) -> dict:
        """This stage's weights and moments (sharded tensors), optimizer and schedule state."""
        save_tensors(directory / "state", self.state_tensors().save)
        return small_state(self.optimizer, self.scheduler)

    def load(self, directory: Path, state: dict) -> None:
        """This stage's weights, moments and schedule, from a checkpoint of any layout."""
        tensors = self.state_tensors()
        load_tensors(directory / "state", tensors.load)
        tensors.finish()
        restore_small_state(state, self.optimizer, self.scheduler)
