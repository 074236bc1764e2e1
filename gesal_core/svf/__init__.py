"""Singular Value Fine-tuning (Transformer²): config, layer maths, model wiring."""

from .config import SVFConfig
from .layer import SVFLinear, SVFState
from .model import SVFModel, decompose, find_targets

__all__ = ["SVFConfig", "SVFLinear", "SVFModel", "SVFState", "decompose", "find_targets"]
