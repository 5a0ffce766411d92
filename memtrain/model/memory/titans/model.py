"""Titans models (Behrouz et al. 2025, "Titans: Learning to Memorize at Test Time"): `model.memory` = mac | mag | mal
| lmm. Memory layer: memtrain/model/memory/titans/memory.py (§3.1, eqs. 8-15: surprise S_t = η_t S_{t-1} − θ_t ∇ℓ, forgetting
M_t = (1 − α_t) M_{t-1} + S_t, read y_t = M*(q_t); chunked as eqs. 16-18 by memtrain/kernels/titans). Persistent memory
(§3.3, eq. 19) = the model's meta tokens p (`model.num_meta_tokens`).

Every block of a Titans model has its own memory (one memory per layer, as the paper's MAC/MAG/MAL figures draw
it). Pre-norm residual blocks; a = RMSNorm(h), shapes h `[B, P + n, D]` (P meta positions, n text tokens):

* LMM (memory only, §4.4 "LMM"):  h += M(norm(h)) over [p ‖ x];  h += MLP(norm(h)).
* MAL (memory as a layer, eqs. 29-31):  h += M(norm(h)) over [p ‖ x];  h += SW-Attn(norm(h)) (prefix p, window
  `model.window`, 0 = global);  h += MLP.
* MAG (memory as a gate, eqs. 26-28):  y = SW-Attn(a) with prefix p;  m = M(a) over [p ‖ x];
  h += RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))  (both branches normalised, learned gains; σ makes the memory a gate);  h += MLP.
* MAC (memory as context, eqs. 21-25): text is cut into segments of L = `model.titans.segment_len` tokens on an
  absolute grid (a call may start or end mid-segment). For segment s:
    h_i = M*_{s-1}(q(a_i))            eq. 21: read-only retrieval with the memory as it stood BEFORE the segment;
    y   = Attn([p ‖ h ‖ a_seg])      eqs. 22-23: text query i sees all of p, h_j and a_j for j ≤ i only (h_j is
                                      derived from token j, so a full-segment h prefix would leak later tokens);
    m   = M(norm(y)) updated by y    eq. 24: the attention output updates the memory (read after each update);
    h  += y ⊙ σ(m)                   eq. 25: o = y ⊗ M*(y).
  Retrieved tokens and meta tokens carry no rotary position; meta positions attend to the prefix only and skip the
  memory. `model.window` is not used by MAC (attention is confined to the segment). The retrieval query is the
  memory's query projection without the short conv (a pointwise read; the conv belongs to the update stream).

Memory token stream: MAG / MAL / LMM memories see [p ‖ x]: the meta positions are input-independent, so every call
recomputes their outputs from M_0 (P tokens of work) and only the text continues from the carried state. The MAC
memory sees the attention outputs of text tokens only.

State (`TitansState`): per layer the memory state (kernel 3-tuple, conv tail, tokens seen), the attention KV cache
(MAG/MAL: the last W − 1 text keys/values, all of them for global attention; MAC: keys/values of the segment in
progress, its retrieved tokens' keys/values and the memory at the segment's start), plus the text tokens seen
(rotary positions). `model(tokens, state=s)` continues exactly where the previous call stopped, for any piece
lengths; `generate` decodes greedily one token per call with this state as its KV cache.

Context parallel (`factory.sequence`, docs/distributed.md): tokens are this rank's slice of a fresh sequence.
MAG / MAL / LMM run the text memory stream through `TitansMemory(..., sliced=True)` (conv halo, memory state
composed or handed across ranks) and attention through `sequence.attention`; MAC ranks hold whole segments and
hand the memory rank to rank around their segment loop (`handoff_in` / `handoff_out`).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memtrain.kernels.attention import attention
from memtrain.kernels.attention.reference import repeat_kv

from ...config import ModelConfig
from . import KINDS
from ...factory import LayerFactory
from ...layers import Attention, RMSNorm, SwiGLU, apply_rotary, rotary_tables
from .memory import MemoryState, TitansMemory, tree_map
from ...generation import greedy_generate
from ...transformer import DecoderLM, LMOutput, build_parts

__all__ = ["TitansDecoderLM", "TitansBlock", "TitansState", "TitansLayerState", "TitansMemory"]


class TitansLayerState(NamedTuple):
    """What one block carries between calls (absent parts are None)."""

    memory: MemoryState | None
    """The block's memory state."""
    kv: tuple[torch.Tensor, torch.Tensor] | None
    """Text keys (after rotary) and values `[B, Hkv, c, Dh]` later queries may attend to."""
    retrieved_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    """MAC: keys / values `[B, Hkv, r, Dh]` of the retrieved tokens h of the segment in progress."""
    segment_memory: Any = None
    """MAC: memory at the start of the segment in progress (retrieval reads it); None at a segment boundary."""


class TitansState(NamedTuple):
    """State of a Titans model between calls: one `TitansLayerState` per block and the text tokens seen."""

    layers: tuple
    seen: int

    def detach(self) -> TitansState:
        """The same state cut from the autograd graph (truncated backpropagation between calls)."""
        return tree_map(torch.Tensor.detach, self)


# ---- attention helpers ----------------------------------------------------------------------------------

def _qkv(attn: Attention, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """The attention layer's projections: x `[B, N, D]` -> q `[B, Hq, N, Dh]`, k, v `[B, Hkv, N, Dh]`
    (rotary applied when tables are given; the same head layout as `Attention.forward`)."""
    B, N, _ = x.shape
    G, Dh, Hkv = attn.group, attn.head_dim, attn.local_kv_heads
    # split, not three slices: the backward is one cat instead of three full-size zero-filled gradients
    q, k, v = attn.qkv(x).view(B, N, Hkv, G + 2, Dh).split([G, 1, 1], dim=3)
    q = q.reshape(B, N, Hkv * G, Dh).transpose(1, 2)
    k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q, k, v


def _out(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """o `[B, Hq, N, Dh]` -> `[B, N, D]` through the row-parallel output projection."""
    B, _, N, _ = o.shape
    return attn.out(o.transpose(1, 2).reshape(B, N, -1))


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention under a boolean mask `[Nq, Nk]` (every row has a visible key); GQA by repeating k, v."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a.to(b.dtype), b], dim=2)


def _full_memory(memory: tuple) -> tuple:
    """A fresh kernel state as the 3-tuple (memory, momentum, anchor) every later state has (the shape a
    context-parallel hand-off needs): linear (M, S) -> (M, S, M); deep (weights, None) -> (weights, 0, weights)."""
    if isinstance(memory[0], torch.Tensor):
        return memory[0], memory[1], memory[0]
    weights = tuple(memory[0])
    momenta = tuple(torch.zeros_like(w) for w in weights) if memory[1] is None else tuple(memory[1])
    return weights, momenta, weights


class TitansBlock(nn.Module):
    """One Titans block of kind lmm / mac / mag / mal (module docstring).

    `step(h [B, P + n, D], state, seen) -> (h, TitansLayerState)` with `seen` text tokens before this call;
    `forward(h)` is a fresh step returning h only (a tensor -> tensor pipeline stage).
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, layer: int):
        super().__init__()
        self.kind = cfg.memory
        self.num_prefix = cfg.num_meta_tokens
        self.segment_len = cfg.titans.segment_len
        self.rope_theta = cfg.rope_theta
        self.backend = cfg.attention_backend
        # Sequence parallelism (memtrain/model/factory.py, `RegionOps`): h holds this rank's rows; attention, memory
        # and MLP are regions over the whole sequence, except MAC's segment loop, whose memory update needs the
        # whole attention output: MAC gathers its normalised input and runs attention and memory replicated.
        region, sp = factory.region, self.kind != "mac"
        self.region = region
        if self.kind != "mag":  # MAG feeds the memory the attention branch's normalised input
            self.mem_norm = RMSNorm(cfg.d_model, cfg.norm_eps, region if sp else None)  # MAC: of y, replicated
        if self.kind != "lmm":
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, region)
            self.attn = Attention(cfg, factory, layer, sequence_parallel=sp)
        self.memory = TitansMemory(cfg, factory, sequence_parallel=sp)
        if self.kind == "mag":
            self.gate_norm_y = RMSNorm(cfg.d_model, cfg.norm_eps, region)
            self.gate_norm_m = RMSNorm(cfg.d_model, cfg.norm_eps, region)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, region)
        self.mlp = SwiGLU(cfg, factory)

    @property
    def attention_layout(self) -> str | None:
        """How this block attends (for tools that read its attention, e.g. memtrain inspect): "segments" (MAC: per
        segment over [persistent ‖ retrieved ‖ segment] through `_masked`), "window" (MAG/MAL: prefix + window
        through `attn.sequence.attention`), None (LMM: no attention)."""
        return {"mac": "segments", "lmm": None}.get(self.kind, "window")

    @property
    def meta_memory_call(self) -> bool:
        """Whether a fresh call runs the memory once over the P meta positions before the text (LMM/MAG/MAL with
        meta tokens): hooks on `self.memory` then see that call first. MAC's memory sees text outputs only."""
        return self.kind != "mac" and self.num_prefix > 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.step(h, None, 0)[0]

    def step(self, h: torch.Tensor, state: TitansLayerState | None, seen: int):
        kv = state.kv if state is not None else None
        mem = state.memory if state is not None else None
        region = self.region  # sequence parallelism: enter / exit the whole-sequence regions (else identities)
        if self.kind == "mac":
            h, state = self._mac(h, state, seen)
        elif self.kind == "mag":
            a = region.enter(self.attn_norm(h))
            y, kv = self._window_attention(a, kv, seen)
            m, mem = self._memory_stream(a, mem)
            h = h + self.gate_norm_y(region.exit(y)) * torch.sigmoid(self.gate_norm_m(region.exit(m)))
            state = TitansLayerState(mem, kv)
        else:  # mal, lmm: the memory as a layer
            m, mem = self._memory_stream(region.enter(self.mem_norm(h)), mem)
            h = h + region.exit(m)
            if self.kind == "mal":
                y, kv = self._window_attention(region.enter(self.attn_norm(h)), kv, seen)
                h = h + region.exit(y)
            state = TitansLayerState(mem, kv)
        return h + region.exit(self.mlp(region.enter(self.mlp_norm(h)))), state

    # ---- memory over [p ‖ x] ------------------------------------------------------------------------

    def _memory_stream(self, x: torch.Tensor, mem: MemoryState | None):
        """Memory over x `[B, P + n, D]` = [p ‖ text]. The meta positions always run from M_0 (their outputs do
        not depend on the input, so recomputing them each call is exact); the text continues from `mem`, or,
        on a fresh call, from the state the meta tokens left."""
        P, region = self.num_prefix, self.region  # sequence parallel: x is a region input, sliced by `narrow`
        out_p = None
        if P:
            out_p, after_p = self.memory(region.narrow(x, 0, P))
            mem = after_p if mem is None else mem
        # context parallel: the text is this rank's slice
        out_t, mem = self.memory(region.narrow(x, P, None), mem, sliced=True)
        return (out_t if out_p is None else torch.cat([out_p, out_t], dim=1)), mem

    # ---- sliding-window attention with prefix and KV cache ------------------------------------------

    def _window_attention(self, a: torch.Tensor, kv, seen: int):
        """a `[B, P + n, D]` -> (`[B, P + n, D]`, new cache). Without a cache this is the plain model's attention
        kernel call; with one, text queries attend to [prefix ‖ cached text ‖ new text] under the docs/attention.md
        mask (dense [n, P + c + n]: for decoding and pieces, not for long first calls)."""
        attn, P = self.attn, self.num_prefix
        n = a.shape[1] - P
        offset = seen + attn.sequence.text_offset(n)  # context parallel: this rank's slice starts at r·n
        cos, sin = rotary_tables(P, n, attn.head_dim, self.rope_theta, a.device, offset)
        q, k, v = _qkv(attn, a, cos, sin)
        W = attn.window
        c = 0 if kv is None else kv[0].shape[2]
        if c == 0:  # through the sequence ops: under context parallelism keys of earlier ranks are visible too
            o = attn.sequence.attention(q, k, v, num_prefix=P, window=W, backend=self.backend)
        else:
            i = torch.arange(n, device=a.device).unsqueeze(1) + c  # query index among the c + n text keys
            j = torch.arange(c + n, device=a.device).unsqueeze(0)
            vis = (j <= i) if W is None else (j <= i) & (i - j < W)
            mask = torch.cat([vis.new_ones(n, P), vis], dim=1)
            keys, vals = torch.cat([k[:, :, :P], _cat(kv[0], k[:, :, P:])], 2), \
                torch.cat([v[:, :, :P], _cat(kv[1], v[:, :, P:])], 2)
            o_t = _masked(q[:, :, P:], keys, vals, mask)
            o = o_t
            if P:  # meta queries see exactly the prefix
                o = torch.cat([attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], num_prefix=P,
                                         backend=self.backend), o_t], dim=2)
        ks, vs = _cat(None if kv is None else kv[0], k[:, :, P:]), _cat(None if kv is None else kv[1], v[:, :, P:])
        if W is not None:  # the next query (position seen + n) sees keys from seen + n - W + 1 on
            keep = W - 1
            ks, vs = ks[:, :, ks.shape[2] - min(keep, ks.shape[2]):], vs[:, :, vs.shape[2] - min(keep, vs.shape[2]):]
        return _out(attn, o), (ks, vs)

    # ---- memory as context --------------------------------------------------------------------------

    def _retrieved_kv(self):
        """The attention keys / values of retrieved tokens as a function of the memory read-out:
        read `[B, Hl, l, Dh_mem]` -> (k, v) `[B, Hkv, l, Dh]` (no rotary), i.e. attn k/v of `memory.output(read)`.

        Single device (plain bias-free nn.Linear layers): the memory's output projection and the attention's k/v
        rows fold into one `[Hkv·2·Dh, Hl·Dh_mem]` matrix, built once per call, and the unused query rows are
        skipped; tensor-parallel layers (row output, then column qkv) go through their own forward/backward."""
        attn, mem = self.attn, self.memory
        G, Dh, Hkv = attn.group, attn.head_dim, attn.local_kv_heads
        if all(type(m) is nn.Linear and m.bias is None for m in (attn.qkv, mem.out)):
            w_kv = attn.qkv.weight.view(Hkv, G + 2, Dh, -1)[:, G:].reshape(Hkv * 2 * Dh, -1)  # k, v rows
            fused = w_kv @ mem.out.weight  # [Hkv·2·Dh, Hl·Dh_mem]

            def kv(read: torch.Tensor):
                B, _, l, _ = read.shape
                k, v = F.linear(read.transpose(1, 2).reshape(B, l, -1), fused).view(B, l, Hkv, 2, Dh).unbind(3)
                return k.transpose(1, 2), v.transpose(1, 2)
            return kv

        def kv_general(read: torch.Tensor):
            _, k, v = _qkv(attn, mem.output(read), None, None)
            return k, v
        return kv_general

    def _mac(self, h: torch.Tensor, state: TitansLayerState | None, seen: int):
        """MAC over h `[B, P + n, D]`: segments in order (each needs the memory its predecessor left).

        Only what depends on the previous segment's memory runs per segment: retrieval read -> retrieved k/v ->
        segment attention -> memory update. Everything else is done for the whole call at once: text q/k/v with
        rotary, retrieval queries, the masks (one per distinct segment shape), and after the loop the memory's
        output projection and the gate y ⊙ σ(m) over all segments."""
        attn, mem_layer, P, L = self.attn, self.memory, self.num_prefix, self.segment_len
        seq = attn.sequence  # context parallel: this rank's slice is whole segments (checked by the model)
        region = self.region
        a = region.gather(self.attn_norm(h))  # sequence parallel: whole and replicated from here to the end
        B, N, _ = a.shape
        n = N - P
        seen = seen + seq.text_offset(n)
        out_p = None
        kp = vp = a.new_zeros(B, attn.local_kv_heads, 0, attn.head_dim)
        if P:  # meta positions: attention over the prefix only, no rotary, no memory
            qp, kp, vp = _qkv(attn, a[:, :P], None, None)
            out_p = _out(attn, attention(qp, kp, vp, num_prefix=P, backend=self.backend))
        cos, sin = rotary_tables(0, n, attn.head_dim, self.rope_theta, a.device, seen)
        qt, kt, vt = _qkv(attn, a[:, P:], cos, sin)  # all text at once: no dependence on the memory
        rq = mem_layer.project_query(a[:, P:])  # [B, Hl, n, Dh] retrieval queries
        kp, vp = kp.to(kt.dtype), vp.to(vt.dtype)
        if state is None:
            mem, xkv, hkv, seg_mem = mem_layer.initial_state(B), None, None, None
            if seq.size > 1:  # rank r > 0 continues from rank r - 1's final memory and conv tail
                memory, conv = seq.handoff_in((_full_memory(mem.memory), mem.conv))
                mem = MemoryState(memory, conv, seen)
        else:
            mem, xkv, hkv, seg_mem = state.memory, state.kv, state.retrieved_kv, state.segment_memory
        sizes, r, left = [], seen % L, n  # the call's pieces of segments on the absolute grid
        while left:
            sizes.append(min(left, L - r))
            r, left = (r + sizes[-1]) % L, left - sizes[-1]
        # split once (a slice per segment would make autograd add a full-size zero gradient per segment)
        pieces = zip(*(t.split(sizes, dim=2) for t in (qt, kt, vt, rq)))
        retrieved_kv, masks = self._retrieved_kv(), {}
        r, ys, reads = seen % L, [], []
        for l, (q_s, k_s, v_s, rq_s) in zip(sizes, pieces):
            if r == 0:  # a new segment: retrieval reads the memory as it stands now
                seg_mem, xkv, hkv = mem.memory[0], None, None
            hk, hv = retrieved_kv(mem_layer.read(seg_mem, rq_s))  # h = M*_{s-1}(q): keys / values only
            hkv = (_cat(None if hkv is None else hkv[0], hk), _cat(None if hkv is None else hkv[1], hv))
            xkv = (_cat(None if xkv is None else xkv[0], k_s), _cat(None if xkv is None else xkv[1], v_s))
            mask = masks.get((r, l))
            if mask is None:
                i = torch.arange(l, device=h.device).unsqueeze(1) + r
                j = torch.arange(r + l, device=h.device).unsqueeze(0)
                causal = j <= i  # [l, r + l]: token j of the segment (and its retrieval h_j) visible to query i
                mask = masks[(r, l)] = torch.cat([causal.new_ones(l, P), causal, causal], dim=1)
            keys = torch.cat([kp, hkv[0], xkv[0]], dim=2)
            vals = torch.cat([vp, hkv[1], xkv[1]], dim=2)
            y = _out(attn, _masked(q_s, keys, vals, mask))  # [B, l, D]
            m, mem = mem_layer(self.mem_norm(y), mem, project_out=False)  # m: read-out [B, Hl, l, Dh]
            ys.append(y)
            reads.append(m)
            r = (r + l) % L
        if r == 0:
            xkv = hkv = seg_mem = None
        m = mem_layer.output(torch.cat(reads, dim=2))  # [B, n, D]: one projection for all segments
        update = torch.cat(ys, dim=1) * torch.sigmoid(m)  # [B, n, D]
        if seq.size > 1:  # to rank r + 1; its gradient comes back through `update`'s backward
            update = seq.handoff_out(update, (mem.memory, mem.conv))
        if out_p is not None:
            update = torch.cat([out_p, update], dim=1)  # [B, P + n, D]
        return h + region.scatter(update), TitansLayerState(mem, xkv, hkv, seg_mem)


class TitansDecoderLM(DecoderLM):
    """Decoder LM with Titans memory; `model(tokens, targets=None, state=None) -> LMOutput(logits, loss, state)`.

    tokens `[B, n]` (any n <= model.max_seq_len per call; the state continues a longer sequence), logits
    `[B, n, V]`. The returned state is in the autograd graph; `state.detach()` truncates between calls.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory | None = None):
        nn.Module.__init__(self)  # not DecoderLM.__init__: it would build (and draw weights for) plain blocks
        if cfg.memory not in KINDS:
            raise ValueError(f"TitansDecoderLM needs model.memory in {KINDS}, got {cfg.memory!r}")
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size is 0: set it or let the trainer take it from the dataset")
        factory = factory or LayerFactory()
        tp = factory.tp_size
        if cfg.kv_heads % tp or cfg.padded_vocab_size % tp or cfg.titans.memory_heads % tp:
            raise ValueError(
                f"tensor-parallel size {tp} must divide model.n_kv_heads={cfg.kv_heads}, the padded vocabulary "
                f"{cfg.padded_vocab_size} and model.titans.memory_heads={cfg.titans.memory_heads}")
        self.cfg, self.factory = cfg, factory
        self.activation_checkpoint = "none"
        build_parts(self, cfg, factory, TitansBlock)

    def _check_state(self, state, batch: int) -> TitansState:
        if state is None:
            return TitansState((None,) * len(self.blocks), 0)
        if not isinstance(state, TitansState) or len(state.layers) != len(self.blocks):
            raise ValueError(f"state must be the TitansState a previous call returned, got {type(state).__name__}")
        found = []
        tree_map(found.append, state.layers)
        if found and found[0].shape[0] != batch:
            raise ValueError(f"state is for batch {found[0].shape[0]}, tokens have batch {batch}")
        return state

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                state: TitansState | None = None) -> LMOutput:
        """tokens `[B, n]`, targets `[B, n]` or None, state from a previous call or None (fresh sequence).
        Returns LMOutput(logits `[B, n, V]`, mean loss over the n tokens, next TitansState)."""
        self.check_tokens(tokens)
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}")
        state = self._check_state(state, tokens.shape[0])
        seq = self.factory.sequence
        if seq.size > 1:
            self._check_context_parallel(tokens.shape[1], state)
        h = self.embed(tokens)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            h, layer_state = self.run_block(block.step, h, layer_state, state.seen)
            layers.append(layer_state)
        seen = state.seen + seq.text_offset(tokens.shape[1]) + tokens.shape[1]  # CP: up to this slice's end
        return self.lm_output(self.head(h), targets, TitansState(tuple(layers), seen))

    def _check_context_parallel(self, local_len: int, state: TitansState) -> None:
        """Context parallel: tokens are this rank's slice of a fresh sequence, as long as the kind's spec asks
        (MAC: whole segments; with a short conv at least its halo). The same rules `check_layout` applies to a
        run's config, here for a model called directly."""
        from .. import memory_spec
        if any(layer is not None for layer in state.layers) or state.seen:
            raise ValueError("context parallel Titans models take a fresh sequence (state=None) per call")
        spec = memory_spec(self.cfg.memory)
        segment, least = spec.segment(self.cfg), spec.cp_min_slice(self.cfg)
        if segment and local_len % segment[0]:
            raise ValueError(f"context parallel needs slices of whole segments: a slice of {local_len} tokens is "
                             f"not a multiple of {segment[1]}={segment[0]}")
        if least and local_len < least[0]:
            raise ValueError(f"context parallel slice of {local_len} tokens is shorter than {least[1]} = {least[0]}")

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int,
                 state: TitansState | None = None) -> tuple[torch.Tensor, TitansState]:
        """Greedy decoding: prompt `[B, T0]` -> (prompt + new tokens `[B, T0 + n]`, state after them).

        The prompt runs in one call; every new token is one `forward` call of length 1 whose state is the KV
        cache plus the memory: O(P + W) attention work per token (MAC: O(P + L)), plus one memory step."""
        return greedy_generate(self, prompt, max_new_tokens, state)
