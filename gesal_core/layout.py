"""Storage order of linear weights: the same (out, in) tensors, stored input-major.

``nn.Linear`` computes ``x @ Wᵀ`` from a weight stored (out, in). On a CPU (MKL, one
thread) a few-row product is faster when W's storage is (in, out), so that ``Wᵀ`` is
contiguous, and the gain is largest for products whose weight stays in cache. In the
whole model, where weights stream from memory, it is smaller: `bench.weight_layout` times
one answer on a hot node (merged weights), a batch of 8 nodes and an update in both
orders side by side. Values, shapes and therefore answers stay the same.

Only the strides change, so every caller that reads a weight as (out, in) keeps working;
a caller that needs contiguous bytes (safetensors, hashing) calls ``.contiguous()``, as
it must for any view. The order is applied where a model is loaded for CPU
(`gesal_core.model.load_model`); on CUDA nothing is changed, because the gain is
measured on CPUs only. `SVFLinear` stores its merged weights in the order of the weight
it replaced; its SVD factors stay row-major (input-major factors make neither the batch of
8 nor the update faster). Where products without gradients run on weights packed for
oneDNN (`gesal_core.prepacked`, a float32 model on a CPU), this order reaches only the
products that run plain: an update's passes.
"""

from __future__ import annotations

import torch
from torch import nn


def input_major(weight: torch.Tensor, on: bool = True) -> torch.Tensor:
    """``weight`` (out, in) with its storage in (in, out) order (``on``), or row-major."""
    if weight.dim() != 2:
        return weight
    return weight.t().contiguous().t() if on else weight.contiguous()


def is_input_major(weight: torch.Tensor) -> bool:
    """True if a 2-D (out, in) weight is stored (in, out)."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])


def wants_input_major(device: torch.device) -> bool:
    """Whether weights on ``device`` should be stored input-major (CPU only: measured)."""
    return device.type == "cpu"


def set_weight_layout(model: nn.Module, on: bool = True) -> int:
    """Store every frozen ``nn.Linear`` weight of ``model`` input-major (``on``) or
    row-major; returns how many were re-stored.

    Call it before `SVFModel` wraps the model: SVF layers take the order of the weight
    they replace when they are built. Tied weights (the LM head and the token embedding)
    are one ``Parameter`` and are re-stored in place, so they stay tied; an embedding
    lookup then reads a row with a stride, which costs nothing measurable for a prompt's
    few ids.
    """
    done = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        frozen = isinstance(module, nn.Linear) and not weight.requires_grad
        if frozen and is_input_major(weight) != on:
            module.weight.data = input_major(weight.data, on)
            done += 1
    return done
