"""Hugging Face modeling code of an exported memtrain model (copied verbatim into every export).

Plain torch + transformers, no memtrain imports: it runs under `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` anywhere (with memtrain_layers.py, memtrain_rmt.py and memtrain_titans.py next to it,
imported relatively). It reproduces memtrain's `build_model(cfg)` for every `model.memory`: the DecoderLM
(memory = "none") here, the RMT in memtrain_rmt.py, the Titans LMM / MAC / MAG / MAL blocks in memtrain_titans.py.
The plain decoder:

    ids [B, T] -> embed -> (meta tokens [P, D] in front) -> L x (RMSNorm, GQA attention, RMSNorm, SwiGLU)
               -> final RMSNorm -> lm_head -> logits [B, T, V]

Numerics follow the native model op for op: RMSNorm in fp32, rotary tables built in fp64 and applied in fp32
(rotate-half layout, text positions count from 0, meta tokens carry no rotation), softmax scale 1/sqrt(Dh).

Meta tokens and the KV cache. Meta-token queries see only the meta tokens, so their hidden states -- and their
keys and values in every layer -- do not depend on the input: they are computed once (`MemtrainModel.prefix_kv`)
and kept in the cache object as `cache.memtrain_prefix` (one [1, Hkv, P, Dh] pair per layer, shared by the whole
batch). The cache's own layers hold text keys/values only, so `cache.get_seq_length()` counts text tokens,
which is what `generate()` assumes, and windowed layers can use transformers' sliding-window cache layers.

Padding. Masks are built from the 2-D `attention_mask` (1 = real token): a padded key is never visible, and
rotary positions count real tokens only (`cumsum(mask) - 1`), so a left-padded row computes exactly what the
same row computes alone. The sliding window is measured in those positions.

Memory models (`forward_memory`). The recurrent state (RMT memory and pending segment, Titans memory weights,
momenta, conv tail and attention/MAC caches) lives in the cache object, one state per batch row
(`cache.memtrain_rows`) with the row's count of real tokens (`cache.memtrain_seen`); `generate()` then feeds one
token per step and the state carries it on exactly. Only tokens whose attention_mask is 1 are fed: padding never
enters memory or attention, and each row runs on its own segment / chunk grid, as it would alone. Rows at the same
count run batched. Position ids are not used (positions follow from the state). Beam search reorders the rows
(`_reorder_cache`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_memtrain import TITANS_MEMORY, MemtrainConfig
from .memtrain_layers import MemtrainAttentionProjections, MemtrainMLP, MemtrainRMSNorm, rotary_cos_sin
from .memtrain_rmt import rmt_forward
from .memtrain_titans import MemtrainTitansLayer, init_titans_weights, titans_forward

# transformers renamed the cache argument and output field `past_key_values` -> `cache` (5.2x): generate() passes
# it under the name its output classes use, and forward() must accept it under that name.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _take_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The cache under either name (`cache` in newer transformers, `past_key_values` in older)."""
    other = kwargs.pop("past_key_values", None)
    if cache is not None and other is not None and cache is not other:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else other


class MemtrainAttention(MemtrainAttentionProjections):
    """Grouped-query attention over [meta-token prefix; text] with the KV cache (memory = "none")."""

    def forward_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Meta tokens `[1, P, D]`: bidirectional among themselves, no rotation. Returns (out, (k, v))."""
        q, k, v = self.project(x)
        return self.attend(q, k, v, None), (k, v)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        text_keys: "TextKeys",
        cache: Cache | None,
    ) -> torch.Tensor:
        """Text tokens x `[B, T, D]` -> `[B, T, D]`, attending to the prefix, the cached and the new text keys."""
        q, k, v = self.project(x, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = text_keys.mask(k.shape[2], self.window)  # [B, 1, T, Nk]
        if prefix_kv is not None:
            pk, pv = prefix_kv
            B = k.shape[0]
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
            mask = torch.cat([mask.new_ones(*mask.shape[:3], pk.shape[2]), mask], dim=-1)
        return self.attend(q, k, v, mask)


class TextKeys:
    """Positions and validity of every text token seen so far (cached + new), for building per-layer masks.

    `positions`/`valid` are `[B, L]` over all L text tokens; the new queries are the last T of them. A layer whose
    cache keeps only its last Nk keys (sliding window) uses the last Nk columns.
    """

    def __init__(self, positions: torch.Tensor, valid: torch.Tensor, query_positions: torch.Tensor, num_new: int):
        self.positions, self.valid = positions, valid
        self.query_positions = query_positions  # [B, T]
        self.num_new = num_new

    def mask(self, num_keys: int, window: int | None) -> torch.Tensor:
        """Boolean `[B, 1, T, num_keys]`: key visible iff real, not after the query, and inside the window.

        A query always sees itself, so a padded query row is never empty (an empty row would give NaN, and NaN
        values, although masked, poison the real rows through 0 * NaN).
        """
        L, T = self.positions.shape[1], self.num_new
        k_idx = torch.arange(L - num_keys, L, device=self.positions.device)
        q_idx = torch.arange(L - T, L, device=self.positions.device)
        visible = (k_idx.view(1, 1, -1) <= q_idx.view(1, -1, 1)) & self.valid[:, -num_keys:].unsqueeze(1)
        if window is not None:
            dist = self.query_positions.unsqueeze(-1) - self.positions[:, -num_keys:].unsqueeze(1)
            visible = visible & (dist < window)
        visible = visible | (k_idx.view(1, 1, -1) == q_idx.view(1, -1, 1))
        return visible.unsqueeze(1)


class MemtrainDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then + mlp(norm(h))."""

    def __init__(self, config: MemtrainConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MemtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MemtrainAttention(config, layer_idx)
        self.post_attention_layernorm = MemtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MemtrainMLP(config)

    def forward_prefix(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn.forward_prefix(self.input_layernorm(h))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def forward(self, h: torch.Tensor, *args: Any) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), *args)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_masked(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor):
        """The block over a whole RMT segment `[B, N, D]` under the boolean mask `[N, N]`."""
        h = h + self.self_attn.forward_masked(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class MemtrainPreTrainedModel(PreTrainedModel):
    config_class = MemtrainConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MemtrainDecoderLayer", "MemtrainTitansLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_cache_class = True  # transformers 4.x: accepts Cache objects

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MemtrainRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MemtrainModel):
            for p in (module.meta_tokens, getattr(module, "memory_init", None), getattr(module, "read_slots", None),
                      getattr(module, "write_slots", None)):
                if p is not None:
                    nn.init.normal_(p, mean=0.0, std=std)
        init_titans_weights(module, std)  # the memory's M_0, conv taps and gate biases


class MemtrainModel(MemtrainPreTrainedModel):
    """The decoder without the output head: ids -> final-normed hidden states of the text tokens."""

    def __init__(self, config: MemtrainConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.meta_tokens = nn.Parameter(torch.zeros(config.num_meta_tokens, config.hidden_size)) \
            if config.num_meta_tokens else None
        layer = MemtrainTitansLayer if config.memory in TITANS_MEMORY else MemtrainDecoderLayer
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MemtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.memory == "rmt":  # learned initial memory, per-slot read/write embeddings, write-output norm
            M, D = config.memory_config["num_memory"], config.hidden_size
            self.memory_init = nn.Parameter(torch.zeros(M, D))
            self.read_slots = nn.Parameter(torch.zeros(M, D))
            self.write_slots = nn.Parameter(torch.zeros(M, D))
            self.memory_norm = MemtrainRMSNorm(D, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def prefix_kv(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values of the meta tokens in every layer, `[1, Hkv, P, Dh]` each (input independent)."""
        if self.meta_tokens is None:
            return None
        h = self.meta_tokens.to(dtype).unsqueeze(0)
        out = []
        for layer in self.layers:
            h, kv = layer.forward_prefix(h)
            out.append(kv)
        return out

    def _text_keys(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                   past: int, T: int, B: int, device: torch.device) -> TextKeys:
        L = past + T
        if attention_mask is None:
            positions = torch.arange(L, device=device).unsqueeze(0).expand(B, -1)
            valid = torch.ones(B, L, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != L:
                raise ValueError(f"attention_mask must be [batch, past + new tokens] = [{B}, {L}], "
                                 f"got {tuple(attention_mask.shape)}")
            valid = attention_mask.to(device).bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        query_positions = positions[:, -T:] if position_ids is None else position_ids.to(device).expand(B, -1)
        return TextKeys(positions, valid, query_positions, T)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = _take_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("the cache (past_key_values) must be a transformers Cache (e.g. DynamicCache)")
        if getattr(cache, "is_compileable", False):
            # static caches return fixed-size zero-padded buffers; the masks here assume the keys seen so far
            raise NotImplementedError("static KV caches are not supported: use the default dynamic cache")
        if self.config.memory != "none":
            if input_ids is None:
                raise ValueError(f"memory={self.config.memory!r} models take input_ids, not inputs_embeds")
            hidden = forward_memory(self, input_ids, attention_mask, cache)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache})
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h.shape
        past = cache.get_seq_length() if cache is not None else 0

        prefix = getattr(cache, "memtrain_prefix", None) if cache is not None else None
        if prefix is None:
            prefix = self.prefix_kv(h.dtype)
            if cache is not None:
                cache.memtrain_prefix = prefix
        keys = self._text_keys(attention_mask, position_ids, past, T, B, h.device)
        cos, sin = rotary_cos_sin(keys.query_positions, self.config.head_dim, self.config.rope_theta)
        cos_sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, Dh]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, prefix[i] if prefix is not None else None, keys, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{_CACHE_FIELD: cache})


def _stack(trees: list) -> Any:
    """Per-row states (batch 1 each, same structure) -> one batched state; ints/None are equal across rows."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees, dim=0)
    if isinstance(first, tuple):
        return tuple(_stack([t[i] for t in trees]) for i in range(len(first)))
    return first


def _row(tree: Any, i: int) -> Any:
    """Row i (kept as batch 1) of a batched state."""
    if isinstance(tree, torch.Tensor):
        return tree[i:i + 1]
    if isinstance(tree, tuple):
        return tuple(_row(t, i) for t in tree)
    return tree


def forward_memory(model: "MemtrainModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   cache: Cache | None) -> torch.Tensor:
    """RMT / Titans: final-normed hidden states `[B, T, D]` of the new tokens (zeros at padded positions).

    Padding never enters the memory: only the tokens whose `attention_mask` is 1 are fed, row by row, so a padded
    row computes exactly what it computes alone. Every row keeps its own recurrent state and its count of real
    tokens seen (`cache.memtrain_rows`, `cache.memtrain_seen`); rows with the same count and the same number of
    new real tokens (the same segment and chunk phase) run together as one batch.
    """
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
        else attention_mask[:, -T:].to(input_ids.device).bool()
    rows = getattr(cache, "memtrain_rows", None) if cache is not None else None
    if rows is None:
        rows, seen = [None] * B, [0] * B
    else:
        seen = cache.memtrain_seen
        if len(rows) != B:
            raise ValueError(f"the cache holds memory for batch {len(rows)}, the input has batch {B}")
    run = rmt_forward if model.config.memory == "rmt" else titans_forward
    groups: dict[tuple[int, int], list[int]] = {}
    for b in range(B):
        n = int(valid[b].sum())
        if n:
            groups.setdefault((seen[b], n), []).append(b)
    hidden = model.embed_tokens.weight.new_zeros(B, T, model.config.hidden_size)
    for (count, n), members in groups.items():
        ids = torch.stack([input_ids[b][valid[b]] for b in members])
        state = None if rows[members[0]] is None else _stack([rows[b] for b in members])
        out, state = run(model, ids, state)
        for k, b in enumerate(members):
            hidden[b, valid[b]] = out[k].to(hidden.dtype)
            rows[b], seen[b] = _row(state, k), count + n
    if cache is not None:
        cache.memtrain_rows, cache.memtrain_seen = rows, seen
    return hidden


def _new_cache(config: MemtrainConfig) -> DynamicCache:
    """A DynamicCache with sliding-window layers where the config has them (transformers >= 4.56), else plain."""
    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


class MemtrainForCausalLM(MemtrainPreTrainedModel, GenerationMixin):
    """Causal LM head on `MemtrainModel`; `lm_head` shares the embedding matrix when tie_word_embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MemtrainConfig):
        super().__init__(config)
        self.model = MemtrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: rows of the KV cache and of the per-row memory states follow their beams."""
        cache.reorder_cache(beam_idx)  # text keys/values (the meta-token prefix is shared by all rows)
        rows = getattr(cache, "memtrain_rows", None)
        if rows is not None:
            idx = beam_idx.tolist()
            cache.memtrain_rows = [rows[i] for i in idx]
            cache.memtrain_seen = [cache.memtrain_seen[i] for i in idx]
        return cache

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits `[B, T, V]` (the last `logits_to_keep` positions when > 0); loss when `labels` are given
        (labels aligned with input_ids, shifted here; -100 is ignored)."""
        cache = _take_cache(cache, kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache)
        cache = getattr(out, _CACHE_FIELD)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


__all__ = ["MemtrainForCausalLM", "MemtrainModel", "MemtrainPreTrainedModel"]
