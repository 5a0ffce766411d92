"""The Titans neural long-term memory as a layer (Titans §3.1, eqs. 8-15; docs/titans_kernels.md#the-memory-exactly).

    x [B, n, D] --query, kv (columns)--> [short depthwise causal conv] --> q, k = ℓ2norm(SiLU(.)), v   per head
    x [B, n, D] --gates (column)--> θ, η, α = max·sigmoid(.) (max = theta_max, eta_max, 1)      per token, per head
    y = M_t(q_t) after the update of token t (memtrain.kernels.titans.linear_memory / deep_memory)          [B, H, n, Dh]
    out = y --out (row)--> [B, n, D]

Memory heads are independent, so tensor parallelism splits them: the q/k/v and gate projections are column
layers laid out head by head (whole heads per rank), the output projection is a row layer (summed over ranks),
and the per-head parameters the factory does not make (the learned initial memory M_0 and the conv taps) are
drawn in full from the default generator and sliced to this rank's heads, marked with megatron's
`tensor_model_parallel` / `partition_dim` attributes so `memtrain.launch.tensor_parallel.shard_full / gather_full` see them.

The memory state between calls is the kernel's 3-tuple (memory, momentum, chunk-start anchor) plus the last
conv_size - 1 pre-conv projections (the conv tail) and the count of tokens this memory has seen (chunk grid).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memtrain.kernels.titans import init_deep_memory

from ...config import ModelConfig
from ...factory import LayerFactory, SequenceOps

__all__ = ["MemoryState", "TitansMemory", "tree_map"]


class MemoryState(NamedTuple):
    """State of one memory layer between calls (tensors in the graph; `tree_map(Tensor.detach, s)` cuts it)."""

    memory: tuple
    """Kernel state (M, S, M_anchor): linear `[B, H, Dh, Dh]` each; deep: tuples of per-layer `[B, H, out, in]`."""
    conv: torch.Tensor | None
    """`[B, K - 1, 3·H·Dh]` last pre-conv q/k/v projections (None without a conv)."""
    seen: int
    """Tokens this memory has processed (fixes the absolute chunk grid: chunk_offset = seen % chunk_size)."""


def tree_map(fn, x):
    """Apply `fn` to every tensor in nested tuples / NamedTuples (None and ints pass through)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        items = [tree_map(fn, e) for e in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def _mark_split(p: nn.Parameter) -> nn.Parameter:
    """Mark a per-head parameter as split along dim 0 over TP ranks (megatron's attribute names)."""
    p.tensor_model_parallel = True
    p.partition_dim = 0
    p.partition_stride = 1
    return p


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class TitansMemory(nn.Module):
    """One Titans memory layer: `forward(x [B, n, D], state) -> (out [B, n, D], MemoryState)`.

    Parameters (this rank's heads Hl = H / tp): `query` column D -> H·Dh, `kv` column D -> 2·H·Dh, `gates` column
    D -> 3·H (with bias), `conv_q` `[Hl·Dh, K]` and `conv_kv` `[2·Hl·Dh, K]`, `init_weights[l]` `[Hl, out_l, in_l]`
    (M_0), `out` row H·Dh -> D. The query has its own projection so MAC retrieval computes only queries.

    `sequence_parallel`: the caller runs it as a sequence-parallel region (x through `region.enter`, out through
    `region.exit`: memtrain/model/factory.py); False for MAC, whose segment loop needs the whole output.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, *, sequence_parallel: bool = True):
        super().__init__()
        t = cfg.titans
        tp, rank = factory.tp_size, factory.tp_rank
        H, Dh = t.memory_heads, t.head_dim(cfg.d_model)
        if H % tp:
            raise ValueError(f"tensor-parallel size {tp} must divide model.titans.memory_heads={H}")
        self.heads, self.head_dim = H // tp, Dh
        self.chunk_size, self.depth, self.act = t.chunk_size, t.memory_depth, t.memory_act
        self.backend = t.memory_backend
        self.conv_size = t.conv_size
        self.sequence = factory.sequence  # single device, or context parallel (memtrain/launch/context_parallel.py)
        # Head-major layouts ([head, Dh], [head, (k|v), Dh], [head, (θ|η|α)]): a contiguous TP slice = whole heads.
        sp = sequence_parallel
        self.query = factory.column(cfg.d_model, H * Dh, std=cfg.init_std, sequence_parallel=sp)
        self.kv = factory.column(cfg.d_model, H * 2 * Dh, std=cfg.init_std, sequence_parallel=sp)
        self.gates = factory.column(cfg.d_model, H * 3, std=cfg.init_std, bias=True, sequence_parallel=sp)
        # θ, η bounded by theta_max, eta_max (docs/titans.md#stability); a bound of 1 is no bound (skipped)
        self.gate_max = (t.theta_max, t.eta_max, 1.0)
        with torch.no_grad():  # gate_max·sigmoid(bias) = the configured initial gates (zero bias forgets half per token)
            bias = torch.tensor([_logit(t.theta_init / t.theta_max), _logit(t.eta_init / t.eta_max),
                                 _logit(t.alpha_init)])
            self.gates.bias.copy_(bias.repeat(self.heads).to(self.gates.bias))
        if self.conv_size:
            # Starts close to the identity (tap on the current token = 1): the conv is an optional refinement.
            for name, width in (("conv_q", H * Dh), ("conv_kv", H * 2 * Dh)):
                full = torch.randn(width, self.conv_size) * cfg.init_std
                full[:, -1] += 1.0
                setattr(self, name, _mark_split(nn.Parameter(full.chunk(tp, dim=0)[rank].clone())))
        init = init_deep_memory(H, Dh, Dh, depth=t.memory_depth, expansion=t.memory_expansion)
        self.init_weights = nn.ParameterList(
            _mark_split(nn.Parameter(w.chunk(tp, dim=0)[rank].clone())) for w in init)
        self.out = factory.row(H * Dh, cfg.d_model, std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
                               sequence_parallel=sp)

    # ---- pieces ----------------------------------------------------------------------------------------

    def initial_state(self, batch: int) -> MemoryState:
        """M_0 (learned, expanded over the batch, in the graph), zero momentum, empty conv tail, nothing seen."""
        weights = [w.expand(batch, *w.shape) for w in self.init_weights]
        memory = (weights[0], torch.zeros_like(weights[0])) if self.depth == 1 else (tuple(weights), None)
        conv = None
        if self.conv_size:
            conv = weights[0].new_zeros(batch, self.conv_size - 1, 3 * self.heads * self.head_dim)
        return MemoryState(memory, conv, 0)

    def _conv(self, z: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise causal conv over time: z `[B, n, C]`, tail `[B, K-1, C]` (the previous K-1 inputs).

        out[t] = sum_i w[:, i] * zz[t + i] with zz = [tail ‖ z] (F.conv1d's cross-correlation), written as K
        shifted multiply-adds in the [B, n, C] layout: no transposes to channels-first, and a cheaper backward
        than the depthwise convolution kernel on CPU."""
        K, n = self.conv_size, z.shape[1]
        zz = torch.cat([tail.to(z.dtype), z], dim=1)  # [B, K-1+n, C]
        weight = torch.cat([self.conv_q, self.conv_kv])  # [C, K], channels as in z
        out = zz[:, :n] * weight[:, 0]
        for i in range(1, K):
            out = out + zz[:, i:i + n] * weight[:, i]
        return out, zz[:, zz.shape[1] - (K - 1):]

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, n, D]` -> (z = [query | kv] pre-conv `[B, n, 3·Hl·Dh]`, gate logits `[B, n, 3·Hl]`).

        Single device (plain nn.Linear layers): query and kv as one matmul against the stacked weights, cheaper
        than two small ones; tensor-parallel layers are called one by one (their forward/backward communicate).
        The gates layer is always called as a module (tools hook it: memtrain/train/inspect/gates.py)."""
        if all(type(m) is nn.Linear for m in (self.query, self.kv)):
            layers = (self.query, self.kv)
            weight = torch.cat([m.weight for m in layers])
            bias = None
            if any(m.bias is not None for m in layers):
                bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in layers])
            z = F.linear(x, weight, bias)
        else:
            z = torch.cat([self.query(x), self.kv(x)], dim=-1)
        return z, self.gates(x)

    def gate_values(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """θ, η, α from the gates layer's output: `[B, n, 3·Hl]` -> `[B, n, Hl, 3]` (θ, η, α last), each
        gate_max·sigmoid(logit). The one place the gates are formed (training, statistics and inspection read it)."""
        g = torch.sigmoid(gate_logits).unflatten(-1, (self.heads, 3))
        if self.gate_max != (1.0, 1.0, 1.0):
            g = g * g.new_tensor(self.gate_max)
        return g

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries only, without the conv (MAC retrieval: a pointwise read): x `[B, n, D]` -> `[B, Hl, n, Dh]`."""
        B, n, _ = x.shape
        q = self.query(x).view(B, n, self.heads, self.head_dim)
        return F.normalize(F.silu(q), dim=-1).transpose(1, 2)

    def read(self, memory, q: torch.Tensor) -> torch.Tensor:
        """M(q) without any update: memory = kernel memory (linear `[B, Hl, Dh, Dh]` or tuple of deep layers),
        q `[B, Hl, n, Dh]` -> `[B, Hl, n, Dh]`. Same MLP form as memtrain.kernels.titans (W_L act(... act(W_1 q)))."""
        if self.depth == 1:
            return q @ memory.transpose(-1, -2)
        act = F.gelu if self.act == "gelu" else F.silu
        x = q
        for i, w in enumerate(memory):
            x = x @ w.transpose(-1, -2)
            if i < len(memory) - 1:
                x = act(x)
        return x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y `[B, Hl, n, Dh]` -> `[B, n, D]` through the row-parallel output projection."""
        B, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, n, self.heads * self.head_dim))

    def retrieve(self, x: torch.Tensor, memory) -> torch.Tensor:
        """MAC retrieval h = M*(q(x)) with a fixed memory: x `[B, n, D]` -> `[B, n, D]` (Titans eq. 21)."""
        return self.output(self.read(memory, self.project_query(x)))

    # ---- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, state: MemoryState | None = None, *,
                project_out: bool = True, sliced: bool = False) -> tuple[torch.Tensor, MemoryState]:
        """Update the memory with every token of x `[B, n, D]` and read it after each update (n >= 1).

        Returns out `[B, n, D]` and the state after the last token; `state=None` starts from M_0.
        `project_out=False` returns the read-out before the output projection, `[B, Hl, n, Dh]` (MAC projects
        the read-outs of all its segments at once with `output`).
        `sliced=True`: x is this process's slice of a token stream split over the context-parallel ranks of
        `factory.sequence` and `state` is the stream's state before its first slice (the same on every rank);
        the conv tail comes from the previous rank (halo) and the memory op composes / hands off the state
        across ranks. The returned state is the one after this slice (`seen` counts tokens of every rank up to
        its end). With one process (the default `SequenceOps`) this is the plain call.
        """
        B, n, _ = x.shape
        if state is None:
            state = self.initial_state(B)
        seq = self.sequence if sliced else _LOCAL
        Hl, Dh = self.heads, self.head_dim
        z, gate_logits = self._projections(x)  # z [B, n, 3·Hl·Dh]: [q heads | (k, v) heads]
        conv = state.conv
        if self.conv_size:
            if seq.size > 1:  # the K - 1 inputs before this slice: rank 0 the stream's tail, else rank r - 1's
                prev = seq.halo(z, self.conv_size - 1, dim=1)  # rank 0: empty, kept in the graph (it communicates)
                conv = torch.cat([conv[:, prev.shape[1]:].to(z.dtype), prev], dim=1)
            z, conv = self._conv(z, conv)
        q = F.normalize(F.silu(z[..., :Hl * Dh].view(B, n, Hl, Dh)), dim=-1).transpose(1, 2)  # [B, Hl, n, Dh]
        kv = z[..., Hl * Dh:].view(B, n, Hl, 2, Dh).transpose(1, 2)
        k = F.normalize(F.silu(kv[..., 0, :]), dim=-1)
        v = kv[..., 1, :]
        g = self.gate_values(gate_logits).permute(3, 0, 2, 1)  # [3, B, Hl, n]
        kernel = seq.linear_memory if self.depth == 1 else seq.deep_memory
        kw = dict(chunk_size=self.chunk_size, state=state.memory, chunk_offset=state.seen % self.chunk_size,
                  backend=self.backend)
        if self.depth > 1:
            kw["act"] = self.act
        y, memory = kernel(q.contiguous(), k.contiguous(), v.contiguous(), g[0], g[1], g[2], **kw)
        seen = state.seen + seq.text_offset(n) + n
        return (self.output(y) if project_out else y), MemoryState(memory, conv, seen)


_LOCAL = SequenceOps()  # the memory over tokens this process holds alone (prefix, MAC segments)
