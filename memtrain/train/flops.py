"""Model FLOPs per token and the peak rate they are compared with (MFU, docs/architecture.md#measuring).

    FLOPs/token = 6·N_matmul + Σ_layers 6·H·(d_qk + d_v)·C_layer  (+ the memory's own work, counted by the model)

N_matmul counts the weights of every matrix multiply of the whole model (all TP shards; the lm head
included, embedding lookups and norms excluded); 6 = 2 (multiply-add) × 3 (forward, backward for inputs
and for weights). C_layer is the number of keys a query attends to: the sequence (plus meta tokens) in a
global layer, window + meta tokens in a windowed one — counted over the whole sequence as PaLM does, not
halved for causality. Per memory kind (its spec in memtrain/model/memory answers):

- rmt: every segment of L text tokens runs P + 2M positions more (meta, read and write memory), so the
  whole count is scaled by (P + 2M + L) / L, and C = P + 2M + L.
- Titans: C is 0 for lmm (no attention), P + 2L for mac ([persistent ‖ retrieved ‖ segment]), and as above
  for mag / mal. The memory's inner work per text token, layer and memory head, for memory weights W_l:
  8·Σ|W_l| (forward of the key, backward to the weight gradient, read-out of the query) plus 4·b·Dh for
  the chunk-parallel coefficient matmuls (QKᵀ and the carry over the chunk of b), × 3 for training.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from memtrain.model.memory import memory_spec

FORMULA = ("(6*N_matmul + sum_layers 6*H*(d_qk+d_v)*C_layer) * positions_per_text_token"
           " + titans_memory_inner_work (docs/architecture.md#measuring; memtrain/train/flops.py)")

# Dense tensor-core peaks (no sparsity) of common accelerators, FLOP/s, by the precision of the matmuls: bf16 and
# fp16 share a peak; fp32 is the plain (non-TF32) rate, what PyTorch runs by default.
_GPU_PEAKS = {
    "bf16": {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12},
    "fp32": {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10": 31.2e12, "4090": 82.6e12},
}


def matmul_weights(model: nn.Module, tp_size: int = 1) -> int:
    """Weights used in matrix multiplies over the whole model (this rank's shards × TP for split ones)."""
    from memtrain.launch.tensor_parallel import partition_dim
    total = 0
    embedding = getattr(getattr(model, "embed", None), "tokens", None)
    tied = bool(getattr(getattr(model, "cfg", None), "tie_embeddings", False))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # ZeRO-3 partitions a parameter in place (shape [0] on a rank): ds_shape / ds_numel are its full size
        if not isinstance(weight, nn.Parameter) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
            continue
        if module is embedding and not tied:
            continue  # a lookup, not a matmul (when tied, the same matrix is the lm head's matmul)
        total += getattr(weight, "ds_numel", weight.numel()) * (tp_size if partition_dim(weight) is not None else 1)
    return total


def attention_keys(cfg, layer: int, seq_len: int) -> int:
    """Keys each position of `layer` attends to, counted as PaLM does (not halved for causality); a memory kind
    whose attention differs (RMT segments, MAC, LMM without attention) says so in its spec."""
    keys = memory_spec(cfg.memory).attention_keys(cfg, layer, seq_len)
    if keys is not None:
        return keys
    window = cfg.layer_window(layer)
    return (min(window, seq_len) if window else seq_len) + cfg.num_meta_tokens


def flops_per_token(model: nn.Module, seq_len: int, tp_size: int = 1) -> float:
    """Training FLOPs per text token of `model` at sequence length `seq_len` (formula in FORMULA)."""
    cfg = model.cfg
    spec = memory_spec(cfg.memory)
    attention = sum(6 * cfg.n_heads * (2 * cfg.head_dim) * attention_keys(cfg, layer, seq_len)
                    for layer in range(cfg.n_layers))
    dense = (6.0 * matmul_weights(model, tp_size) + attention) * spec.positions_per_token(cfg, seq_len)
    return dense + spec.memory_flops_per_token(cfg)


def peak_flops(device: torch.device, override_tflops: float = 0.0, precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `precision` (fp32, bf16, fp16), where the number comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = _GPU_PEAKS["fp32" if precision == "fp32" else "bf16"]
        for key, peak in table.items():
            if key in name:
                return peak, f"datasheet {precision} dense peak of {name}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measured_matmul_rate(device, dtype=dtype), f"measured {precision} matmul rate of {_device_name(device)}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"this CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measured_matmul_rate(device: torch.device, n: int = 1024, seconds: float = 0.25, repeats: int = 3,
                         dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square fp32 matmul on `device` (best of `repeats` timings): the practical ceiling on a
    CPU. On a shared machine it moves with the load, like the training throughput it is compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best
