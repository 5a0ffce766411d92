import torch, sys, numpy as np
from memtrain.train.experiment.config import load_experiment_config, variant_model
from memtrain.model.transformer import build_model
from memtrain.data.tasks.symbolic import symbolic_example
run, sets = sys.argv[1], sys.argv[2:]
cfg = load_experiment_config("configs/experiments/long_context.toml", ['variants=["rmt"]', *sets])
m = build_model(variant_model(cfg, "rmt")); m.load_state_dict(torch.load(f"{run}/variants/rmt/train.pt", weights_only=False)["model"]); m.eval()
for L in (64, 128):
    ex = [symbolic_example("niah_single", L, 0, "test", i, cfg.events, cfg.filler) for i in range(256)]
    x = torch.tensor(np.stack([e.tokens[:-1] for e in ex])); y = torch.tensor([e.answer for e in ex])
    with torch.no_grad(): pred = m(x).logits[:, -1].argmax(-1)
    # needle start index: position of the first value token minus 5
    seg = cfg.model.rmt.segment_len
    vpos = torch.tensor([int(np.flatnonzero(e.tokens[:-1] == e.answer)[0]) for e in ex])
    last = vpos >= (L - 1) // seg * seg
    ok = pred == y
    print(L, "acc", ok.float().mean().item(), "needle value in last segment:", ok[last].float().mean().item(), int(last.sum()), "elsewhere:", ok[~last].float().mean().item())
