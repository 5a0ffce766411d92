"""What an engine's checkpoint holds: its weights and AdamW moments as canonical sharded tensors, plus a little state.

    tensors = engine_tensors(named, optimizer, layout, ...)   # this rank's rectangles (memtrain/train/sharded.py)
    save_tensors(dir, tensors.save); small = small_state(...)  # small: schedule, AdamW step, DeepSpeed counters
    load_tensors(dir, tensors.load); tensors.finish()          # then restore_small_state(...)

Three ways a rank holds the state of a parameter `p` (TP shard of its canonical tensor):

| held as | engines | weights saved from | moments |
|---|---|---|---|
| whole | torch engine, RMT pipeline, DeepSpeed ZeRO 0 in fp32 | `p` | `optimizer.state[p]` |
| whole, fp32 master | DeepSpeed ZeRO 0 in bf16/fp16 (`fp16_groups` / `fp32_groups`) | the master | the master's moments |
| flat fragment | DeepSpeed ZeRO 1/2, bf16 (`p._hp_mapping`) | the fp32 master fragment | the fragment's moments |
| ZeRO-3 partition | DeepSpeed ZeRO 3 (`p.ds_tensor`) | the fp32 partition | the partition's moments |

Weights are always saved in fp32 from the master copy, so a bf16 run resumes at full precision. A fragment rank
loads the whole TP shard of the weights (every ZeRO 1/2 rank holds the whole bf16/fp32 working copy anyway), then
copies its part into the master fragment; moments are read straight into the optimizer's own storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from memtrain.launch.groups import Layout
from memtrain.launch.tensor_parallel import partition_dim

from ..sharded import Pieces, placement

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class EngineTensors:
    """This rank's rectangles of every canonical tensor: what it writes, what it reads, and what to do after."""

    save: dict[str, Pieces] = field(default_factory=dict)
    load: dict[str, Pieces] = field(default_factory=dict)
    after_load: list[Callable[[], None]] = field(default_factory=list)

    def finish(self) -> None:
        with torch.no_grad():
            for fn in self.after_load:
                fn()


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the moments (DeepSpeed's ZeRO and bf16 wrappers keep it in `.optimizer`)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def init_adam_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> None:
    """AdamW's state of `params` (default: its groups') created as its first step would (zero moments, step 0),
    so it can be loaded into."""
    for p in params if params is not None else [p for g in optimizer.param_groups for p in g["params"]]:
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _add(tensors: EngineTensors, name: str, pieces: Pieces, saved_here: bool, load: Pieces | None = None) -> None:
    if saved_here:
        tensors.save[name] = pieces
    tensors.load[name] = load if load is not None else pieces


def engine_tensors(named: dict[str, nn.Parameter], optimizer: Any, layout: Layout, *,
                   skip_save: frozenset[str] = frozenset()) -> EngineTensors:
    """The rectangles of weights and moments of `named` (DecoderLM names -> this rank's parameters).

    `skip_save`: names another rank writes (the last pipeline stage's copy of a tied weight: DCP takes a tensor's
    rectangles from every rank, and two differently partitioned copies would overlap)."""
    out = EngineTensors()
    inner = innermost_optimizer(optimizer)
    init_adam_state(inner)  # before the first step the moments do not exist yet
    # ZeRO 3 puts its flat fp32 partitions into the optimizer's groups only while it steps
    init_adam_state(inner, list(getattr(optimizer, "fp32_partitioned_groups_flat", [])))
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        # ZeRO 1/2 and bf16 point each parameter's fragment at the moments once, lazily, and may have done so
        # before the moments existed (an empty map): point them again, at the tensors that exist now
        optimizer._hp_optimizer_states_linked = False
        link()
    # DeepSpeed's fp16/bf16 optimizer without ZeRO keeps one fp32 master per parameter; the moments belong to it
    masters = {id(lp): hp for lps, hps in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
               for lp, hp in zip(lps, hps)}
    for name, p in named.items():
        here = name not in skip_save
        if hasattr(p, "ds_tensor"):
            _zero3(out, name, p, layout, here)
        elif hasattr(p, "_hp_mapping"):
            _fragment(out, name, p, layout, here)
        else:
            master = masters.get(id(p))
            held = master if master is not None else p  # the key of its moments in the optimizer's state
            where = placement(p.shape, partition_dim(p), layout.tp_rank, layout.tp)
            _add(out, f"model.{name}", Pieces.whole(where, held.data), here)
            if held in inner.state:
                for key in MOMENTS:
                    _add(out, f"optim.{key}.{name}", Pieces.whole(where, inner.state[held][key]), here)
            if master is not None:
                out.after_load.append(lambda p=p, master=master: p.data.copy_(master))
    return out


def _fragment(out: EngineTensors, name: str, p: nn.Parameter, layout: Layout, here: bool) -> None:
    """ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's flat fragment of the fp32 master copy and moments."""
    where = placement(p.shape, partition_dim(p), layout.tp_rank, layout.tp)
    mapping = p._hp_mapping  # None when another DP rank holds every element of p
    whole = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    out.load[f"model.{name}"] = Pieces.whole(where, whole)
    start = mapping.lp_fragment_address.start if mapping is not None else 0
    if mapping is not None:
        if here:
            out.save[f"model.{name}"] = Pieces.fragment(where, mapping.hp_fragment, start)
        for key in MOMENTS:
            _add(out, f"optim.{key}.{name}",
                 Pieces.fragment(where, mapping.get_optim_state_fragment(key), start), here)
    else:
        for key in MOMENTS:  # nothing of p on this rank, but every rank must name the same tensors
            _add(out, f"optim.{key}.{name}", Pieces(where, []), here)
        if here:
            out.save[f"model.{name}"] = Pieces(where, [])

    def copy_in() -> None:
        p.data.copy_(whole)
        if mapping is not None:
            mapping.hp_fragment.copy_(whole.reshape(-1).narrow(0, start, mapping.hp_fragment.numel()))
    out.after_load.append(copy_in)


def _zero3(out: EngineTensors, name: str, p: nn.Parameter, layout: Layout, here: bool) -> None:
    """ZeRO 3: this rank's partition of the flat parameter (the last rank's is padded past the end)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    where = placement(tuple(p.ds_shape), partition_dim(p), layout.tp_rank, layout.tp)
    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    valid = max(0, min(p.ds_numel - start, size))
    fp32 = safe_get_local_fp32_param(p)
    _add(out, f"model.{name}", Pieces.fragment(where, fp32.narrow(0, 0, valid), start), here)
    for key in MOMENTS:
        state = safe_get_local_optimizer_state(p, key)
        _add(out, f"optim.{key}.{name}", Pieces.fragment(where, state.narrow(0, 0, valid), start), here)
    out.after_load.append(lambda: p.ds_tensor.data.copy_(fp32))


def small_state(optimizer: Any, scheduler: Any, engine: Any = None) -> dict[str, Any]:
    """What the canonical tensors do not hold: the schedule, the optimizer's step count and hyper-parameters,
    DeepSpeed's step counters and loss scale. Plain numbers and lists (read back weights-only)."""
    inner = innermost_optimizer(optimizer)
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    state: dict[str, Any] = {
        "scheduler": scheduler.state_dict(),
        "adam_step": max(steps) if steps else 0.0,
        "groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                   for g in inner.param_groups]}
    if engine is not None:
        state["deepspeed"] = {k: int(getattr(engine, k)) for k in ("global_steps", "global_samples", "micro_steps",
                                                                     "skipped_steps") if hasattr(engine, k)}
        scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
        if scaler is not None:
            state["loss_scale"] = {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}
    return state


def restore_small_state(state: dict[str, Any], optimizer: Any, scheduler: Any, engine: Any = None) -> None:
    """The inverse of `small_state` (after the tensors are loaded)."""
    inner = innermost_optimizer(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    for group, saved in zip(inner.param_groups, state["groups"]):
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    for s in inner.state.values():
        if "step" in s:
            s["step"].fill_(state["adam_step"]) if torch.is_tensor(s["step"]) else s.update(step=state["adam_step"])
    if engine is not None:
        for k, v in state.get("deepspeed", {}).items():
            setattr(engine, k, v)
        scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
        for k, v in state.get("loss_scale", {}).items():
            if scaler is not None:
                setattr(scaler, k, v)
