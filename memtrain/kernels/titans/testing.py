"""Input generators and comparison helpers shared by the Titans kernel tests and benchmark (no test logic here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(B=2, H=2, T=17, Dk=8, Dv=6, *, dtype=torch.float64, device="cpu", seed=0,
                theta_max=0.5, eta_max=1.0, alpha_max=0.3):
    """Random (q, k, v, theta, eta, alpha) like the memory layer makes them: unit-norm q and k (SiLU + l2 in the
    model), gates uniform in [0, *_max]. q, k [B,H,T,Dk]; v [B,H,T,Dv]; gates [B,H,T]."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def u(hi):
        return torch.rand(B, H, T, generator=g, dtype=torch.float64) * hi

    q = F.normalize(r(B, H, T, Dk), dim=-1)
    k = F.normalize(r(B, H, T, Dk), dim=-1)
    v = r(B, H, T, Dv)
    out = (q, k, v, u(theta_max), u(eta_max), u(alpha_max))
    return tuple(x.to(dtype=dtype, device=device) for x in out)


def make_linear_state(B=2, H=2, Dk=8, Dv=6, *, dtype=torch.float64, device="cpu", seed=1, scale=0.3):
    """Random (W, S), each [B,H,Dv,Dk]."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, H, Dv, Dk, generator=g, dtype=torch.float64) * scale
    S = torch.randn(B, H, Dv, Dk, generator=g, dtype=torch.float64) * scale * 0.3
    return W.to(dtype=dtype, device=device), S.to(dtype=dtype, device=device)


def make_deep_state(B=2, H=2, Dk=8, Dv=6, *, depth=2, expansion=2.0, dtype=torch.float64, device="cpu", seed=2,
                    momentum_scale=0.02):
    """Random (weights, momenta) of a plain MLP memory; weights[l] [B,H,d_l,d_{l-1}]."""
    from . import init_deep_memory
    g = torch.Generator().manual_seed(seed)
    ws = init_deep_memory(H, Dk, Dv, depth=depth, expansion=expansion, dtype=torch.float64, generator=g)
    ws = tuple(w.unsqueeze(0).repeat(B, 1, 1, 1) + 0.05 * torch.randn(B, *w.shape, generator=g, dtype=torch.float64)
               for w in ws)
    ss = tuple(momentum_scale * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws)
    cast = lambda t: tuple(x.to(dtype=dtype, device=device) for x in t)  # noqa: E731
    return cast(ws), cast(ss)


def flatten(x):
    """Flatten nested tuples/lists of tensors into a list of tensors."""
    if isinstance(x, torch.Tensor):
        return [x]
    out = []
    for e in x:
        out.extend(flatten(e))
    return out


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): a relative error that still means something for tiny references."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() / scale


def random_projection_loss(outputs, seed=123):
    """sum_i <x_i, R_i> over every tensor in ``outputs`` with fixed random R: a loss whose gradient probes all
    outputs (y and every piece of the final state) in random directions."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for x in flatten(outputs):
        r = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
        total = total + (x * r).sum()
    return total
