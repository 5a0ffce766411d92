"""Statistics of the Titans memory gates θ (step size), η (momentum), α (forgetting) during training.

    stats = GateStats.attach(model)        # None for models without Titans memories
    stats.active = True                    # before the forward passes of a step that logs
    scalars = stats.collect()              # {"memory/layer0/theta_mean": ..., ...}; resets and deactivates

A forward hook on each block's memory (memtrain/model/memory/titans/memory.py) sees its input x and recomputes the gates,
θ, η, α = memory.gate_values(gates(x)) per token and memory head (`[B, n, Hl, 3]`), with the memory's own layers:
the memory may fuse that projection with others (so a hook on `gates` alone would not fire), and calling the
layer keeps ZeRO-3's parameter gathering in charge. Nothing runs while `active` is False (the hook returns at
once), so only the steps that log pay: per memory call one [D -> 3·Hl] projection, a sigmoid and three
reductions, kept on the device, and one host transfer in `collect`. Every rank must set `active` alike (the
projection may gather ZeRO-3 partitions, a collective). The statistics come from the forward passes the step
runs anyway (every micro-batch; an activation-checkpointed block counts its recomputation too, which leaves
mean, min and max unchanged).

Only text tokens count: MAG / MAL / LMM blocks first run the memory on the P meta positions from M_0 (a call
whose state is None, input-independent: it would pull every statistic toward the initial gates), and those calls
are skipped; MAC blocks call the memory once per segment on the text's attention outputs, all counted.

What a rank sees: its own micro-batches (data parallel), its TP rank's memory heads, and the blocks of its
pipeline stage; the trainer logs rank 0's, so under PP only the first stage's layers appear. The same gates
are captured, for a checkpoint and per token, by `python -m memtrain.train.inspect` (memtrain/train/inspect/gates.py).
"""
from __future__ import annotations

import torch
from torch import nn

GATE_NAMES = ("theta", "eta", "alpha")  # the column order of the gates layer (as in memtrain/train/inspect/gates.py)


class _LayerStats:
    """Running sum / min / max / count of the three gates of one block's memory (device tensors)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.count = 0

    def add(self, g: torch.Tensor) -> None:
        """g `[N, 3]` gate values in [0, 1]."""
        s, lo, hi = g.sum(0, dtype=torch.float64), g.amin(0), g.amax(0)
        if self.sum is None:
            self.sum, self.min, self.max = s, lo, hi
        else:
            self.sum, self.min, self.max = self.sum + s, torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.count += g.shape[0]


class GateStats:
    """Forward hooks collecting the gates' mean, min and max per layer while `active` (module docstring)."""

    def __init__(self, model: nn.Module):
        self.active = False
        self.layers: list[_LayerStats] = []
        self._handles = []
        for block in model.blocks:
            skip_meta = bool(getattr(block, "meta_memory_call", False))
            stats = _LayerStats()
            self.layers.append(stats)

            def hook(memory, args, kwargs, output, stats=stats, skip_meta=skip_meta):
                if not self.active:
                    return
                state = args[1] if len(args) > 1 else kwargs.get("state")
                if skip_meta and state is None:  # the meta-position call of a fresh sequence
                    return
                with torch.no_grad():  # θ, η, α per token and head: [B·n·Hl, 3]
                    stats.add(memory.gate_values(memory.gates(args[0]).float()).reshape(-1, 3))
            self._handles.append(block.memory.register_forward_hook(hook, with_kwargs=True))

    @classmethod
    def attach(cls, model: nn.Module) -> GateStats | None:
        """Hooks on every block's memory gates, or None when the model's blocks have no Titans memory."""
        blocks = getattr(model, "blocks", None)
        if not blocks or not all(hasattr(getattr(b, "memory", None), "gates") for b in blocks):
            return None
        return cls(model)

    def collect(self) -> dict[str, float]:
        """`memory/layer{i}/{theta,eta,alpha}_{mean,min,max}` over what was seen since the last collect (layers
        that saw nothing, e.g. another pipeline stage's, are left out); resets and sets `active` to False."""
        self.active = False
        seen = [(i, s) for i, s in enumerate(self.layers) if s.count]
        if not seen:
            return {}
        # one host transfer for every layer: [layers, 3 (mean, min, max), 3 gates]
        table = torch.stack([torch.stack([s.sum.float() / s.count, s.min.float(), s.max.float()])
                             for _, s in seen]).tolist()
        out = {}
        for (i, _), rows in zip(seen, table):
            for stat, values in zip(("mean", "min", "max"), rows):
                for name, value in zip(GATE_NAMES, values):
                    out[f"memory/layer{i}/{name}_{stat}"] = value
        for _, s in seen:
            s.reset()
        return out

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
