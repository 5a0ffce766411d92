"""Memory norm and gates along long needle examples, for a variant trained by the long_context experiment.

A record of how the json files next to it were made (run from the repository root):

    python docs/results/long_context_stability/probe.py RUN_DIR VARIANT OUT.json [KEY=VALUE ...]

RUN_DIR is the experiment's --run-dir, the overrides the experiment's --set values (e.g. seed=0
model.titans.chunk_size=1). For 16 held-out needle examples at 128, 2,048 and 8,192 tokens, fed in pieces of 128
tokens with the state carried: the number answered right, the largest θ and η any token of any layer used, and
after every piece the memory's norm per layer (largest over the batch and heads); the json keeps 16 evenly spaced
pieces (every piece at 2,048 tokens, every 4th at 8,192) and the last.
"""
import json, sys, torch
from memtrain.train.experiment.config import load_experiment_config, variant_model
from memtrain.model import build_model
from memtrain.train.checkpoint import safe_torch_load
from memtrain.data.tasks.symbolic import symbolic_batch

run, variant, path, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = load_experiment_config("configs/experiments/long_context.toml", overrides)
model = build_model(variant_model(cfg, variant))
payload = safe_torch_load(f"{run}/variants/{variant}/train.pt")
model.load_state_dict(payload["model"])
model.eval()
torch.set_num_threads(1)
piece = 128
out = {}
for length in (128, 2048, 8192):
    x, y = symbolic_batch("niah_single", length, cfg.seed, "val", 0, 16, cfg.events, cfg.filler)
    x = torch.from_numpy(x[:, :-1])
    state, norms, correct = None, [], None
    # gates: hook the memory's gates layer
    gmax = {"theta": 0.0, "eta": 0.0}
    hs = []
    for blk in model.blocks:
        def hook(mod, a, o, mem=blk.memory):
            g = mem.gate_values(o.detach().float())
            gmax["theta"] = max(gmax["theta"], g[..., 0].max().item()); gmax["eta"] = max(gmax["eta"], g[..., 1].max().item())
        hs.append(blk.memory.gates.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, x.shape[1], piece):
            o = model(x[:, i:i + piece], state=state)
            state = o.state
            norms.append([round(l.memory.memory[0].flatten(2).norm(dim=-1).max().item(), 3) for l in state.layers])
        correct = int((o.logits[:, -1].argmax(-1) == torch.from_numpy(y)).sum())
    for h in hs: h.remove()
    out[length] = dict(correct=correct, of=16, gate_max=gmax, norm_every_piece=norms[:: max(1, len(norms) // 16)], norm_last=norms[-1])
    print(length, correct, "/16", gmax, "norms", norms[:: max(1, len(norms) // 8)], norms[-1], flush=True)
json.dump(out, open(path, "w"), indent=1)
