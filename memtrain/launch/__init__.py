"""How the model is parallelised: process groups, layout, tensor-parallel layers (and DeepSpeed, later)."""
