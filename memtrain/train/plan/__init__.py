"""`memtrain plan`: per-rank memory of a training step before anything is launched (docs/planner.md).

    python -m memtrain.train.plan --config configs/7b_mac.toml --world 64 --gpu-mem 80
    python -m memtrain.train.plan --config configs/7b_mac.toml --world 64 --gpu-mem 80 --search

The model is built on the meta device (shapes only: params.py), split as megatron-core's tensor parallelism and
DeepSpeed's pipeline split it, and each rank's weights, gradients, optimizer state and activations are counted
(memory.py, activations.py); --search ranks every layout that fits.
"""
from .memory import Layout, Plan, RankPlan, plan_layout, search_layouts
from .params import Param, build_meta_model, model_params



def main(argv: list[str] | None = None) -> int:
    """`memtrain plan` (memtrain/train/plan/__main__.py); returns the exit code."""
    from .__main__ import main as run
    return run(argv)


__all__ = ["Layout", "Param", "Plan", "RankPlan", "build_meta_model", "main", "model_params", "plan_layout",
           "search_layouts"]
