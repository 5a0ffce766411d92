"""The probe that located MAC's NaN at 1,024-token training (a record of how the two jsonl files here were made:
they were written by a draft of this file with the same statistics and /tmp output paths; this copy was tidied and
not run again).

Loaded as a plugin into the resumed seed-0 run (the config written by the lm_quality experiment, seed 0, MAC):

    PYTHONPATH=docs/results/lm_quality_seq1024/mac_nan python -m memtrain.train --config RUN/config.toml \
        --set 'plugins=["probe"]' --run-dir NEW_RUN --resume RUN/checkpoints/step_00000600

It wraps two functions of memtrain/model/memory/titans:
* `model._masked` (the MAC segment attention; 64 calls per step = 4 layers x 16 segments): per step, the largest
  |q|, |k| and |v| of the retrieved and of the segment tokens, the largest logit, the mean attention mass on the
  retrieved tokens -> attention_inputs_seed0_resumed.jsonl (`call_block` 1 = step 601).
* `memory.TitansMemory.forward` on steps 686 and 687: per layer and segment the gates (mean / max θ, η; mean / min
  α) and the memory's norm per sequence (largest over heads) after the segment -> memory_gates_seed0_resumed.jsonl
  (`call` = layer·16 + segment).
"""
import json
import math

import torch

import memtrain.model.memory.titans.memory as memory_module
import memtrain.model.memory.titans.model as model_module
from memtrain.kernels.attention.reference import repeat_kv

_masked, _forward = model_module._masked, memory_module.TitansMemory.forward
_calls = {"n": 0, "agg": None}
ATTENTION = open("attention_inputs_seed0_resumed.jsonl", "a")
GATES = open("memory_gates_seed0_resumed.jsonl", "a")


def _stats(q, k, v, mask):
    with torch.no_grad():
        keys = repeat_kv(k, q.shape[1] // k.shape[1])
        logits = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        half = k.shape[2] // 2  # no meta tokens: keys are [retrieved (r + l) | segment (r + l)]
        p = torch.softmax(logits, -1)
        return dict(q=q.abs().max().item(), k_ret=k[:, :, :half].abs().max().item(),
                    k_seg=k[:, :, half:].abs().max().item(), v_ret=v[:, :, :half].abs().max().item(),
                    v_seg=v[:, :, half:].abs().max().item(), logit=logits.max().item(),
                    p_ret=p[..., :half].sum(-1).mean().item(), pmax=p.max(-1).values.mean().item(),
                    finite=bool(torch.isfinite(q).all() and torch.isfinite(k).all() and torch.isfinite(v).all()))


def masked(q, k, v, mask):
    s, a = _stats(q, k, v, mask), _calls["agg"]
    if a is None:
        a = _calls["agg"] = dict(s)
    else:
        for key, value in s.items():
            a[key] = (a[key] and value) if key == "finite" else (a[key] + value) if key in ("p_ret", "pmax") \
                else max(a[key], value)
    _calls["n"] += 1
    if _calls["n"] % 64 == 0:
        a["p_ret"] /= 64
        a["pmax"] /= 64
        a["call_block"] = _calls["n"] // 64
        ATTENTION.write(json.dumps(a) + "\n")
        ATTENTION.flush()
        _calls["agg"] = None
    return _masked(q, k, v, mask)


def forward(self, x, state=None, **kw):
    out, st = _forward(self, x, state, **kw)
    step = (_calls["n"] - 1) // 64 + 601  # this segment's attention call is already counted
    if step in (686, 687):
        with torch.no_grad():
            g = torch.sigmoid(self.gates(x)).view(x.shape[0], x.shape[1], self.heads, 3)
            M, S = st.memory[0], st.memory[1]
            GATES.write(json.dumps(dict(
                step=step, call=(_calls["n"] - 1) % 64, id=id(self) % 10007,
                theta_max=g[..., 0].max().item(), theta_mean=g[..., 0].mean().item(),
                eta_max=g[..., 1].max().item(), eta_mean=g[..., 1].mean().item(),
                alpha_min=g[..., 2].min().item(), alpha_mean=g[..., 2].mean().item(),
                M_norm=[round(n, 3) for n in M.flatten(2).norm(dim=-1).amax(1).tolist()],
                S_norm=S.flatten(2).norm(dim=-1).max().item())) + "\n")
            GATES.flush()
    return out, st


model_module._masked = masked
memory_module.TitansMemory.forward = forward
