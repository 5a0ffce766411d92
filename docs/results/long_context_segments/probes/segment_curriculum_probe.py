"""Probe: a curriculum over the segment length. Steps < SWITCH train with segment A (whole 64-token examples in
one segment), the rest with segment B; then needle accuracy at 1x/4x/16x."""
import sys, time, json, torch
import torch.nn.functional as F
from memtrain.train.experiment.config import load_experiment_config, variant_model
from memtrain.train.experiment.training import training_batch, lr_at
from memtrain.train.experiment.evaluate import accuracy
from memtrain.model.transformer import build_model
variant, seed, segA, segB, switch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
extra = sys.argv[6:]
key = "rmt" if variant == "rmt" else "titans"
torch.set_num_threads(1)
def cfg_for(seg):
    return load_experiment_config("configs/experiments/long_context.toml",
        [f'variants=["{variant}"]', f"seed={seed}", f"model.{key}.segment_len={seg}", *extra])
cA, cB = cfg_for(segA), cfg_for(segB)
torch.manual_seed(seed)
model = build_model(variant_model(cA, variant))
opt = torch.optim.AdamW(model.parameters(), lr=cA.train.lr, weight_decay=cA.train.weight_decay)
t0 = time.time()
for step in range(cB.train.steps):
    if step == switch:
        sd = model.state_dict(); model = build_model(variant_model(cB, variant)); model.load_state_dict(sd)
        opt2 = torch.optim.AdamW(model.parameters(), lr=cB.train.lr, weight_decay=cB.train.weight_decay)
        opt2.load_state_dict(opt.state_dict()); opt = opt2
    cfg = cA if step < switch else cB
    for g in opt.param_groups: g["lr"] = lr_at(step, cfg)
    x, y = training_batch(step, cfg, variant, "cpu")
    logits = model(x).logits[:, -1].float(); loss = F.cross_entropy(logits, y)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip); opt.step()
    if (step + 1) % 100 == 0: print(f"step {step+1} loss {loss.item():.3f} len {x.shape[1]+1} seg {segA if step < switch else segB} {time.time()-t0:.0f}s", flush=True)
model.eval()
res = {m: accuracy(model, cB, variant, "niah_single", 128 * m) for m in (1, 4, 16)}
print(json.dumps({"variant": variant, "seed": seed, "segA": segA, "segB": segB, "switch": switch, "extra": extra,
                  "needle": {m: f"{c}/{n}" for m, (c, n) in res.items()}, "train_s": round(time.time() - t0)}))
