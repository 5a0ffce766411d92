"""Single-device model code: the decoder LM with meta tokens (and, later, memory variants).

Nothing here imports DeepSpeed or names a process group: parallel layers arrive through a LayerFactory.
"""
from .config import ModelConfig
from .errors import ModelConfigError
from .factory import LayerFactory
from .transformer import DecoderLM, LMOutput, build_model

__all__ = ["ModelConfig", "ModelConfigError", "LayerFactory", "DecoderLM", "LMOutput", "build_model"]
