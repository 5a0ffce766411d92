"""Recurrent Memory Transformer (RMT, Bulatov et al. 2022) as an option of the decoder LM: `model.memory = "rmt"`.

A sequence is cut into segments of L text tokens. Each segment runs through the ordinary blocks with the layout

    [meta (P) ; read memory (M) ; segment text (l <= L) ; write memory (M)]      N = P + M + l + M positions

* meta tokens and read memory form the attention prefix (`num_prefix = P + M`): every query sees them, in
  sliding-window layers too; they see each other bidirectionally and no text;
* text is causal (and windowed in windowed layers, or in bottleneck mode);
* write tokens sit last, so the causal mask lets them see the whole segment, meta and read memory included (and
  the write slots before them). In a windowed layer (or bottleneck mode) the text queries go through the
  prefix/window kernel and the M write queries through a dense masked attention over all N keys (M x N: cheap),
  so the write memory always sees the whole segment;
* the final hidden states of the write tokens, RMS-normalised, are the next segment's read memory.
  Segment 0 reads a learned initial memory. Read and write slots get their own learned per-slot embeddings
  (added to the memory they start from: both start from the previous memory, so carrying it forward is easy).

Rotary positions: meta and memory tokens carry none (identity rotation, like meta tokens in the plain model).
Text positions restart at 0 in every segment by default (`model.rmt.positions = "segment"`): text only attends
to text of its own segment, so only positions inside a segment are ever compared, and every segment then looks
alike to the model — the recurrence a model trained on a few segments must repeat over millions of tokens.
Continuing positions (`"global"`) would show a text query rotations it never saw in training once the sequence
grows past the trained length (the query-to-memory scores depend on the query's absolute rotation).

Bottleneck mode (the Memory Transformer's MemBottleneck, made causal): text sees meta, read memory and only a
causal window of `bottleneck_window` text tokens in every layer; write memory sees everything before it.

A segment that is not full (the end of a sequence) is run without write tokens and its tokens are kept in the
state (`pending`): memory is written only by full segments, so feeding a sequence in pieces of any lengths with
the state carried equals one pass, and generation continues the segment in progress.

Parallelism: the blocks are the plain model's (TP through the layer factory, heads are independent, the memory
parameters are replicated like meta tokens). Pipeline parallel: `run_segment` is `segment_input` (embedding,
meta, memory rows: first stage) → `segment_blocks` over a range of blocks (each stage its own) → `segment_output`
(head and memory norm: last stage); memtrain/launch/rmt_pipeline.py runs segments × micro-batches through the stages with
its own schedule, since the memory goes from the last stage back to the first. There is no flat tensor →
tensor sequence for DeepSpeed's pipeline (`stages()` raises). Context parallel: each rank holds whole segments;
the memory is handed from rank to rank through `factory.sequence` (attention never crosses a segment, so it
needs no halo).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from memtrain.kernels.attention import attention
from memtrain.kernels.attention.reference import masked_attention

from ...config import ModelConfig
from ...factory import LayerFactory
from ...layers import RMSNorm, rotary_tables
from .config import RMTConfig, segments_for_step, tokens_for_step
from ...generation import greedy_generate
from ...transformer import DecoderLM, LMOutput, prepend

__all__ = ["RMTDecoderLM", "RMTState", "RMTConfig", "segments_for_step", "split_attend", "tokens_for_step", "write_mask"]


class RMTState(NamedTuple):
    """What carries from one call to the next; tensors only (plus a count), so it can cross process boundaries."""

    memory: torch.Tensor
    """`[B, M, D]` read memory of the segment in progress (the last full segment's write output)."""
    pending: torch.Tensor
    """`[B, r]` int64 text tokens of the segment in progress, 0 <= r < L (already returned as logits)."""
    segments: int
    """Full segments completed before the one in progress (text positions with `positions = "global"`)."""

    def detach(self) -> RMTState:
        """The same state cut from the autograd graph (truncated BPTT across calls)."""
        return RMTState(self.memory.detach(), self.pending, self.segments)


def write_mask(num_keys_before: int, num_write: int, device=None) -> torch.Tensor:
    """Visibility of the write queries `[M, n + M]`: every key before them (n) and the write keys up to itself."""
    i = torch.arange(num_write, device=device).unsqueeze(1)
    j = torch.arange(num_keys_before + num_write, device=device).unsqueeze(0)
    return (j < num_keys_before) | (j - num_keys_before <= i)


def split_attend(q, k, v, *, num_prefix: int, window: int, num_write: int, backend: str):
    """Windowed layer with write tokens: text (and prefix) queries through the kernel, write queries dense.

    q `[B, Hq, N, Dh]`, k/v `[B, Hkv, N, Dh]` -> `[B, Hq, N, Dh]`. The first n = N - M positions never see the
    write keys (they come later under the causal mask), so the kernel call over them alone is exact.
    """
    n = q.shape[2] - num_write
    body = attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], num_prefix=num_prefix, window=window, backend=backend)
    writes = masked_attention(q[:, :, n:], k, v, write_mask(n, num_write, q.device))
    return torch.cat([body, writes], dim=2)


class RMTDecoderLM(DecoderLM):
    """Decoder LM with recurrent memory tokens; `model(tokens, targets=None, state=None) -> LMOutput`.

    Shapes: tokens `[B, T]` (any T; a call continues the segment in progress of `state`), logits `[B, T, V]`,
    memory `[B, M, D]`. Extra parameters: `memory_init`, `read_slots`, `write_slots` `[M, D]` and the RMSNorm
    `memory_norm` applied to write outputs.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory | None = None):
        if cfg.memory != "rmt":
            raise ValueError(f"RMTDecoderLM needs model.memory = \"rmt\", got {cfg.memory!r}")
        super().__init__(cfg, factory)  # validates cfg, model.rmt included
        r: RMTConfig = cfg.rmt
        M, D = r.num_memory, cfg.d_model
        # Replicated on every TP rank (like meta tokens): h is replicated, so their gradients agree.
        self.memory_init = nn.Parameter(torch.randn(M, D) * cfg.init_std)
        self.read_slots = nn.Parameter(torch.randn(M, D) * cfg.init_std)
        self.write_slots = nn.Parameter(torch.randn(M, D) * cfg.init_std)
        # The memory is normalised so its scale stays bounded over any number of segments; the gain starts at
        # init_std so carried memory enters the residual stream at the scale of embeddings and memory_init.
        self.memory_norm = RMSNorm(D, cfg.norm_eps)
        with torch.no_grad():
            self.memory_norm.weight.fill_(cfg.init_std)
        self.head.num_prefix = 0  # the RMT hands the head text positions only
        self.text_windows = [self._text_window(i) for i in range(cfg.n_layers)]

    # ---- layout ------------------------------------------------------------------------------------

    def _text_window(self, layer: int) -> int | None:
        """Window of text queries in `layer`: the layer's own, narrowed to `bottleneck_window` in bottleneck mode."""
        w = self.cfg.layer_window(layer)
        if self.cfg.rmt.bottleneck:
            bw = self.cfg.rmt.bottleneck_window
            w = bw if w is None else min(w, bw)
        return w

    def _rotary(self, num_text: int, num_write: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[P + M + l + M_w, Dh]`: identity for meta/memory rows, positions offset.. for text."""
        cfg = self.cfg
        prefix = cfg.num_meta_tokens + cfg.rmt.num_memory
        cos, sin = rotary_tables(prefix, num_text, cfg.head_dim, cfg.rope_theta, device, offset)
        if num_write:
            cos = torch.cat([cos, cos.new_ones(num_write, cfg.head_dim)])
            sin = torch.cat([sin, sin.new_zeros(num_write, cfg.head_dim)])
        return cos, sin

    def _attend(self, window: int | None, num_write: int):
        prefix = self.cfg.num_meta_tokens + self.cfg.rmt.num_memory
        backend = self.cfg.attention_backend
        if window is None or num_write == 0:
            # Without a window the causal kernel already lets the (last) write tokens see everything.
            return functools.partial(attention, num_prefix=prefix, window=window, backend=backend)
        return functools.partial(split_attend, num_prefix=prefix, window=window, num_write=num_write,
                                 backend=backend)

    def run_segment(
        self, ids: torch.Tensor, memory: torch.Tensor, segment_index: int, *, write: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One segment: ids `[B, l]` (l <= L), read memory `[B, M, D]`, the segment's global index (positions).

        Returns logits `[B, l, V_local]` (vocab padding not yet cut) and, with `write`, the next memory
        `[B, M, D]` (else None: a partial segment writes nothing). The three pieces it composes are what a
        pipeline stage runs (memtrain/launch/rmt_pipeline.py): input on the first stage, its blocks, output on the last.
        """
        l, num_write = ids.shape[1], self.cfg.rmt.num_memory if write else 0
        h = self.segment_input(ids, memory, write=write)
        h = self.segment_blocks(h, range(len(self.blocks)), l, num_write, segment_index)
        return self.segment_output(h, l, write=write)

    def segment_input(self, ids: torch.Tensor, memory: torch.Tensor, *, write: bool) -> torch.Tensor:
        """The segment's input rows h `[B, N, D]`, N = P + M + l (+ M with `write`): meta tokens, read memory
        (memory `[B, M, D]` + read slots), token embeddings of ids `[B, l]`, write memory (memory + write slots)."""
        x = self.embed.tokens(ids)  # [B, l, D]
        memory = memory.to(x.dtype)
        parts = [memory + self.read_slots.to(x.dtype), x]
        if write:
            parts.append(memory + self.write_slots.to(x.dtype))
        # [B, N, D]; under sequence parallelism this rank's rows [B, N / tp, D] (memtrain/model/factory.py)
        return self.factory.region.scatter(prepend(self.embed.meta, torch.cat(parts, dim=1)))

    def segment_blocks(self, h: torch.Tensor, blocks: range, num_text: int, num_write: int,
                       segment_index: int) -> torch.Tensor:
        """Blocks `blocks` (indices into `self.blocks`, consecutive) over h `[B, N, D]` of a segment with
        `num_text` text and `num_write` (0 or M) write rows -> h `[B, N, D]`."""
        offset = segment_index * self.cfg.rmt.segment_len if self.cfg.rmt.positions == "global" else 0
        rotary = self._rotary(num_text, num_write, offset, h.device)
        for i in blocks:
            h = self.run_block(self.blocks[i], h, rotary=rotary, attend=self._attend(self.text_windows[i], num_write))
        return h

    def segment_output(self, h: torch.Tensor, num_text: int, *, write: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final rows h `[B, N, D]` (this rank's rows under sequence parallelism) -> (logits `[B, l, V_local]` of the text rows, next memory `[B, M, D]`: the
        normalised write rows with `write`, else None)."""
        start = self.cfg.num_meta_tokens + self.cfg.rmt.num_memory
        logits = self.head(h, start, start + num_text)
        # the write rows, whole on every TP rank (sequence parallelism: gathered from the ranks' rows)
        new_memory = self.memory_norm(self.factory.region.gather(h)[:, start + num_text:]) if write else None
        return logits, new_memory

    # ---- state -------------------------------------------------------------------------------------

    def initial_state(self, batch: int, device=None) -> RMTState:
        """Fresh state: the learned initial memory (in the graph, so it is trained), nothing pending."""
        device = device or self.memory_init.device
        memory = self.memory_init.unsqueeze(0).expand(batch, -1, -1)
        return RMTState(memory, torch.zeros(batch, 0, dtype=torch.long, device=device), 0)

    def _prepare(self, tokens, targets, state) -> tuple[RMTState, torch.Tensor, list[torch.Tensor]]:
        """Checks; returns the state, ids = pending + tokens `[B, r + T]` and its segments (all full but the last)."""
        self.check_tokens(tokens)
        B, T = tokens.shape
        L, M = self.cfg.rmt.segment_len, self.cfg.rmt.num_memory
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}")
        if state is None:
            if targets is not None and T < L:
                raise ValueError(f"training sequence of {T} tokens is shorter than one segment "
                                 f"(model.rmt.segment_len={L}): no memory would be written")
            state = self.initial_state(B, tokens.device)
        else:
            if not isinstance(state, RMTState):
                raise ValueError(f"state must be the RMTState a previous call returned, got {type(state).__name__}")
            if state.memory.shape != (B, M, self.cfg.d_model) or state.pending.shape[0] != B:
                raise ValueError(f"state is for batch/memory {tuple(state.memory.shape)}, tokens have batch {B}")
            if state.pending.shape[1] >= L:
                raise ValueError(f"state holds {state.pending.shape[1]} pending tokens, must be < segment_len {L}")
        ids = torch.cat([state.pending.to(tokens), tokens], dim=1) if state.pending.shape[1] else tokens
        return state, ids, list(ids.split(L, dim=1))

    def memory_detached(self, s: int, n: int) -> bool:
        """Is the memory entering segment s of n (in one call) cut from the graph? Only the last k transitions
        (into segments n-k .. n-1) carry gradient, so every loss reaches back through at most k transitions."""
        k = self.cfg.rmt.bptt_segments
        return s > 0 and k >= 0 and s < n - k

    def _finish_state(self, state: RMTState, ids, pieces, memory) -> RMTState:
        L = self.cfg.rmt.segment_len
        full = ids.shape[1] // L
        pending = pieces[-1] if pieces[-1].shape[1] < L else ids[:, :0]
        return RMTState(memory, pending, state.segments + full)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                state: RMTState | None = None) -> LMOutput:
        """tokens `[B, T]`, targets `[B, T]` or None, state from a previous call or None (fresh).

        Returns LMOutput(logits `[B, T, V]`, mean loss over the T new tokens, next RMTState). Gradients pass
        through at most `bptt_segments` memory transitions of this call; the returned state's memory is still
        in the graph — `state.detach()` it to truncate between calls.
        """
        if self.factory.sequence.size > 1:
            return self._forward_context_parallel(tokens, targets, state)
        state, ids, pieces = self._prepare(tokens, targets, state)
        L, r, n = self.cfg.rmt.segment_len, state.pending.shape[1], len(pieces)
        memory, logits = state.memory, []
        for s, piece in enumerate(pieces):
            if self.memory_detached(s, n):
                memory = memory.detach()
            full = piece.shape[1] == L
            seg_logits, new_memory = self.run_segment(piece, memory, state.segments + s, write=full)
            logits.append(seg_logits)
            if full:
                memory = new_memory
        out = torch.cat(logits, dim=1)[:, r:]  # logits of pending tokens were returned by the previous call
        return self.lm_output(out, targets, self._finish_state(state, ids, pieces, memory))

    def _forward_context_parallel(self, tokens, targets, state) -> LMOutput:
        """Context parallel (`factory.sequence.size` = c > 1): tokens `[B, T_l]` is this rank's slice, a whole
        number of segments. Rank r runs its segments after receiving rank r − 1's final memory and hands its own
        to rank r + 1 (the gradient of the memory flows back the same way); `bptt_segments` counts global
        segments. Returns this slice's logits, mean loss and state (the last rank's is the sequence's)."""
        seq = self.factory.sequence
        B, T = tokens.shape
        L = self.cfg.rmt.segment_len
        if state is not None or T % L:
            raise ValueError(f"context parallel RMT takes a fresh sequence (state=None) cut into slices of whole "
                             f"segments; got a slice of {T} tokens (model.rmt.segment_len={L})"
                             + (" and a state" if state is not None else ""))
        fresh, _, pieces = self._prepare(tokens, targets, None)
        per_rank = T // L
        first, n = seq.rank * per_rank, seq.size * per_rank  # global index of this rank's first segment, total
        memory = seq.handoff_in(fresh.memory, differentiable=not self.memory_detached(first, n))
        logits = []
        for s, piece in enumerate(pieces):
            if s and self.memory_detached(first + s, n):
                memory = memory.detach()
            seg_logits, memory = self.run_segment(piece, memory, first + s, write=True)
            logits.append(seg_logits)
        out = torch.cat(logits, dim=1)
        out = seq.handoff_out(out, memory, differentiable=not self.memory_detached(first + per_rank, n))
        return self.lm_output(out, targets, RMTState(memory, tokens[:, :0], first + per_rank))

    # ---- training entry points ---------------------------------------------------------------------

    def replay_backward(self, tokens: torch.Tensor, targets: torch.Tensor,
                        state: RMTState | None = None) -> torch.Tensor:
        """Memory replay backpropagation: accumulate into `.grad` exactly what `forward(...).loss.backward()`
        would, holding the activations of one segment at a time. Returns the mean loss (detached).

        1. A no-grad pass over the segments keeps only the memory entering each one (n × `[B, M, D]`).
        2. In reverse, each segment is recomputed with grad from its stored read memory (a leaf), and
           backward runs on  loss_s / (B·T) + <write output, g>,  g = d loss / d (memory leaving s), which the
           next segment's backward left in its read memory's `.grad`. Segment 0 reads `memory_init` itself.
        The recomputation repeats the forward's operations on the same inputs, so it reproduces the stored
        memory bit for bit. Transitions detached by `bptt_segments` pass no g. An incoming `state`'s memory is
        treated as a constant (no gradient flows into a previous call).
        """
        if targets is None:
            raise ValueError("replay_backward needs targets")
        if self.factory.sequence.size > 1:
            raise ValueError("memory replay does not run under context parallelism yet: set "
                             "model.rmt.memory_replay=false or parallel.cp=1")
        fresh = state is None
        state, ids, pieces = self._prepare(tokens, targets, state)
        B, T = tokens.shape
        L, r, n = self.cfg.rmt.segment_len, state.pending.shape[1], len(pieces)
        memories = []
        with torch.no_grad():
            memory = state.memory
            for s, piece in enumerate(pieces):
                memories.append(memory)
                if piece.shape[1] == L:
                    _, memory = self.run_segment(piece, memory, state.segments + s, write=True)
        total = torch.zeros((), dtype=torch.float64)
        grad_out = None  # d loss / d (memory leaving segment s)
        start = sum(p.shape[1] for p in pieces)
        for s in reversed(range(n)):
            piece = pieces[s]
            start -= piece.shape[1]
            if s == 0 and fresh:
                m_in = self.initial_state(B, tokens.device).memory  # gradients go to memory_init
            else:
                m_in = memories[s].detach().requires_grad_(s > 0 and not self.memory_detached(s, n))
            seg_logits, m_out = self.run_segment(piece, m_in, state.segments + s, write=piece.shape[1] == L)
            skip = max(0, r - start)  # pending tokens at the start of segment 0 carry no loss here
            seg_targets = targets[:, start + skip - r:start + piece.shape[1] - r]
            loss = self.factory.cross_entropy(seg_logits[:, skip:], seg_targets).sum() / (B * T)
            objective = loss if grad_out is None else loss + (m_out * grad_out).sum()
            objective.backward()
            total += loss.detach().double()
            grad_out = m_in.grad if m_in.is_leaf and m_in.requires_grad else None
        return total.to(tokens.device)

    def loss_and_backward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One training step's forward and backward as configured: memory replay when `model.rmt.memory_replay`,
        else plain backpropagation through time. Returns the mean loss (detached); gradients are in `.grad`."""
        if self.cfg.rmt.memory_replay:
            return self.replay_backward(tokens, targets)
        loss = self(tokens, targets).loss
        loss.backward()
        return loss.detach()

    # ---- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int,
                 state: RMTState | None = None) -> tuple[torch.Tensor, RMTState]:
        """Greedy decoding with the memory carried: prompt `[B, T0]` -> (prompt + new tokens `[B, T0 + n]`,
        state after them). Each step reruns the segment in progress (no KV cache): O(L) work per token."""
        return greedy_generate(self, prompt, max_new_tokens, state)

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError("the RMT's memory cycles from the last block back to the first, so it has no "
                                  "flat pipeline stages for DeepSpeed: memtrain.train.engines.rmt_pipeline.RMTPipelineEngine "
                                  "runs it over parallel.pp stages (segment_input/segment_blocks/segment_output)")
