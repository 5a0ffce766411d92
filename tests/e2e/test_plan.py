"""`memtrain plan` against reality: exact per-rank parameter counts of a real TP = 2 build, and the predicted peak
training memory within 20% of the measured one for three layouts on CPU (docs/planner.md#accuracy).

Measuring: each layout runs in fresh processes (tests/dist/spawn.py); after every import and a warm-up step of a
tiny model of the same kind (lazy kernels, thread pools), the baseline is the process's resident set (VmRSS), and
the peak is its high-water mark (ru_maxrss) after three optimizer steps; the difference is what the model, its
optimizer and its activations took. glibc's heap keeps freed blocks below its (growing, up to 32 MiB) mmap threshold
for reuse, which inflates the high-water mark over the live tensors (by ~25% here), so the ranks run with
MALLOC_MMAP_THRESHOLD_=65536: every tensor of 64 KiB or more is its own mapping, returned to the system when freed.
"""
from __future__ import annotations

import pytest

from tests.dist.spawn import run_ranks

KINDS = {  # memory kind -> extra overrides (small models; mac with tied embeddings, meta tokens and GQA elsewhere)
    "none": ["model.num_meta_tokens=4", "model.n_kv_heads=2"],
    "mac": ["model.tie_embeddings=true", "model.titans.segment_len=32"],
    "mag": ["model.num_meta_tokens=4", "model.window=32"],
    "mal": ["model.titans.memory_depth=2"],
    "lmm": ["model.titans.conv_size=0"],
    "rmt": ["model.rmt.segment_len=32", "model.rmt.num_memory=4"],
}
SMALL = ["model.vocab_size=500", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64",
         'device="cpu"', 'parallel.engine="torch"']


def _config(overrides: list[str]):
    from memtrain.train.config import load_config
    return load_config(None, overrides)


def _tp_counts(rank: int, world: int, kinds: dict[str, list[str]]) -> dict[str, int]:
    """On each of 2 gloo ranks: the parameters this rank's megatron-core TP model holds, per memory kind."""
    from megatron.core import parallel_state

    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import build_model
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    counts = {}
    for kind, extra in kinds.items():
        cfg = _config([*SMALL, f'model.memory="{kind}"', *extra, f"parallel.tp={world}"])
        counts[kind] = sum(p.numel() for p in build_model(cfg.model, MegatronFactory()).parameters())
    return counts


def test_tp2_per_rank_parameters_equal_a_real_build():
    """The planner's analytic TP split (column dim 0, row dim 1, vocab rows, Titans per-head tensors) gives exactly
    the parameters a real megatron-core TP = 2 model holds on each rank, for every memory kind."""
    from memtrain.train.plan import model_params
    from memtrain.train.plan.params import stage_numel
    real = run_ranks(_tp_counts, 2, KINDS)
    for kind, extra in KINDS.items():
        cfg = _config([*SMALL, f'model.memory="{kind}"', *extra, "parallel.tp=2"])
        planned = stage_numel(model_params(cfg.model), cfg.model, tp=2, pp=1, stage=0)
        assert real[0][kind] == real[1][kind] == planned, (kind, real[0][kind], real[1][kind], planned)


# ---- measured peak ------------------------------------------------------------------------------------------

BASELINE = ["model.vocab_size=8192", "model.d_model=512", "model.n_layers=8", "model.n_heads=8",
            "data.seq_len=128", "data.batch_size=4", 'device="cpu"', 'precision="fp32"', 'parallel.engine="torch"',
            "schedule.steps=3", "schedule.warmup_steps=1"]
MAC = ["model.vocab_size=8192", "model.d_model=384", "model.n_layers=6", "model.n_heads=6", 'model.memory="mac"',
       "model.titans.segment_len=64", "model.titans.chunk_size=16", "data.seq_len=128", "data.batch_size=2",
       'device="cpu"', 'precision="fp32"', 'parallel.engine="torch"', "schedule.steps=3", "schedule.warmup_steps=1"]
LAYOUTS = {
    "baseline, 1 process": (BASELINE, 1),
    "mac, 1 process": (MAC, 1),
    "baseline, tp 2": ([*BASELINE, "parallel.tp=2"], 2),
    "baseline, selective checkpoint": ([*BASELINE, 'parallel.activation_checkpoint="selective"'], 1),
}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def _measure(rank: int, world: int, overrides: list[str]) -> float:
    """Peak resident memory added by building the model and engine and running 3 optimizer steps (bytes)."""
    import gc
    import resource

    import torch

    from memtrain.launch.groups import init_parallel
    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import LayerFactory, build_model
    from memtrain.train.engines import build_engine

    def run(cfg, layout) -> None:
        torch.manual_seed(0)
        factory = MegatronFactory() if layout.tp > 1 else LayerFactory()
        model = build_model(cfg.model, factory)
        model.set_activation_checkpoint(cfg.parallel.activation_checkpoint)  # as the trainer does
        engine = build_engine(model, cfg, layout, None, torch.device("cpu"))
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
        for _ in range(cfg.schedule.steps):
            engine.train_step([(ids[:, :-1], ids[:, 1:])])

    cfg = _config(overrides)
    layout = init_parallel(cfg.parallel, torch.device("cpu"))
    tiny = _config([*overrides, "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "data.batch_size=1",
                    "schedule.steps=1"])
    run(tiny, layout)  # warm-up: every lazy import, kernel and thread pool of the step, at a tiny size
    gc.collect()
    before = _rss()
    run(cfg, layout)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_peak_within_20_percent_of_measured(name, monkeypatch):
    from memtrain.train.plan import plan_layout
    overrides, world = LAYOUTS[name]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # read by glibc when the spawned ranks start
    measured = max(run_ranks(_measure, world, overrides))
    predicted = plan_layout(_config(overrides), world).peak
    print(f"{name}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {predicted / measured:.3f}")
    assert abs(predicted - measured) <= 0.2 * measured
