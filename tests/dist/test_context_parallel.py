"""CP = 2 (two gloo ranks, each holding half of every sequence) reproduces the single-process model.

Checked: logits, loss and every parameter's gradient of the baseline with meta tokens (windowed layers through
the halo and through the gathered fallback, a global layer, GQA, tied head), of the RMT (memory handed rank to
rank, full and truncated BPTT), and at the op level the Titans linear memory (affine maps composed across ranks,
chunk grid aligned and not aligned to the slices) and deep memory (state handed rank to rank), against one
process over the whole sequence; one optimizer step of the torch engine (baseline, RMT, Titans MAC). Gradients of
replicated inputs are summed over the CP ranks. The Titans models: tests/dist/test_context_parallel_titans.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from tests.dist.spawn import run_ranks

BASE = dict(vocab_size=100, vocab_pad_multiple=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
            max_seq_len=64, attention_backend="auto")
CASES = {
    # windowed layer through the halo (W - 1 = 3 <= 8 tokens per rank), a global layer, meta tokens, GQA
    "meta_halo_global": dict(num_meta_tokens=3, window=4, global_layers=[-1], n_kv_heads=2),
    # window wider than a slice (W - 1 = 11 > 8): keys gathered from every earlier rank, tied head, no meta tokens
    "wide_window_tied": dict(num_meta_tokens=0, window=12, tie_embeddings=True),
    # RMT: 2 segments per rank, windowed + global layers, meta tokens, full BPTT
    "rmt": dict(memory="rmt", num_meta_tokens=2, window=3, global_layers=[-1],
                rmt=dict(segment_len=4, num_memory=2)),
    # RMT with truncated BPTT: the hand-off between the ranks is cut from the graph
    "rmt_bptt1": dict(memory="rmt", num_meta_tokens=1, rmt=dict(segment_len=4, num_memory=2, bptt_segments=1)),
}
B, T = 2, 16
# fp64: the same operations in another order (halo / gathered keys, composed maps): machine precision.
# fp32: the bar.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _config(case: str):
    from memtrain.model import ModelConfig
    from memtrain.model.memory.rmt.config import RMTConfig
    kw = {**BASE, **CASES[case]}
    if "rmt" in kw:
        kw["rmt"] = RMTConfig(**kw["rmt"])
    return ModelConfig(**kw)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def compare_with_single_process(cp, cases, config, world: int) -> dict:
    """Per case and dtype: max differences of this rank's logits, the objective and every parameter's gradient
    (summed over the CP ranks in fp64, where the objective is a linear functional of the logits; averaged in fp32,
    where it is the mean loss) between the model on `cp`'s slices and one process over the whole sequence."""
    import torch.distributed as dist

    from memtrain.model import build_model
    from memtrain.model.factory import LayerFactory

    results = {}
    for case in cases:
        for dtype in (torch.float64, torch.float32):
            cfg = config(case)
            torch.manual_seed(0)
            ref = build_model(cfg).to(dtype)
            factory = LayerFactory()
            factory.sequence = cp
            torch.manual_seed(0)
            model = build_model(config(case), factory).to(dtype)
            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
            targets = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
            probe = torch.randn(B, T, cfg.vocab_size, generator=gen, dtype=dtype)
            exact = dtype == torch.float64

            def objective(m, tok, tgt, prb):
                out = m(tok, None if exact else tgt)
                return out.logits, ((out.logits * prb).sum() if exact else out.loss)

            ref_logits, ref_obj = objective(ref, tokens, targets, probe)
            ref_obj.backward()
            logits, obj = objective(model, cp.local_slice(tokens), cp.local_slice(targets), cp.local_slice(probe))
            obj.backward()

            total = obj.detach().clone()
            dist.all_reduce(total)
            total = total if exact else total / world
            worst, missing = 0.0, []
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                if ref_params[name].grad is None:
                    missing.append(name)
                    continue
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g)
                g = g if exact else g / world
                worst = max(worst, _max_diff(g, ref_params[name].grad))
            results[(case, str(dtype))] = dict(
                logits=_max_diff(logits, cp.local_slice(ref_logits)), objective=_max_diff(total, ref_obj),
                grads=worst, missing=missing, scale=float(ref_obj.detach().abs()), tol=TOL[dtype])
    return results


def _model_rank(rank: int, world: int) -> dict:
    from memtrain.launch.config import ParallelConfig
    from memtrain.launch.context_parallel import ContextParallel
    from memtrain.launch.groups import init_parallel
    from megatron.core import parallel_state

    layout = init_parallel(ParallelConfig(cp=world), torch.device("cpu"))
    assert (layout.cp, layout.cp_rank, layout.dp) == (world, rank, 1)
    assert parallel_state.get_context_parallel_rank() == rank
    assert parallel_state.get_data_parallel_world_size() == 1  # CP peers are not data parallel
    return compare_with_single_process(ContextParallel(), CASES, _config, world)


def _titans_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from memtrain.kernels.titans import deep_memory, init_deep_memory, linear_memory
    from memtrain.launch.context_parallel import ContextParallel

    cp = ContextParallel(dist.group.WORLD)
    dtype = torch.float64
    Bt, H, Tt, Dk, Dv = 2, 2, 12, 4, 3
    results = {}
    # (memory, chunk size, where the sequence starts in the chunk grid): 6 tokens per rank, so chunk 3 puts every
    # slice on a chunk boundary, chunk 4 does not; offset 1 continues a sequence (3-tuple state with anchor)
    for kind, chunk, offset in (("linear", 4, 0), ("linear", 3, 0), ("linear", 4, 1),
                                ("deep", 4, 0), ("deep", 3, 0), ("deep", 4, 1)):
        gen = torch.Generator().manual_seed(2)
        q, k = (torch.nn.functional.normalize(torch.randn(Bt, H, Tt, Dk, generator=gen, dtype=dtype), dim=-1)
                for _ in range(2))
        v = torch.randn(Bt, H, Tt, Dv, generator=gen, dtype=dtype)
        theta, eta, alpha = (torch.rand(Bt, H, Tt, generator=gen, dtype=dtype) * s for s in (0.5, 0.9, 0.2))
        if kind == "linear":
            init = [torch.randn(Bt, H, Dv, Dk, generator=gen, dtype=dtype) * 0.3 for _ in range(3 if offset else 2)]
        else:
            # weights, then (offset) momenta, kept small so the memory stays O(1), and anchor weights
            init = [w.expand(Bt, *w.shape).contiguous() * (0.01 if part == 1 else 1.0)
                    for part in range(3 if offset else 1)
                    for w in init_deep_memory(H, Dk, Dv, depth=2, expansion=2.0, dtype=dtype, generator=gen)]
        inputs = [q, k, v, theta, eta, alpha, *init]
        probes = None

        def run(xs, local: bool):
            nonlocal probes
            xs = [x.detach().clone().requires_grad_() for x in xs]
            seq = [cp.local_slice(x, dim=2) for x in xs[:6]] if local else xs[:6]
            if kind == "linear":
                state, op = tuple(xs[6:]), (cp.linear_memory if local else linear_memory)
            else:
                parts = [tuple(xs[6 + 2 * i: 8 + 2 * i]) for i in range(len(xs[6:]) // 2)]
                state, op = (tuple(parts) if offset else (parts[0], None)), (cp.deep_memory if local else deep_memory)
            y, out = op(*seq, chunk_size=chunk, state=state, chunk_offset=offset)
            final = list(out) if kind == "linear" else [t for part in out for t in part]
            if probes is None:
                g = torch.Generator().manual_seed(3)
                probes = [torch.randn(y.shape, generator=g, dtype=dtype)] + \
                         [torch.randn(f.shape, generator=g, dtype=dtype) for f in final]
            y_probe = cp.local_slice(probes[0], dim=2) if local else probes[0]
            obj = (y * y_probe).sum()
            if not local or cp.rank == cp.size - 1:  # the sequence's final state lives on the last rank
                obj = obj + sum((f * p).sum() for f, p in zip(final, probes[1:]))
            obj.backward()
            return y, [x.grad for x in xs]

        y_ref, g_ref = run(inputs, local=False)
        y_cp, g_cp = run(inputs, local=True)
        worst = 0.0
        for i, (gc, gr) in enumerate(zip(g_cp, g_ref)):
            gc = torch.zeros_like(gr) if gc is None else gc
            if i < 6:  # sequence inputs: this rank's slice of the gradient
                worst = max(worst, _max_diff(cp.local_slice(gc, dim=2), cp.local_slice(gr, dim=2)))
            else:  # initial state, replicated: contributions summed over ranks
                dist.all_reduce(gc)
                worst = max(worst, _max_diff(gc, gr))
        results[(kind, chunk, offset)] = dict(y=_max_diff(y_cp, cp.local_slice(y_ref, dim=2)), grads=worst)

    # the halo (a causal conv's tail): depthwise conv of width 3 over [halo; slice] equals the full sequence's
    x = torch.randn(Bt, Tt, 5, generator=torch.Generator().manual_seed(4), dtype=dtype, requires_grad=True)
    w = torch.randn(3, 5, dtype=dtype, generator=torch.Generator().manual_seed(5))

    def conv(z):  # z [B, 2 + n, C] -> [B, n, C]
        return sum(z[:, i:z.shape[1] - 2 + i] * w[i] for i in range(3))

    full = conv(torch.cat([x.new_zeros(Bt, 2, 5), x], dim=1))
    (full ** 2).sum().backward()
    ref_grad, x.grad = x.grad, None
    mine = cp.local_slice(x)
    prev = cp.halo(mine, 2, dim=1)  # rank 0: empty, but it must stay in the graph (its backward communicates)
    local = conv(torch.cat([x.new_zeros(Bt, 2 - prev.shape[1], 5), prev, mine], dim=1))
    (local ** 2).sum().backward()
    grad = x.grad.clone()
    dist.all_reduce(grad)
    results["halo"] = dict(y=_max_diff(local, cp.local_slice(full)), grads=_max_diff(grad, ref_grad))
    return results


TRAIN_CASES = {
    "baseline": ["model.num_meta_tokens=2", "model.window=5", "model.global_layers=[-1]", "model.n_kv_heads=2"],
    "rmt": ["model.memory=\"rmt\"", "model.rmt.segment_len=4", "model.rmt.num_memory=2", "model.window=3"],
    "titans_mac": ["model.memory=\"mac\"", "model.titans.segment_len=4", "model.titans.chunk_size=4",
                   "model.titans.memory_heads=2"],
}


# CP = 2 also through DeepSpeed: its "data parallel" group is DP × CP (gradients averaged, ZeRO partitioned there)
ZERO_CASES = {"baseline": (1, 2, 3), "rmt": (1,), "titans_mac": (2,)}  # ZeRO-3: see test_cp_layout_order_and_errors


def _train_config(case: str, cp: int, zero: int | None = None):
    from memtrain.train.config import load_config
    engine = ["parallel.engine=\"torch\""] if zero is None else ["parallel.engine=\"deepspeed\"",
                                                                  f"parallel.zero_stage={zero}"]
    return load_config(None, [*engine,
        "model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
        "model.attention_backend=\"sdpa\"", f"data.seq_len={T}", "data.batch_size=2", "optim.lr=1e-3",
        "optim.grad_clip=0.5", "schedule.warmup_steps=0", "schedule.steps=10", f"parallel.cp={cp}",
        "device=\"cpu\"", *TRAIN_CASES[case]])


def _train_rank(rank: int, world: int) -> dict:
    """One optimizer step: CP = 2 on this rank's slices (torch engine, DeepSpeed ZeRO 1-3) vs one process."""
    from memtrain.launch.config import ParallelConfig
    from memtrain.launch.context_parallel import ContextParallel
    from memtrain.launch.groups import init_parallel, resolve_layout
    from megatron.core import parallel_state
    from memtrain.model import LayerFactory, build_model
    from memtrain.train.engines import build_engine

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(ParallelConfig(cp=world), torch.device("cpu"))
    results = {}
    for case in TRAIN_CASES:
        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, 96, (2, T + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        steps = {}
        for cp, zero in ((1, None), (world, None), *((world, z) for z in ZERO_CASES[case])):
            cfg = _train_config(case, cp, zero)
            layout = resolve_layout(cfg.parallel, cp, rank if cp > 1 else 0)
            factory = LayerFactory()
            if cp > 1:
                factory.sequence = ContextParallel()
            torch.manual_seed(0)
            model = build_model(cfg.model, factory)
            names = [n for n, _ in model.named_parameters()]
            engine = build_engine(model, cfg, layout, run_dir=None, device=torch.device("cpu"))
            assert type(engine).__name__ == ("TorchEngine" if zero is None else "DeepSpeedEngine")
            x, y = (factory.sequence.local_slice(t) for t in (inputs, targets)) if cp > 1 else (inputs, targets)
            loss = engine.module(x, y).loss
            engine.backward(loss)
            norm = engine.step()
            state = engine.model_state()  # ZeRO-3: gathered
            steps[cp, zero] = (norm, {n: state[n].detach().clone() for n in names})
        ref_norm, ref_params = steps[1, None]
        for (cp, zero), (norm, params) in steps.items():
            if cp > 1:
                results[case if zero is None else f"{case}_zero{zero}"] = dict(
                    norm=norm, ref_norm=ref_norm, weights=max(_max_diff(params[n], ref_params[n]) for n in ref_params))
    return results


def _both_rank(rank: int, world: int) -> tuple[dict, dict, dict]:
    return _model_rank(rank, world), _titans_rank(rank, world), _train_rank(rank, world)


@functools.lru_cache(maxsize=1)
def _results() -> list[tuple[dict, dict, dict]]:
    """One spawn of two ranks for both tests below (starting ranks costs more than the checks)."""
    return run_ranks(_both_rank, 2)


@pytest.mark.slow
def test_cp2_models_match_single_process():
    for rank, (res, _, _) in enumerate(_results()):
        assert set(res) == {(c, str(d)) for c in CASES for d in (torch.float64, torch.float32)}
        for key, r in res.items():
            tol = r["tol"]
            assert not r["missing"], (rank, key, r)  # every parameter gets a gradient in the reference
            assert r["logits"] < tol, (rank, key, r)
            assert r["objective"] < tol * max(1.0, r["scale"]), (rank, key, r)
            assert r["grads"] < tol, (rank, key, r)


@pytest.mark.slow
def test_cp2_optimizer_step_matches_single_process():
    # lr 1e-3 moves a weight by ~1e-3: 1e-5 is 1% of one update; clipping is active (norm > 0.5), so the norm
    # (a CP sum instead of a mean would double it) is checked relative 1e-5 too; torch engine and DeepSpeed ZeRO
    for rank, (_, _, res) in enumerate(_results()):
        assert set(res) == {*TRAIN_CASES, *(f"{c}_zero{z}" for c, zs in ZERO_CASES.items() for z in zs)}
        for case, r in res.items():
            print(f"rank {rank} {case}: weights {r['weights']:.2e}, grad norm {r['norm']:.7f} vs {r['ref_norm']:.7f}")
            assert r["ref_norm"] > 0.5, (case, r)
            assert abs(r["norm"] - r["ref_norm"]) < 1e-5 * r["ref_norm"], (rank, case, r)
            assert r["weights"] < 1e-5, (rank, case, r)


@pytest.mark.slow
def test_cp2_titans_memory_ops_match_single_process():
    for rank, (_, res, _) in enumerate(_results()):
        for key, r in res.items():
            assert r["y"] < 1e-11 and r["grads"] < 1e-11, (rank, key, r)


def test_cp_layout_order_and_errors():
    from megatron.core.parallel_state import RankGenerator

    from memtrain.launch.config import LayoutError, ParallelConfig, check_layout
    from memtrain.launch.context_parallel import check_context_parallel
    from memtrain.launch.groups import resolve_layout
    from memtrain.train.config import ConfigError

    # our coordinates follow megatron-core's default order (tp, cp, ep, dp, pp)
    world, tp, cp, dp = 8, 2, 2, 2
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=1, cp=cp, order="tp-cp-ep-dp-pp")
    layouts = [resolve_layout(ParallelConfig(tp=tp, cp=cp), world, r) for r in range(world)]
    for group in gen.get_ranks("cp"):
        assert [layouts[r].cp_rank for r in group] == list(range(cp))
        assert len({(layouts[r].tp_rank, layouts[r].dp_rank) for r in group}) == 1
    for group in gen.get_ranks("dp"):
        assert [layouts[r].dp_rank for r in group] == list(range(dp))

    bad = [
        (lambda: resolve_layout(ParallelConfig(cp=3), 4), "parallel.cp=3"),
        (lambda: check_layout(_config("meta_halo_global"), ParallelConfig(cp=2), 15), "data.seq_len=15"),
        (lambda: check_context_parallel(_config("rmt"), 20, 2), "model.rmt.segment_len=4"),
        # ranks handing memory one after another cannot meet ZeRO-3's per-weight all-gathers (a deadlock)
        (lambda: _train_config("titans_mac", 2, 3), "parallel.zero_stage=3"),
        (lambda: _train_config("rmt", 2, 3), "parallel.zero_stage <= 2"),
    ]
    for call, needle in bad:
        with pytest.raises((LayoutError, ConfigError), match=needle.replace(".", r"\.")) as info:
            call()
        assert "\n" not in str(info.value)
