"""Titans models (memory = lmm, mac, mag, mal) of an exported memtrain model (copied verbatim into every export;
plain torch, no project import). Mirrors memtrain's memtrain/model/memory/titans/model.py, memtrain/model/memory/titans/memory.py and memtrain/kernels/titans.

The memory update is the naive chunk loop of memtrain/kernels/titans/reference.py (the specification the native chunked
kernel is tested against): per token t, chunk size b, absolute chunk grid c = (seen + t) // b,

    g_t = grad_M ||M(k_t) - v_t||^2 at the memory of the start of t's chunk (the anchor)
    S_t = eta_t S_{t-1} - theta_t g_t ;  M_t = (1 - alpha_t) M_{t-1} + S_t ;  y_t = M_t(q_t)

with M(x) = W_L act(... act(W_1 x)) per head (depth 1 = the linear memory W x). All gradients of a chunk use the
anchor, so they are computed for the whole chunk at once by hand-written backpropagation through the MLP; only
the momentum/forgetting recurrence and the read-out run token by token. bf16/fp16 inputs are computed in fp32
and the state stays fp32, as in the native kernels.

Layer state (one per block): (memory state, attention KV cache, MAC retrieved-token KV, MAC segment-start memory);
memory state = (weights, momenta, anchor, conv tail, tokens seen), weights/momenta/anchor tuples of per-layer
`[B, H, d_out, d_in]`. Model state = (layer states, text tokens seen).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_memtrain import MemtrainConfig
from .memtrain_layers import (MemtrainAttentionProjections, MemtrainMLP, MemtrainRMSNorm, masked_attention,
                              rotary_table)


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    return F.gelu(x) if name == "gelu" else F.silu(x)


def _act_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":  # exact (erf) GELU, as F.gelu
        return 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def mlp_read(weights, x: torch.Tensor, act: str) -> torch.Tensor:
    """M(x): weights[l] `[B, H, d_l, d_{l-1}]`, x `[B, H, N, d_0]` -> `[B, H, N, d_L]`."""
    for l, w in enumerate(weights):
        x = x @ w.transpose(-1, -2)
        if l < len(weights) - 1:
            x = _act(x, act)
    return x


def mlp_grads(weights, k: torch.Tensor, v: torch.Tensor, act: str) -> list[torch.Tensor]:
    """grad_W ||M_W(k_t) - v_t||^2 per token and layer: k `[B, H, n, d_0]`, v `[B, H, n, d_L]` ->
    per layer `[B, H, n, d_l, d_{l-1}]` (backpropagation through the MLP written out)."""
    inputs, pre, x = [], [], k
    for l, w in enumerate(weights):
        inputs.append(x)
        z = x @ w.transpose(-1, -2)
        pre.append(z)
        x = _act(z, act) if l < len(weights) - 1 else z
    delta = 2.0 * (x - v)  # d loss / d output
    grads: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for l in reversed(range(len(weights))):
        grads[l] = delta.unsqueeze(-1) * inputs[l].unsqueeze(-2)
        if l:
            delta = (delta @ weights[l]) * _act_grad(pre[l - 1], act)
    return grads


def memory_update(q, k, v, theta, eta, alpha, state, chunk_size: int, act: str):
    """Naive chunk loop. q, k `[B, H, n, Dk]`, v `[B, H, n, Dv]`, gates `[B, H, n]`; state = (weights, momenta,
    anchor, seen) -> (y `[B, H, n, Dv]`, new (weights, momenta, anchor, seen))."""
    Ws, Ss, anchor, seen = state
    out_dtype = q.dtype
    if q.dtype not in (torch.float32, torch.float64):
        q, k, v, theta, eta, alpha = (t.float() for t in (q, k, v, theta, eta, alpha))
    Ws, Ss = tuple(w.to(q.dtype) for w in Ws), tuple(s.to(q.dtype) for s in Ss)
    anchor = None if anchor is None else tuple(a.to(q.dtype) for a in anchor)
    b, n, ys, t = chunk_size, q.shape[2], [], 0
    while t < n:
        if (seen + t) % b == 0:
            anchor = Ws  # a new chunk: its gradients are taken at the memory of its start
        end = min(n, t + b - (seen + t) % b)  # the rest of this chunk
        grads = mlp_grads(anchor, k[:, :, t:end], v[:, :, t:end], act)
        for i in range(end - t):
            th, et, al = (g[:, :, t + i, None, None] for g in (theta, eta, alpha))
            Ss = tuple(et * s - th * g[:, :, i] for s, g in zip(Ss, grads))
            Ws = tuple((1.0 - al) * w + s for w, s in zip(Ws, Ss))
            ys.append(mlp_read(Ws, q[:, :, t + i, None], act))
        t = end
    if (seen + n) % b == 0:
        anchor = Ws
    return torch.cat(ys, dim=2).to(out_dtype), (Ws, Ss, anchor, seen + n)


class MemtrainNeuralMemory(nn.Module):
    """The Titans memory layer (memtrain/model/memory/titans/memory.py): x `[B, n, D]` -> (out `[B, n, D]`, state)."""

    def __init__(self, config: MemtrainConfig):
        super().__init__()
        c, D = config.memory_config, config.hidden_size
        H = c["memory_heads"]
        Dh = c["memory_head_dim"] or D // H
        self.heads, self.head_dim, self.chunk_size = H, Dh, c["chunk_size"]
        self.act, self.conv_size = c["memory_act"], c["conv_size"]
        # θ = theta_max·sigmoid, η = eta_max·sigmoid (exports made before the bounds existed have none: 1)
        self.gate_max = (c.get("theta_max", 1.0), c.get("eta_max", 1.0), 1.0)
        self.gate_init = (c.get("theta_init", 0.001), c.get("eta_init", 0.9), c.get("alpha_init", 0.01))
        self.query = nn.Linear(D, H * Dh, bias=False)
        self.kv = nn.Linear(D, H * 2 * Dh, bias=False)
        self.gates = nn.Linear(D, H * 3, bias=True)
        if self.conv_size:
            self.conv_q = nn.Parameter(torch.zeros(H * Dh, self.conv_size))
            self.conv_kv = nn.Parameter(torch.zeros(H * 2 * Dh, self.conv_size))
        depth = c["memory_depth"]
        hidden = max(1, int(round(c["memory_expansion"] * Dh)))
        dims = [Dh] + [hidden] * (depth - 1) + [Dh]
        self.init_weights = nn.ParameterList(nn.Parameter(torch.zeros(H, dims[i + 1], dims[i])) for i in range(depth))
        self.out = nn.Linear(H * Dh, D, bias=False)

    def initial_state(self, batch: int):
        """(M_0 over the batch, zero momenta, no anchor, zero conv tail, 0 seen)."""
        Ws = tuple(w.expand(batch, *w.shape) for w in self.init_weights)
        conv = Ws[0].new_zeros(batch, self.conv_size - 1, 3 * self.heads * self.head_dim) if self.conv_size else None
        return Ws, tuple(torch.zeros_like(w) for w in Ws), None, conv, 0

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries without the conv (MAC retrieval): x `[B, n, D]` -> `[B, H, n, Dh]`."""
        B, n, _ = x.shape
        return F.normalize(F.silu(self.query(x).view(B, n, self.heads, self.head_dim)), dim=-1).transpose(1, 2)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y `[B, H, n, Dh]` -> `[B, n, D]`."""
        B, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, n, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, state=None):
        B, n, _ = x.shape
        Ws, Ss, anchor, conv, seen = self.initial_state(B) if state is None else state
        H, Dh = self.heads, self.head_dim
        z = torch.cat([self.query(x), self.kv(x)], dim=-1)  # [B, n, 3·H·Dh]
        if self.conv_size:  # depthwise causal conv over time, continuing from the previous K - 1 inputs
            zz = torch.cat([conv.to(z.dtype), z], dim=1)
            weight = torch.cat([self.conv_q, self.conv_kv]).unsqueeze(1)
            z = F.conv1d(zz.transpose(1, 2), weight, groups=zz.shape[-1]).transpose(1, 2)
            conv = zz[:, zz.shape[1] - (self.conv_size - 1):]
        q = F.normalize(F.silu(z[..., :H * Dh].view(B, n, H, Dh)), dim=-1).transpose(1, 2)
        kv = z[..., H * Dh:].view(B, n, H, 2, Dh).transpose(1, 2)
        k, v = F.normalize(F.silu(kv[..., 0, :]), dim=-1), kv[..., 1, :]
        g = torch.sigmoid(self.gates(x)).view(B, n, H, 3) * x.new_tensor(self.gate_max)
        g = g.permute(3, 0, 2, 1)  # [3, B, H, n]
        y, (Ws, Ss, anchor, seen) = memory_update(q, k, v, g[0], g[1], g[2], (Ws, Ss, anchor, seen),
                                                  self.chunk_size, self.act)
        return self.output(y), (Ws, Ss, anchor, conv, seen)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a.to(b.dtype), b], dim=2)


class MemtrainTitansLayer(nn.Module):
    """One Titans block (memtrain/model/memory/titans/model.py TitansBlock): `step(h [B, P + n, D], state, seen) -> (h, state)`."""

    def __init__(self, config: MemtrainConfig, layer_idx: int):
        super().__init__()
        self.kind, self.num_prefix = config.memory, config.num_meta_tokens
        self.segment_len = config.memory_config["segment_len"]
        eps = config.rms_norm_eps
        if self.kind != "mag":
            self.memory_norm = MemtrainRMSNorm(config.hidden_size, eps)
        if self.kind != "lmm":
            self.input_layernorm = MemtrainRMSNorm(config.hidden_size, eps)
            self.self_attn = MemtrainAttentionProjections(config, layer_idx)
        self.memory = MemtrainNeuralMemory(config)
        if self.kind == "mag":
            self.gate_norm_y = MemtrainRMSNorm(config.hidden_size, eps)
            self.gate_norm_m = MemtrainRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = MemtrainRMSNorm(config.hidden_size, eps)
        self.mlp = MemtrainMLP(config)

    def step(self, h: torch.Tensor, state, seen: int):
        mem, kv = (None, None) if state is None else state[:2]
        if self.kind == "mac":
            h, state = self._mac(h, state, seen)
        elif self.kind == "mag":
            a = self.input_layernorm(h)
            y, kv = self._window_attention(a, kv, seen)
            m, mem = self._memory_stream(a, mem)
            h = h + self.gate_norm_y(y) * torch.sigmoid(self.gate_norm_m(m))
            state = (mem, kv, None, None)
        else:  # mal, lmm
            m, mem = self._memory_stream(self.memory_norm(h), mem)
            h = h + m
            if self.kind == "mal":
                y, kv = self._window_attention(self.input_layernorm(h), kv, seen)
                h = h + y
            state = (mem, kv, None, None)
        return h + self.mlp(self.post_attention_layernorm(h)), state

    def _memory_stream(self, x: torch.Tensor, mem):
        """Memory over [p ‖ text]: meta positions always from M_0 (input independent), text from `mem` or, on a
        fresh sequence, from the state the meta positions left."""
        P, out_p = self.num_prefix, None
        if P:
            out_p, after_p = self.memory(x[:, :P])
            mem = after_p if mem is None else mem
        out_t, mem = self.memory(x[:, P:], mem)
        return (out_t if out_p is None else torch.cat([out_p, out_t], dim=1)), mem

    def _window_attention(self, a: torch.Tensor, kv, seen: int):
        """Meta queries see the meta keys; text queries the meta keys, cached and new text keys (causal, window)."""
        attn, P = self.self_attn, self.num_prefix
        n = a.shape[1] - P
        cos, sin = rotary_table(P, n, 0, attn.head_dim, attn.rope_theta, seen, a.device)
        q, k, v = attn.project(a, cos, sin)
        W, c = attn.window, 0 if kv is None else kv[0].shape[2]
        i = torch.arange(n, device=a.device).unsqueeze(1) + c
        j = torch.arange(c + n, device=a.device).unsqueeze(0)
        vis = (j <= i) if W is None else (j <= i) & (i - j < W)
        mask = torch.cat([vis.new_ones(n, P), vis], dim=1)
        ks, vs = _cat(None if kv is None else kv[0], k[:, :, P:]), _cat(None if kv is None else kv[1], v[:, :, P:])
        o = masked_attention(q[:, :, P:], torch.cat([k[:, :, :P], ks], 2), torch.cat([v[:, :, :P], vs], 2), mask)
        if P:
            o = torch.cat([masked_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], None), o], dim=2)
        if W is not None:  # the next query sees the last W - 1 text keys
            keep = min(W - 1, ks.shape[2])
            ks, vs = ks[:, :, ks.shape[2] - keep:], vs[:, :, vs.shape[2] - keep:]
        return attn.output(o), (ks, vs)

    def _mac(self, h: torch.Tensor, state, seen: int):
        """Memory as context: segments of L text tokens on an absolute grid, in order."""
        attn, mem_layer, P, L = self.self_attn, self.memory, self.num_prefix, self.segment_len
        B, N, _ = h.shape
        n = N - P
        a = self.input_layernorm(h)
        out_p = None
        kp = vp = a.new_zeros(B, attn.num_kv_heads, 0, attn.head_dim)
        if P:  # meta positions: attention over the prefix only, no rotary, no memory
            qp, kp, vp = attn.project(a[:, :P])
            out_p = attn.attend(qp, kp, vp, None)
        cos, sin = rotary_table(0, n, 0, attn.head_dim, attn.rope_theta, seen, a.device)
        qt, kt, vt = attn.project(a[:, P:], cos, sin)
        rq = mem_layer.project_query(a[:, P:])
        if state is None:
            mem, xkv, hkv, seg_mem = mem_layer.initial_state(B), None, None, None
        else:
            mem, xkv, hkv, seg_mem = state
        r, i0, outs = seen % L, 0, []
        while i0 < n:
            l = min(n - i0, L - r)
            if r == 0:  # a new segment: retrieval reads the memory as it stands now
                seg_mem, xkv, hkv = mem[0], None, None
            # the memory state is fp32 for a bf16 model (as native): read in its dtype, continue in the model's
            y_h = mlp_read(seg_mem, rq[:, :, i0:i0 + l].to(seg_mem[0].dtype), mem_layer.act)
            retrieved = mem_layer.output(y_h.to(rq.dtype))
            _, hk, hv = attn.project(retrieved)
            hkv = (_cat(None if hkv is None else hkv[0], hk), _cat(None if hkv is None else hkv[1], hv))
            xkv = (_cat(None if xkv is None else xkv[0], kt[:, :, i0:i0 + l]),
                   _cat(None if xkv is None else xkv[1], vt[:, :, i0:i0 + l]))
            i = torch.arange(l, device=h.device).unsqueeze(1) + r
            j = torch.arange(r + l, device=h.device).unsqueeze(0)
            causal = j <= i  # token j of the segment (and its retrieval h_j) visible to query i
            mask = torch.cat([causal.new_ones(l, P), causal, causal], dim=1)
            keys = torch.cat([kp.to(kt.dtype), hkv[0], xkv[0]], dim=2)
            vals = torch.cat([vp.to(vt.dtype), hkv[1], xkv[1]], dim=2)
            y = attn.attend(qt[:, :, i0:i0 + l], keys, vals, mask)
            m, mem = mem_layer(self.memory_norm(y), mem)
            outs.append(y * torch.sigmoid(m))
            r, i0 = (r + l) % L, i0 + l
        if r == 0:
            xkv = hkv = seg_mem = None
        text = h[:, P:] + torch.cat(outs, dim=1)
        h = text if out_p is None else torch.cat([h[:, :P] + out_p, text], dim=1)
        return h, (mem, xkv, hkv, seg_mem)


def titans_forward(model: nn.Module, ids: torch.Tensor, state):
    """ids `[B, n]` (real tokens only), state None or (layer states, seen) -> (final-normed text hidden states
    `[B, n, D]`, new state). `model` is the MemtrainModel (embed_tokens, meta_tokens, layers, norm)."""
    h = model.embed_tokens(ids)
    if model.meta_tokens is not None:
        h = torch.cat([model.meta_tokens.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1), h], dim=1)
    layers, seen = state if state is not None else ((None,) * len(model.layers), 0)
    new = []
    for layer, layer_state in zip(model.layers, layers):
        h, layer_state = layer.step(h, layer_state, seen)
        new.append(layer_state)
    P = model.config.num_meta_tokens
    return model.norm(h[:, P:]), (tuple(new), seen + ids.shape[1])


def init_titans_weights(module: nn.Module, std: float) -> None:
    """Initial values of the memory's own parameters for a fresh (untrained) model: M_0 with std 1/sqrt(fan_in),
    conv close to the identity, gate biases giving the config's theta_init, eta_init, alpha_init."""
    if isinstance(module, MemtrainNeuralMemory):
        for w in module.init_weights:
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        if module.conv_size:
            for p in (module.conv_q, module.conv_kv):
                nn.init.normal_(p, std=std)
                with torch.no_grad():
                    p[:, -1] += 1.0
        bias = torch.tensor([math.log(p / (top - p)) for p, top in zip(module.gate_init, module.gate_max)])
        with torch.no_grad():
            module.gates.bias.copy_(bias.repeat(module.heads))
