"""Probe a trained Titans variant of the long-context experiment on the needle task (issue 21: why MAC does not
learn the needle while MAG does).

    .venv/bin/python benchmarks/mac_needle_probe.py RUN_DIR --variant mac [--examples 256] [--json OUT.json]
    .venv/bin/python benchmarks/mac_needle_probe.py RUN_DIR --variant mac --trace 50 [--set key=value ...]

RUN_DIR is a `python -m memtrain.train.experiment long_context --run-dir RUN_DIR` directory (its config.toml and
variants/VARIANT/train.pt). Reports, on the "val" split of niah_single:

1. accuracy by needle depth: the needle's value token in the same `segment_len` segment as the answer position
   ("same") or d = 1, 2, 3+ segments earlier (segments on the absolute grid MAC uses);
2. the mutation check: accuracy with the memory as trained, with the retrieval read-out zeroed (MAC: h = 0), the
   memory update disabled (θ = α = 0, so M stays the learned M_0 and carries nothing across tokens) and every
   memory read-out zeroed (MAC: h = 0 and the gate read-out m = 0; MAG: m = 0);
3. gate means (θ step, η momentum, α forgetting) per layer along the text (memtrain/train/inspect/gates.py);
4. MAC: RMS of the retrieved tokens x_h = out(M(q)) (what the attention projects to keys / values) vs the RMS of the
   segment tokens a = attn_norm(h), the key norms of both, and the attention mass of text queries (and of the answer
   query) on the retrieved keys (memtrain/train/inspect/titans_capture.py); MAG: RMS of the memory read-out m;
5. gradient norms (loss on the answer token of one needle training batch) of each layer's memory parameters
   (query, kv, gates, conv, M_0, out) vs its attention parameters (MAC: also with the retrieval zeroed);
6. how token-specific the memory's update stream is: mean cosine between the memory inputs (and keys) of two
   different tokens of one memory call (`memory_input_similarity`).

`--trace K` instead retrains the variant from scratch with the experiment's own loop (same init, batches, lr
schedule; nothing is written to RUN_DIR) and prints every K steps (the first needle batch of each K): loss / acc,
gate means per layer, read-out norms, and memory vs attention gradient norms of that step's batch; `--save DIR`
writes the trained model as a run directory the probe can read. `--set` applies experiment overrides (e.g.
'model.titans.theta_init=0.01') to the trace run. `--patch retrieval_norm | gate_norm | residual_input` applies one of the three
candidate changes tested for issue 21 (functions below; give the same --patch when probing such a run). `--init`
probes the untrained model of the run's seed. Results and discussion: docs/results/mac_needle/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memtrain.data.tasks.symbolic import ID, chance, symbolic_batch
from memtrain.model.transformer import build_model
from memtrain.train.checkpoint import safe_torch_load
from memtrain.train.experiment.config import load_experiment_config, variant_model
from memtrain.train.experiment.training import lr_at, training_batch
from memtrain.train.inspect.gates import titans_gates

PATCH = None  # --patch
INIT = False  # --init
MAGIC, VALUE_OFFSET = ID["magic"], 5  # "magic number for KEY is VALUE ." : VALUE is 5 tokens after "magic"


# ---- loading -------------------------------------------------------------------------------------------------


def _run_hooked(model, ids, undo: list) -> None:
    """One forward of `model` over `ids` with hooks installed; `undo` removes them afterwards (after an error too)."""
    try:
        model(ids)
    finally:
        for u in undo:
            u()

def load(run: Path, variant: str, overrides=()):
    cfg = load_experiment_config(run / "config.toml", list(overrides))
    torch.manual_seed(cfg.seed)
    model = build_model(variant_model(cfg, variant))
    if PATCH == "gate_norm":
        patch_gate_norm(model)
    path = run / "variants" / variant / "train.pt"
    payload = safe_torch_load(path, map_location="cpu")
    if INIT:  # the untrained model of the same seed (what training starts from)
        payload = {"step": 0, "log": [None]}
    else:
        model.load_state_dict(payload["model"])
    model.eval()
    return cfg, model, payload


# ---- the candidate fix, as a patch (for experiments without touching the model code) ---------------------------

def patch_retrieval_norm() -> None:
    """MAC retrieved tokens x_h = out(M(q)) RMS-normalised with the block's attn_norm gain before the attention
    projects them to keys / values, as every segment token a = attn_norm(h) is (unpatched: x_h goes in raw)."""
    from memtrain.model.memory.titans.model import TitansBlock, _qkv

    def _retrieved_kv(self):
        attn, mem, g = self.attn, self.memory, self.attn_norm

        def kv(read):
            x = mem.output(read).float()
            x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + g.eps) * g.weight).to(read.dtype)
            _, k, v = _qkv(attn, x, None, None)
            return k, v
        return kv
    TitansBlock._retrieved_kv = _retrieved_kv


def patch_gate_norm(model) -> None:
    """MAC output gate h += y ⊙ σ(RMSNorm_m(m)) (as MAG normalises its memory branch) instead of y ⊙ σ(m): a
    `gate_norm` RMSNorm (learned gain, starts at 1) on every MAC block's memory read-out m = out(M(y)). Only the gate
    read-out goes through `memory.output` on one device (the retrieval folds `memory.out.weight` itself)."""
    from memtrain.model.layers import RMSNorm
    for block in model.blocks:
        if block.kind != "mac":
            continue
        mem = block.memory
        mem.gate_norm = RMSNorm(model.cfg.d_model, model.cfg.norm_eps)
        plain = type(mem).output.__get__(mem)
        mem.output = lambda y, plain=plain, mem=mem: mem.gate_norm(plain(y))


def patch_residual_input() -> None:
    """MAC memory written from the residual stream after attention, mem_norm(h + y), instead of mem_norm(y) (the
    "next test" of docs/results/mac_needle/README.md): h's token-specific part reaches the memory's keys from the
    first step, as it does in MAG. A pre-hook on each MAC block's `mem_norm` adds the segment's rows of the block
    input h `[B, P + n, D]` to y `[B, l, D]`; segments arrive in order, so a running offset finds the rows."""
    from memtrain.model.memory.titans.model import TitansBlock
    plain = TitansBlock._mac

    def _mac(self, h, state, seen):
        if not hasattr(self, "_residual_hook"):
            def add_residual(module, args, block=self):
                y, at = args[0], block._residual_at
                block._residual_at = at + y.shape[1]
                return (y + block._residual[:, at:at + y.shape[1]].to(y.dtype),)
            self._residual_hook = self.mem_norm.register_forward_pre_hook(add_residual)
        self._residual, self._residual_at = h, self.num_prefix
        try:
            return plain(self, h, state, seen)
        finally:
            self._residual = None
    TitansBlock._mac = _mac


# ---- mutations (instance attributes / hooks; removed on exit) ------------------------------------------------

@contextlib.contextmanager
def mutation(model, kind: str):
    """none | no_retrieval (MAC h = 0) | frozen (θ = α = 0: no update) | zero_readout (every memory read-out 0)."""
    undo = []
    for block in model.blocks:
        mem = block.memory
        if kind in ("no_retrieval", "zero_readout") and block.kind == "mac":
            mem.read = lambda memory, q: torch.zeros_like(q)  # retrieval h_j = M*(q_j) -> 0
            undo.append(lambda mem=mem: delattr(mem, "read"))
        if kind == "frozen":
            heads = mem.heads

            def gates_hook(module, args, out, heads=heads):
                B, n, _ = out.shape
                g = out.view(B, n, heads, 3).clone()
                g[..., 0] = -1e4  # θ = 0: no gradient step
                g[..., 2] = -1e4  # α = 0: no forgetting (M stays M_0 exactly)
                return g.view(B, n, -1)
            h = mem.gates.register_forward_hook(gates_hook)
            undo.append(h.remove)
        if kind == "zero_readout":
            def out_hook(module, args, kwargs, out):
                y, state = out
                return torch.zeros_like(y), state
            h = mem.register_forward_hook(out_hook, with_kwargs=True)
            undo.append(h.remove)
    try:
        yield
    finally:
        for u in undo:
            u()


# ---- accuracy by depth ---------------------------------------------------------------------------------------

def needle_batch(cfg, length: int, count: int, split="val", start=0):
    x, y = symbolic_batch("niah_single", length, cfg.seed, split, start, count, cfg.events, cfg.filler)
    prompts = x[:, :-1]
    first_magic = (prompts == MAGIC).argmax(1)
    value_pos = first_magic + VALUE_OFFSET
    return torch.from_numpy(prompts), torch.from_numpy(y), value_pos


@torch.no_grad()
def depth_accuracy(model, cfg, length: int, count: int, batch: int = 64) -> dict:
    L = cfg.model.titans.segment_len
    correct, bucket, preds = [], [], []
    for s in range(0, count, batch):
        prompts, y, vpos = needle_batch(cfg, length, min(batch, count - s), start=s)
        q_seg = (prompts.shape[1] - 1) // L
        pred = model(prompts).logits[:, -1].argmax(-1)
        correct += (pred == y).tolist()
        bucket += [min(3, q_seg - int(p) // L) for p in vpos]
        preds.append(pred)
    preds = torch.cat(preds)
    correct, bucket = np.array(correct), np.array(bucket)
    out = {"all": (int(correct.sum()), len(correct))}
    for b, name in ((0, "same"), (1, "d1"), (2, "d2"), (3, "d3+")):
        sel = bucket == b
        out[name] = (int(correct[sel].sum()), int(sel.sum()))
    vals, counts = torch.unique(preds, return_counts=True)
    out["top_pred_share"] = round(float(counts.max()) / len(preds), 3)
    return out


def fmt(c):
    return "—" if c[1] == 0 else f"{100 * c[0] / c[1]:.0f}% ({c[0]}/{c[1]})"


# ---- gates, read-out norms, attention mass ----------------------------------------------------------------------

@torch.no_grad()
def gate_means(model, ids) -> list[dict]:
    g = titans_gates(model, ids)
    return [{k: round(float(g[k][l].mean()), 5) for k in g} for l in range(len(model.blocks))]


@torch.no_grad()
def readout_stats(model, ids) -> list[dict]:
    """Per layer: MAC retrieved-token RMS vs segment-token RMS and key norms; every kind: memory read-out RMS."""
    from memtrain.model.memory.titans.model import _qkv
    stats = [dict() for _ in model.blocks]
    undo = []
    for i, block in enumerate(model.blocks):
        mem, st = block.memory, stats[i]
        if block.kind == "mac":
            orig_read = mem.read

            def read(memory, q, mem=mem, st=st, block=block, orig=orig_read):
                r = orig(memory, q)
                x = type(mem).output(mem, r)  # [B, l, D] the retrieved tokens x_h = out(M(q)) (no --patch gate_norm)
                if PATCH == "retrieval_norm":  # what that patch feeds the attention
                    g = block.attn_norm
                    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + g.eps) * g.weight
                k, _ = block._retrieved_kv()(r)  # the keys the attention actually sees
                st.setdefault("ret_rms", []).append(x.pow(2).mean(-1).sqrt().flatten())
                st.setdefault("ret_knorm", []).append(k.norm(dim=-1).flatten())
                return r
            mem.read = read
            undo.append(lambda mem=mem: delattr(mem, "read"))

            def norm_hook(module, args, out, st=st, block=block):
                _, k, _ = _qkv(block.attn, out, None, None)
                st.setdefault("seg_rms", []).append(out.pow(2).mean(-1).sqrt().flatten())
                st.setdefault("seg_knorm", []).append(k.norm(dim=-1).flatten())
            undo.append(block.attn_norm.register_forward_hook(norm_hook).remove)

        def mem_hook(module, args, kwargs, out, st=st):
            y = out[0]
            st.setdefault("readout_rms", []).append(y.pow(2).mean(-1).sqrt().flatten())
        undo.append(mem.register_forward_hook(mem_hook, with_kwargs=True).remove)
    _run_hooked(model, ids, undo)
    out = []
    for st in stats:
        out.append({k: round(float(torch.cat(v).mean()), 5) for k, v in st.items()})
    return out


@torch.no_grad()
def attention_mass(model, ids) -> list[dict]:
    """MAC: mean attention probability on the retrieved keys (all text queries; the answer query), per layer."""
    from memtrain.train.inspect.titans_capture import capture_titans
    with capture_titans(model) as trace:
        model(ids)
    out = []
    P, n = 0, ids.shape[1]
    for l, probs in enumerate(trace.passes[0].probs):
        ret = probs[..., P:P + n].sum(-1)  # [B, Hq, n]
        seg = probs[..., P + n:].sum(-1)
        out.append({"ret_mass_all": round(float(ret.mean()), 4), "ret_mass_answer": round(float(ret[..., -1].mean()), 4),
                    "ret_mass_answer_per_head": [round(float(v), 3) for v in ret[..., -1].mean(0)],
                    "seg_mass_answer": round(float(seg[..., -1].mean()), 4)})
    return out


@torch.no_grad()
def memory_input_similarity(model, ids) -> list[dict]:
    """Per layer: how token-specific the memory's update stream is. Mean cosine similarity between the memory inputs
    x_t of two different text tokens of the same call (MAC: one call per segment, x = mem_norm(y) of the attention
    outputs; MAG: one call over the text, x = attn_norm(h)), and the same for the memory keys before the conv,
    k_t = ℓ2norm(SiLU(W_k x_t)). Near 1: every token writes (about) the same key, nothing token-specific is stored."""
    stats = [{"x": [], "k": []} for _ in model.blocks]
    undo = []

    def mean_offdiag_cos(t):  # t [B, n, C]
        t = F.normalize(t.float(), dim=-1)
        c = t @ t.transpose(1, 2)
        n = c.shape[1]
        return float((c.sum((1, 2)) - c.diagonal(dim1=1, dim2=2).sum(-1)).mean() / (n * (n - 1))) if n > 1 else None

    for i, block in enumerate(model.blocks):
        mem = block.memory

        def pre(module, args, kwargs, st=stats[i]):
            x = args[0]
            if x.shape[1] < 2:
                return
            H, Dh = module.heads, module.head_dim
            kv = module.kv(x).view(*x.shape[:2], H, 2, Dh)[..., 0, :]
            k = F.normalize(F.silu(kv), dim=-1)  # [B, n, H, Dh]
            st["x"].append(mean_offdiag_cos(x))
            st["k"].append(sum(mean_offdiag_cos(k[:, :, h]) for h in range(H)) / H)
        undo.append(mem.register_forward_pre_hook(pre, with_kwargs=True).remove)
    _run_hooked(model, ids, undo)
    return [{"mem_input_cos": round(float(np.mean(st["x"])), 4), "mem_key_cos": round(float(np.mean(st["k"])), 4)}
            for st in stats]


# ---- gradient norms -------------------------------------------------------------------------------------------

def grad_norms(model) -> list[dict]:
    """Per layer: gradient norm of memory params (all; θ/η/α gate bias) vs attention params (after backward)."""
    out = []
    for block in model.blocks:
        def norm(params):
            gs = [p.grad.float().norm() ** 2 for p in params if p.grad is not None]
            return math.sqrt(float(sum(gs))) if gs else 0.0
        mem = block.memory
        d = {"memory": norm(mem.parameters()), "attn": norm(block.attn.parameters()) if hasattr(block, "attn") else 0.0,
             "mlp": norm(block.mlp.parameters())}
        for name in ("query", "kv", "gates", "out"):
            d[f"mem.{name}"] = norm(getattr(mem, name).parameters())
        d["mem.M0"] = norm(mem.init_weights.parameters())
        if mem.gates.bias.grad is not None:
            gb = mem.gates.bias.grad.view(-1, 3).norm(dim=0)
            d.update({"gate_bias.theta": float(gb[0]), "gate_bias.eta": float(gb[1]), "gate_bias.alpha": float(gb[2])})
        out.append({k: float(f"{v:.3g}") for k, v in d.items()})
    return out


def batch_grad_norms(model, cfg, length: int, count: int, step_index: int = 0) -> list[dict]:
    x, y = symbolic_batch("niah_single", length, cfg.seed, "train", step_index * count, count, cfg.events, cfg.filler)
    model.zero_grad(set_to_none=True)
    model.train()
    loss = F.cross_entropy(model(torch.from_numpy(x[:, :-1])).logits[:, -1].float(), torch.from_numpy(y))
    loss.backward()
    model.eval()
    g = grad_norms(model)
    model.zero_grad(set_to_none=True)
    return g


# ---- commands -------------------------------------------------------------------------------------------------

def probe(args) -> dict:
    cfg, model, payload = load(Path(args.run_dir), args.variant)
    torch.set_num_threads(args.threads)
    T = cfg.train_len
    res = {"variant": args.variant, "run_dir": args.run_dir, "step": payload["step"], "train_log_last": payload["log"][-1],
           "chance": chance("niah_single")}
    print(f"# {args.variant} ({args.run_dir}, step {payload['step']}); chance {100 * chance('niah_single'):.2f}%")
    res["accuracy"] = {}
    for mult in args.multiples:
        n = T * mult
        res["accuracy"][n] = {}
        for kind in ("none", "no_retrieval", "frozen", "zero_readout"):
            if kind == "no_retrieval" and args.variant != "mac":
                continue
            with mutation(model, kind):
                t0 = time.perf_counter()
                a = depth_accuracy(model, cfg, n, args.examples)
            res["accuracy"][n][kind] = a
            print(f"len {n:5d} {kind:13s}: all {fmt(a['all'])}  same-seg {fmt(a['same'])}  d1 {fmt(a['d1'])}  "
                  f"d2 {fmt(a['d2'])}  d3+ {fmt(a['d3+'])}  top-pred share {a['top_pred_share']} "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    ids, _, _ = needle_batch(cfg, T, 32)
    res["gates"] = gate_means(model, ids)
    res["readout"] = readout_stats(model, ids)
    res["memory_input_similarity"] = memory_input_similarity(model, ids)
    for l, m in enumerate(res["memory_input_similarity"]):
        print(f"layer {l}: memory update stream {m}")
    for l, (g, r) in enumerate(zip(res["gates"], res["readout"])):
        print(f"layer {l}: gates {g}  norms {r}")
    if args.variant == "mac":
        res["attention"] = attention_mass(model, ids)
        for l, a in enumerate(res["attention"]):
            print(f"layer {l}: attention {a}")
    res["grads"] = batch_grad_norms(model, cfg, T, cfg.train.batch_size)
    for l, g in enumerate(res["grads"]):
        print(f"layer {l}: grad norms {g}")
    if args.variant == "mac":  # how much of the memory's gradient arrives through the retrieval path
        with mutation(model, "no_retrieval"):
            res["grads_no_retrieval"] = batch_grad_norms(model, cfg, T, cfg.train.batch_size)
        for l, g in enumerate(res["grads_no_retrieval"]):
            print(f"layer {l}: grad norms, retrieval zeroed {g}")
    return res


def trace(args) -> dict:
    """Retrain with the experiment's loop, logging gates, read-out norms and gradient norms every K steps."""
    run = Path(args.run_dir)
    cfg = load_experiment_config(run / "config.toml", list(args.set))
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(variant_model(cfg, args.variant))
    if PATCH == "gate_norm":
        patch_gate_norm(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    probe_ids, _, _ = needle_batch(cfg, cfg.train_len, 16)
    rows, wl, wa, wn, t0 = [], 0.0, 0.0, 0, time.perf_counter()
    steps = args.steps or cfg.train.steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.train()
        x, y = training_batch(step, cfg, args.variant, "cpu")
        logits = model(x).logits[:, -1].float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        task = cfg.train.tasks[step % len(cfg.train.tasks)]
        # the first needle batch of every block of K steps (batches cycle through train.tasks)
        log_now = task == "niah_single" and (not rows or step // args.trace > (rows[-1]["step"] - 1) // args.trace)
        grads = grad_norms(model) if log_now else None
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        wl += loss.item()
        wa += (logits.argmax(-1) == y).float().mean().item()
        wn += 1
        if log_now:
            model.eval()
            row = {"step": step + 1, "len": x.shape[1] + 1, "loss_window": round(wl / wn, 3),
                   "acc_window": round(wa / wn, 3), "needle_batch_loss": round(loss.item(), 3),
                   "gates": gate_means(model, probe_ids), "readout": readout_stats(model, probe_ids), "grads": grads}
            rows.append(row)
            wl, wa, wn = 0.0, 0.0, 0
            print(json.dumps(row), flush=True)
    print(f"trace: {steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.save:  # a run directory the probe (and the experiment's evaluation) can load
        from memtrain.train.configtree import to_toml
        out = Path(args.save)
        (out / "variants" / args.variant).mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
        torch.save({"model": model.state_dict(), "step": steps, "variant": args.variant,
                    "log": [{k: r[k] for k in ("step", "loss_window", "acc_window")} for r in rows],
                    "seconds": time.perf_counter() - t0}, out / "variants" / args.variant / "train.pt")
    return {"variant": args.variant, "overrides": args.set, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--variant", default="mac")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trace", type=int, default=0, help="retrain and log every K steps instead of probing")
    p.add_argument("--steps", type=int, default=0, help="--trace: stop after this many steps (default train.steps)")
    p.add_argument("--set", action="append", default=[], help="--trace: experiment override key=value")
    p.add_argument("--save", default=None, help="--trace: write the trained model as a run directory here")
    p.add_argument("--patch", choices=["retrieval_norm", "gate_norm", "residual_input"], default=None,
                   help="a candidate fix: MAC retrieved tokens RMS-normalised (retrieval_norm) or the MAC output "
                        "gate's memory read-out RMS-normalised (gate_norm); give the same --patch to probe its run")
    p.add_argument("--init", action="store_true", help="probe the untrained model of the run's seed instead")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    global PATCH, INIT
    PATCH, INIT = args.patch, args.init
    if args.patch == "retrieval_norm":
        patch_retrieval_norm()
    if args.patch == "residual_input":
        patch_residual_input()
    res = trace(args) if args.trace else probe(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
