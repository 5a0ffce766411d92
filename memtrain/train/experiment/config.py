"""The long-context experiment's config tree: `configs/experiments/long_context*.toml`.

Strict TOML like the trainer's (unknown keys, wrong types and bad values are one-line `ConfigError`s naming the
dotted key), `--set key=value` overrides. `[model]` is the shared base model (width, depth, window); every variant
is derived from it by `variant_model` so all have the same width and depth and differ only in their memory.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from memtrain.model.config import ModelConfig
from memtrain.model.errors import ModelConfigError
from memtrain.model.memory import memory_spec

from ..configtree import ConfigError, apply_override, build, read_toml

BASELINES = ("window", "meta")  # no memory: a sliding window alone, and the window with meta tokens
VARIANTS = (*BASELINES, "rmt", "lmm", "mac", "mag", "mal")  # the others name memory kinds (memtrain/model/memory)
"""window: the sliding-window baseline; meta: the same plus `meta_tokens` meta tokens; the rest: model.memory."""
TASKS = ("niah_single", "qa1", "qa2", "qa3")


@dataclass
class TrainSettings:
    steps: int = 600
    """Optimizer steps per variant; each step is one batch of freshly generated examples of `train_len` tokens."""

    batch_size: int = 32
    """Examples per step."""

    lr: float = 1e-3
    """Peak AdamW learning rate (linear warmup, then cosine decay to lr / 10)."""

    warmup_steps: int = 20
    """Linear warmup steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 switches clipping off."""

    tasks: list[str] = field(default_factory=lambda: ["niah_single", "qa1", "qa2", "qa3"])
    """Training batches cycle through this list (one task per batch); repeat a task to train on it more often."""

    curriculum: list[list[int]] = field(default_factory=list)
    """Training length by step as [step, tokens] pairs, the same for every variant (short examples first, then
    longer: RMT's curriculum over segments, and for Titans memories less interference while they learn to write),
    e.g. [[0, 32], [150, 64], [300, 128]]; the last length must be train_len; empty = train_len throughout."""

    one_segment_steps: int = 0
    """Steps during which the `one_segment_variants` take each training example as one segment (segment length =
    the example's length at that step), so attention alone can answer and learns to find the answer; from this
    step on they train with their own segments and the memory has to carry the answer. Without it the RMT stays
    at the answer prior (docs/results.md#why-mac-and-the-rmt-missed-the-needle); 0 = off."""

    one_segment_variants: list[str] = field(default_factory=lambda: ["rmt", "mac"])
    """Variants that `one_segment_steps` applies to; each must run in segments (rmt, mac). MAC learns the needle
    as often without it and holds it further, so the preset lists only the RMT."""

    checkpoint_every: int = 100
    """Save the variant's model and optimizer every this many steps (resume point); the final one is kept."""

    log_every: int = 25
    """Print the mean answer loss and accuracy every this many steps."""


@dataclass
class VariantSettings:
    """Model settings of single variants on top of the shared [model], as `key=value` in --set syntax with keys
    relative to [model] (e.g. rmt = ["window=0"]). The variants are meant to differ only in their memory: use
    this for what a memory needs around it (the RMT's attention within its segment), and report it."""

    window: list[str] = field(default_factory=list)
    """Settings of the sliding-window baseline."""

    meta: list[str] = field(default_factory=list)
    """Settings of the meta-token baseline."""

    rmt: list[str] = field(default_factory=list)
    """Settings of the RMT variant."""

    lmm: list[str] = field(default_factory=list)
    """Settings of the Titans LMM variant."""

    mac: list[str] = field(default_factory=list)
    """Settings of the Titans MAC variant."""

    mag: list[str] = field(default_factory=list)
    """Settings of the Titans MAG variant."""

    mal: list[str] = field(default_factory=list)
    """Settings of the Titans MAL variant."""


@dataclass
class LongContextConfig:
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Variants to train and evaluate, in order: window, meta, rmt, lmm, mac, mag, mal."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks evaluated at every length: niah_single, qa1, qa2, qa3 (memtrain/data/tasks/symbolic.py)."""

    train_len: int = 128
    """Training sequence length in tokens (prompt + the answer token)."""

    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """Evaluation lengths as multiples of train_len (each >= 1, increasing)."""

    eval_examples: int = 64
    """Examples per (variant, task, length) cell; accuracy steps are 1 / eval_examples."""

    eval_batch: int = 32
    """Examples per evaluation batch."""

    eval_max_tokens: int = 262144
    """Most tokens (batch × length) in one forward call of a stateless model; longer cells use smaller batches."""

    eval_piece: int = 1024
    """Tokens per call for the stateful (memory) models: a long example runs in pieces with the state carried."""

    perf_multiples: list[int] = field(default_factory=list)
    """Lengths (multiples of train_len) at which throughput and peak memory are measured; empty = eval_multiples."""

    perf_batch: int = 1
    """Sequences per timed forward pass."""

    perf_repeats: int = 2
    """Timed forward passes per length (the fastest counts), after one untimed warm-up pass."""

    events: int = 6
    """Story sentences (supporting facts plus distractors) of qa1-qa3."""

    filler: str = "noise"
    """Haystack of every task: noise (RULER's repeated "the grass is green ..." text) or random (i.i.d. words)."""

    meta_tokens: int = 4
    """Meta tokens of the "meta" variant."""

    seed: int = 0
    """Seed of the initialisation, and of the generated training (split "train") and evaluation ("val") data."""

    device: str = "cpu"
    """cpu or cuda."""

    threads: int = 1
    """torch intra-op threads on CPU (the CPU preset runs on shared cores)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The shared base model: memory must be "none" and num_meta_tokens 0 (the variants set them); vocab_size 0 =
    the symbolic task vocabulary; max_seq_len is raised as the longest evaluation needs."""

    train: TrainSettings = field(default_factory=TrainSettings)
    """Training of every variant."""

    variant_settings: VariantSettings = field(default_factory=VariantSettings)
    """Model settings of single variants on top of [model] (empty = the shared model as it is)."""

    @property
    def eval_lengths(self) -> list[int]:
        return [m * self.train_len for m in self.eval_multiples]

    @property
    def perf_lengths(self) -> list[int]:
        return [m * self.train_len for m in (self.perf_multiples or self.eval_multiples)]

    def validate(self) -> None:
        """Raise ConfigError (one line naming the key and the fix) for values the experiment cannot run."""
        _choices("variants", self.variants, VARIANTS)
        _choices("tasks", self.tasks, TASKS)
        _choices("train.tasks", self.train.tasks, TASKS)
        for name in ("train_len", "eval_examples", "eval_batch", "eval_max_tokens", "eval_piece", "perf_batch",
                     "perf_repeats", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self.train, name)}")
        if self.train.lr <= 0 or self.train.warmup_steps < 0 or self.train.grad_clip < 0 or self.meta_tokens < 1:
            raise ConfigError("train.lr must be > 0, train.warmup_steps and train.grad_clip >= 0, meta_tokens >= 1")
        if self.events < 3:
            raise ConfigError(f"events must be >= 3 (qa3 needs three supporting facts), got {self.events}")
        if self.filler not in ("noise", "random"):
            raise ConfigError(f"filler must be noise or random, got {self.filler!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("eval_multiples", "perf_multiples"):
            ms = getattr(self, name)
            if (name == "eval_multiples" and not ms) or any(m < 1 for m in ms) or ms != sorted(set(ms)):
                raise ConfigError(f"{name} must be increasing whole multiples of train_len (>= 1), got {ms}")
        if self.model.memory != variant_memory(BASELINES[0]) or self.model.num_meta_tokens:
            raise ConfigError("model.memory must be \"none\" and model.num_meta_tokens 0 in the base model: "
                              "the variants set them (list them in `variants`)")
        m = self.model
        if self.eval_piece % m.titans.chunk_size:
            raise ConfigError(f"eval_piece={self.eval_piece} must be a multiple of model.titans.chunk_size="
                              f"{m.titans.chunk_size}")
        for v in self.variants:  # a kind that runs in segments trains and evaluates on whole segments
            segment = memory_spec(variant_memory(v)).segment(m)
            if segment and self.train_len % segment[0]:
                raise ConfigError(f"train_len={self.train_len} is not a multiple of {segment[1]}={segment[0]}; "
                                  f"make it one so every training example is whole segments ({v})")
            if segment and self.eval_piece % segment[0]:
                raise ConfigError(f"eval_piece={self.eval_piece} must be a multiple of {segment[1]}={segment[0]} "
                                  f"({v})")
        if m.window and m.window >= self.train_len:
            raise ConfigError(f"model.window={m.window} must be below train_len={self.train_len}: the baseline "
                              f"must not see the whole training example")
        if self.train.curriculum:
            from memtrain.model.memory.rmt.config import check_curriculum
            try:
                check_curriculum(self.train.curriculum)
            except ModelConfigError as e:
                raise ConfigError(str(e).replace("model.rmt.curriculum", "train.curriculum")) from None
            lengths = [n for _, n in self.train.curriculum]
            if max(lengths) > self.train_len or lengths[-1] != self.train_len:
                raise ConfigError(f"train.curriculum lengths {lengths} must end at train_len={self.train_len} "
                                  f"and never exceed it (the variants are trained at one length)")
            if self.train.curriculum[-1][0] >= self.train.steps:
                raise ConfigError(f"train.curriculum reaches train_len at step {self.train.curriculum[-1][0]}, "
                                  f"after the last step (train.steps={self.train.steps})")
        shortest = min([n for _, n in self.train.curriculum] or [self.train_len])
        from memtrain.data.errors import DataError
        from memtrain.data.tasks.symbolic import symbolic_example
        for task in sorted(set(self.train.tasks) | set(self.tasks)):
            try:  # the prompt must fit the shortest training length (a story of `events` sentences may not)
                symbolic_example(task, shortest, self.seed, "train", 0, self.events, self.filler)
            except DataError:
                raise ConfigError(f"{task} examples do not fit {shortest} tokens (the shortest training length); "
                                  f"raise train_len / the train.curriculum lengths or lower events") from None
        for v in self.variants:  # every variant's model must be valid (names the model key)
            try:
                variant_model(self, v).validate()
            except ModelConfigError as e:
                settings = getattr(self.variant_settings, v)
                raise ConfigError(f"{e} (variant {v} with variant_settings.{v}={settings})" if settings
                                  else str(e)) from None
        self._validate_one_segment_steps()

    def _validate_one_segment_steps(self) -> None:
        steps, t = self.train.one_segment_steps, self.train
        if not steps:
            return
        if not 0 < steps < t.steps:
            raise ConfigError(f"train.one_segment_steps={steps} must lie in [0, train.steps={t.steps}): the "
                              f"variants end training with their own segments")
        _choices("train.one_segment_variants", t.one_segment_variants, VARIANTS)
        for v in t.one_segment_variants:
            if memory_spec(variant_memory(v)).segment(variant_model(self, v)) is None:
                raise ConfigError(f"train.one_segment_variants: {v} does not run in segments; list only variants "
                                  f"that do (rmt, mac)")
        starts = sorted({0} | {s for s, _ in t.curriculum if s < steps})  # where the example length changes
        for v in set(self.variants) & set(t.one_segment_variants):
            for step in starts:
                try:
                    step_model(self, v, step).validate()
                except ModelConfigError as e:
                    raise ConfigError(f"train.one_segment_steps: {v} with one segment of {train_length(step, self)} "
                                      f"tokens is not a valid model: {e}") from None


def _choices(key: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"{key} is empty; list some of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{key}: unknown entry {v!r}; use {', '.join(allowed)}")
    if len(set(values)) != len(values) and key != "train.tasks":
        raise ConfigError(f"{key} lists an entry twice: {values}")


def variant_memory(variant: str) -> str:
    """`model.memory` of an experiment variant: the baselines "window" and "meta" have none, the others are
    memory kinds by name."""
    return "none" if variant in BASELINES else variant


def _with_settings(model: ModelConfig, settings: list[str], key: str) -> ModelConfig:
    """`model` with `key=value` settings (keys relative to [model]) applied; ConfigError naming `key`."""
    tree = dataclasses.asdict(model)
    for text in settings:
        name = text.split("=", 1)[0].strip()
        if name in ("memory", "num_meta_tokens"):
            raise ConfigError(f"{key}: {name} is what the variant itself sets; list the variant in `variants`")
        try:
            apply_override(tree, text)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    try:
        return build(ModelConfig, tree, prefix="model.")
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def variant_model(cfg: LongContextConfig, variant: str) -> ModelConfig:
    """The base model with the variant's settings (`variant_settings`) and memory; max_seq_len covers the longest
    call the experiment makes."""
    from memtrain.data.tasks.symbolic import VOCAB
    settings = getattr(cfg.variant_settings, variant)
    m = _with_settings(cfg.model, settings, f"variant_settings.{variant}") if settings else copy.deepcopy(cfg.model)
    m.vocab_size = m.vocab_size or len(VOCAB)
    m.memory = variant_memory(variant)
    m.num_meta_tokens = cfg.meta_tokens if variant == "meta" else 0
    longest = max(cfg.eval_lengths + cfg.perf_lengths + [cfg.train_len])
    # stateless baselines take a whole example per call; memory models pieces of eval_piece, and in training a
    # whole training example
    m.max_seq_len = max(m.max_seq_len, longest if variant in ("window", "meta") else max(cfg.eval_piece,
                                                                                        cfg.train_len))
    return m


def train_length(step: int, cfg: LongContextConfig) -> int:
    """Example length at training step `step`: the curriculum's (train.curriculum), else train_len."""
    if cfg.train.curriculum:
        from memtrain.model.memory.rmt.config import segments_for_step
        return segments_for_step(cfg.train.curriculum, step)  # the same [step, value] lookup, here in tokens
    return cfg.train_len


def one_segment_applies(cfg: LongContextConfig, variant: str) -> bool:
    """Whether `train.one_segment_steps` changes `variant`: it is on, lists the variant, and the variant's memory
    runs in segments."""
    return (cfg.train.one_segment_steps > 0 and variant in cfg.train.one_segment_variants
            and memory_spec(variant_memory(variant)).segment(variant_model(cfg, variant)) is not None)


def step_model(cfg: LongContextConfig, variant: str, step: int) -> ModelConfig:
    """The variant's model at training step `step`: `variant_model`, except that during
    `train.one_segment_steps` a variant of `train.one_segment_variants` (a memory that runs in segments: its spec's
    `segment`) gets segments as long as the step's examples, so each example is one segment. Only the segment
    length changes, never a parameter."""
    m = variant_model(cfg, variant)
    if step >= cfg.train.one_segment_steps or not one_segment_applies(cfg, variant):
        return m
    segment = memory_spec(m.memory).segment(m)
    *sections, name = segment[1].split(".")[1:]  # "model.titans.segment_len" -> m.titans.segment_len
    node = m
    for section in sections:
        node = getattr(node, section)
    setattr(node, name, train_length(step, cfg))
    return m


def load_experiment_config(path: str | Path, overrides: list[str] = ()) -> LongContextConfig:
    """Read a preset, apply `--set` overrides, build and validate; ConfigError for anything wrong."""
    tree = read_toml(path, what="experiment config", where="configs/experiments/")
    for text in overrides:
        apply_override(tree, text)
    cfg = build(LongContextConfig, tree)
    try:
        cfg.validate()
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    return cfg
