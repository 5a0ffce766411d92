"""Memory of one training step per rank, for a parallel layout: weights, gradients, optimizer state, activations and
the transients on top of them, and which layouts fit a GPU (docs/planner.md states every term).

    plan = plan_layout(cfg, world)                        # the config's own [parallel] layout
    plans = search_layouts(cfg, world, gpu_bytes)         # every layout that fits, best first
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from memtrain.launch.config import LayoutError, check_layout
from memtrain.model.memory import memory_spec

from ..config import Config
from ..configtree import ConfigError
from . import activations as act
from .params import Param, model_params, on_stage, stage_layers

GiB = 2**30
BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (ZeRO 1/2 gradient bucket), capped below
CHECKPOINT_COST = {"none": 0, "selective": 1, "full": 2}  # recompute per step: none < selective < full


@dataclass(frozen=True)
class Layout:
    """A parallel layout of `world` ranks (dp derived) with its ZeRO stage and checkpoint mode."""

    world: int
    tp: int
    pp: int
    cp: int
    zero_stage: int
    checkpoint: str
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    def __str__(self) -> str:
        return (f"tp {self.tp}{' (sequence parallel)' if self.sequence_parallel else ''} × pp {self.pp} × "
                f"cp {self.cp} × dp {self.dp}, ZeRO {self.zero_stage}, activation checkpoint {self.checkpoint}")


@dataclass
class RankPlan:
    """Bytes one rank of one pipeline stage holds at the peak of a step (every field is bytes but `params`)."""

    stage: int
    label: str
    params: int
    weights: float
    gradients: float
    master: float
    optimizer: float
    buckets: float
    activations: float
    in_flight: int
    per_micro_batch: float
    memory_state: float
    grads_in_backward: float
    """Gradients already held while the backward runs: DeepSpeed's persistent buffers, or earlier micro-batches'
    gradients when accumulating or pipelining (0 for one micro-batch on the torch engine: they appear as
    activations are freed)."""
    transient_backward: float
    transient_step: float

    @property
    def static(self) -> float:
        return self.weights + self.master + self.optimizer + self.buckets

    @property
    def peak(self) -> float:
        """Static state, plus the larger of: all activations at the start of the backward (with the gradients
        already held, the head's first gradients and its logits' gradient), or all gradients at the optimizer
        step with its temporaries (docs/planner.md#peak)."""
        return self.static + max(self.activations + self.grads_in_backward + self.transient_backward,
                                 self.gradients + self.transient_step)


@dataclass
class Plan:
    layout: Layout
    precision: str
    engine: str
    device: str
    total_params: int
    ranks: list[RankPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(r.peak for r in self.ranks)


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """(device, precision) the plan assumes: the config's, with auto = a CUDA GPU in bf16 unless device = "cpu"."""
    device = "cpu" if cfg.device == "cpu" else "cuda"
    precision = cfg.precision if cfg.precision != "auto" else ("fp32" if device == "cpu" else "bf16")
    return device, precision


def engine_of(cfg: Config, layout: Layout) -> str:
    """torch, deepspeed or pipeline: `memtrain.train.engines.use_deepspeed` for this layout."""
    spec = memory_spec(cfg.model.memory)
    if layout.pp > 1:
        return "own pipeline" if spec.pipeline == "own" else "pipeline"
    engine = cfg.parallel.engine
    if engine == "auto":
        return "deepspeed" if (layout.world > 1 or layout.zero_stage > 0) and not spec.own_backward(cfg.model) \
            else "torch"
    return engine


def check(cfg: Config, layout: Layout) -> None:
    """The trainer's own layout rules (memtrain/launch/config.py), as one-line ConfigErrors."""
    if layout.world < 1:
        raise ConfigError(f"--world={layout.world} must be >= 1")
    if layout.world % (layout.tp * layout.pp * layout.cp):
        raise ConfigError(f"parallel.tp={layout.tp} × parallel.pp={layout.pp} × parallel.cp={layout.cp} does not "
                          f"divide --world={layout.world}: choose sizes whose product divides it")
    if cfg.parallel.dp and cfg.parallel.dp != layout.dp:
        raise ConfigError(f"parallel.dp={cfg.parallel.dp} does not match --world={layout.world} / (tp·pp·cp) = "
                          f"{layout.dp}: set parallel.dp=0 (derived)")
    if layout.zero_stage and cfg.parallel.engine == "torch":
        raise ConfigError(f"parallel.zero_stage={layout.zero_stage} needs parallel.engine='deepspeed' (or 'auto')")
    parallel = dataclasses.replace(cfg.parallel, tp=layout.tp, pp=layout.pp, cp=layout.cp,
                                   zero_stage=layout.zero_stage, activation_checkpoint=layout.checkpoint,
                                   sequence_parallel=layout.sequence_parallel)
    try:
        check_layout(cfg.model, parallel, cfg.data.seq_len)
    except LayoutError as e:
        raise ConfigError(str(e)) from None


def plan_layout(cfg: Config, world: int, layout: Layout | None = None,
                params: list[Param] | None = None) -> Plan:
    """The memory plan of `layout` (default: the config's [parallel] section) on `world` ranks."""
    p = cfg.parallel
    layout = layout or Layout(world, p.tp, p.pp, p.cp, p.zero_stage, p.activation_checkpoint, p.sequence_parallel)
    check(cfg, layout)
    params = params if params is not None else model_params(cfg.model)
    device, precision = resolve_precision(cfg)
    engine = engine_of(cfg, layout)
    plan = Plan(layout, precision, engine, device, sum(q.numel for q in params), [])
    for stage in range(layout.pp):
        plan.ranks.append(_rank(cfg, layout, params, stage, device, precision, engine))
    if memory_spec(cfg.model.memory).plan is None:
        plan.notes.append(f"model.memory={cfg.model.memory!r} is a plugin kind: its activations are estimated as the "
                          f"plain block's")
    return plan


def _stage_label(stage: int, pp: int) -> str:
    if pp == 1:
        return "every rank"
    return f"stage {stage}" + (" (first)" if stage == 0 else " (last)" if stage == pp - 1 else "")


def _rank(cfg: Config, layout: Layout, params: list[Param], stage: int, device: str, precision: str,
          engine: str) -> RankPlan:
    m, tp = cfg.model, layout.tp
    mine = [q for q in params if on_stage(q.name, m, layout.pp, stage)]
    n = sum(q.numel_on_rank(tp) for q in mine)
    st = _state(mine, n, layout, device, precision, engine)
    a = _activations(cfg, layout, stage, precision)
    _, _, last = stage_layers(m, layout.pp, stage)
    head_grad = 0.0
    if last:  # the backward starts with the logits' gradient (fp32) and the output head's weight gradient
        head = sum(q.numel_on_rank(tp) for q in mine if q.name.startswith("head.") or q.name == "embed.tokens.weight")
        head_grad = st["gradients"] / max(n, 1) * head + 4.0 * a["B"] * a["T"] * m.padded_vocab_size / tp
    # gradients already held through the backward: DeepSpeed's buffers, earlier micro-batches (accumulation, 1F1B)
    held = st["gradients"] if (cfg.optim.grad_accum > 1 or layout.pp > 1 or engine not in TORCH_LIKE) else 0.0
    return RankPlan(stage, _stage_label(stage, layout.pp), n, st["weights"], st["gradients"], st["master"],
                    st["optimizer"], st["buckets"], a["in_flight"] * a["per_micro"], a["in_flight"], a["per_micro"],
                    a["memory_state"], held, a["recompute"] + head_grad + st["in_backward"], st["step"])


TORCH_LIKE = ("torch", "own pipeline")  # engines that keep fp32 weights and run AdamW themselves


def _state(mine: list[Param], n: int, layout: Layout, device: str, precision: str, engine: str) -> dict[str, float]:
    """Bytes of weights, gradients, fp32 master, AdamW moments and buckets of `n` parameters on one rank, and the
    transients of the backward (`in_backward`) and of the optimizer step (`step`)."""
    low = precision in ("bf16", "fp16")
    zero, shards = layout.zero_stage, layout.dp * layout.cp  # ZeRO partitions over data × context parallel
    out = dict(master=0.0, buckets=0.0, in_backward=0.0, step=0.0)
    if engine in TORCH_LIKE:
        # fp32 weights, gradients and AdamW moments (memtrain/train/engines/local.py); bf16 runs under autocast,
        # whose cache holds a bf16 copy of every weight through forward and backward
        out.update(weights=4.0 * n, gradients=4.0 * n, optimizer=8.0 * n, in_backward=2.0 * n if low else 0.0)
        # AdamW: CUDA's foreach path makes one fp32 temporary per parameter (the second moment's sqrt); on CPU it
        # goes tensor by tensor (two temporaries of the largest). DP > 1: the flat all-reduce buffer of optim.py.
        largest = max((q.numel_on_rank(layout.tp) for q in mine), default=0)
        out["step"] = max(4.0 * n if device == "cuda" else 8.0 * largest, 4.0 * n if shards > 1 else 0.0)
        return out
    w = 2.0 if low else 4.0  # DeepSpeed keeps the weights (and gradients) in the training dtype
    out.update(weights=w * n / (shards if zero == 3 else 1), gradients=w * n / (shards if zero >= 2 else 1),
               optimizer=8.0 * n / (shards if zero >= 1 else 1))
    if zero >= 1:
        out["master"] = 4.0 * n / shards  # the fp32 partition the optimizer updates (in fp32 runs too)
        out["step"] = 4.0 * n / shards  # this partition's gradients converted to fp32 for the step
        if zero in (1, 2):
            out["buckets"] = w * min(BUCKET_ELEMENTS, n)  # the contiguous gradient-reduction bucket
    elif low:  # DeepSpeed's BF16/FP16 optimizer wrapper: fp32 master weights and fp32 gradient accumulators
        out["master"] = 4.0 * n
        out["gradients"] += 4.0 * n
    if zero == 3:  # one module's full weights gathered for its forward/backward, and the next one prefetched
        out["in_backward"] = 2 * w * _largest_block(mine, layout.tp)
    return out


def _activations(cfg: Config, layout: Layout, stage: int, precision: str) -> dict[str, float]:
    """Activation bytes of one micro-batch on `stage`, micro-batches in flight (1F1B), the recomputed layer's
    activations in the backward under checkpointing, and the memory state (Titans weights, RMT tokens)."""
    m = cfg.model
    blocks, first, last = stage_layers(m, layout.pp, stage)
    s = act.shapes(m, cfg.data.batch_size, cfg.data.seq_len, layout.tp, layout.cp, layout.sequence_parallel,
                   cuda=resolve_precision(cfg)[0] == "cuda")
    a_bytes = 2.0 if precision in ("bf16", "fp16") else 4.0
    mode, interval = layout.checkpoint, cfg.parallel.activation_checkpoint_interval
    if layout.pp > 1 and interval:  # the pipeline engines recompute groups of `interval` blocks
        mode = "full"
    low, fp32 = act.layer_elements(m, s, mode)
    none_low, none_fp32 = act.layer_elements(m, s, "none")
    per_micro = s.B * (len(blocks) * (a_bytes * low + 4.0 * fp32)
                       + (a_bytes * act.embed_elements(m, s) if first else 0.0)
                       + (4.0 * act.head_elements(m, s) if last else 0.0))  # the loss upcasts logits to fp32
    recompute = 0.0
    if mode != "none":  # the backward re-runs one block (a group of `interval` in a pipeline) keeping everything
        recompute = s.B * (a_bytes * none_low + 4.0 * none_fp32) * max(1, interval if layout.pp > 1 else 1)
    in_flight = min(layout.pp - stage, cfg.optim.grad_accum) if layout.pp > 1 else 1  # 1F1B warm-up
    memory_state = act.state_bytes(m, s, len(blocks), a_bytes)
    return dict(B=s.B, T=s.T, per_micro=per_micro, recompute=recompute, in_flight=in_flight,
                memory_state=memory_state)


def _largest_block(mine: list[Param], tp: int) -> int:
    """Elements of the largest block (or top-level parameter) on one TP rank: what ZeRO-3 gathers at once."""
    sizes: dict[str, int] = {}
    for q in mine:
        key = ".".join(q.name.split(".")[:2]) if q.name.startswith("blocks.") else q.name
        sizes[key] = sizes.get(key, 0) + q.numel_on_rank(tp)
    return max(sizes.values(), default=0)


def candidate_layouts(cfg: Config, world: int) -> list[Layout]:
    """Every layout the trainer accepts on `world` ranks: tp within a node of 8 GPUs, any pp, the config's cp."""
    m, cp = cfg.model, cfg.parallel.cp
    out = []
    for tp in (d for d in range(1, min(8, world) + 1) if world % d == 0):
        for pp in (d for d in range(1, m.n_layers + 1) if world % (tp * d * cp) == 0):
            for zero in range(4):
                for mode in ("none", "selective", "full"):
                    layout = Layout(world, tp, pp, cp, zero, mode, tp > 1 and cfg.parallel.sequence_parallel)
                    try:
                        check(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=0)), layout)
                    except ConfigError:
                        continue
                    out.append(layout)
    return out


def rank_key(plan: Plan, gpu_bytes: float) -> tuple:
    """Best first: fewest model-parallel ranks (tp·pp: every layer or stage boundary communicates), then the
    cheapest recomputation (none < selective < full), then the lowest ZeRO stage (3 gathers weights every
    step), then the largest headroom of the fullest rank (docs/planner.md#search)."""
    lay = plan.layout
    return (lay.tp * lay.pp, CHECKPOINT_COST[lay.checkpoint], lay.zero_stage, plan.peak - gpu_bytes)


def search_layouts(cfg: Config, world: int, usable_bytes: float) -> list[Plan]:
    """Plans of every candidate layout whose fullest rank fits `usable_bytes`, best first (`rank_key`)."""
    params = model_params(cfg.model)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=0))
    plans = [plan_layout(cfg, world, layout, params) for layout in candidate_layouts(cfg, world)]
    return sorted((p for p in plans if p.peak <= usable_bytes), key=lambda p: rank_key(p, usable_bytes))
