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
8 nor the update faster).
"""

from __future__ import annotations

from collections.abc import Callable

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


# Where the weight-first order may run: the worker's batches of a few answers (up to
# `BatchConfig.max_batch`, 8) and short prefills; 2 rows always ran slower weight-first
# and 64 rows and more (a prefill) no faster (`bench.factored_order`).
WEIGHT_FIRST_ROWS = (8, 64)
# weight-first must beat x-first by this much where it is timed, or timing noise picks
MIN_GAIN = 1.1


def weight_first_rows(
    device: torch.device, timings: Callable[[], tuple[float, float]]
) -> tuple[int, int]:
    """The row counts ``[lo, hi)`` at which a factored SVF product runs weight-first
    (`SVFLinear`); ``(0, 0)``: never.

    CPU only, and only where it is faster on this machine: ``timings()`` returns the
    seconds of one factored product at 8 rows (x-first, weight-first), measured on the
    model's own layer. Which order wins differs between CPUs: `bench.factored_order`
    read weight-first 1.1-1.8x faster per layer from 8 to 48 rows on one machine, and
    `bench.serving_batch` read x-first products 1.3x faster for a batch of 8 on another.
    ``timings`` is called on a CPU only.
    """
    if device.type != "cpu":
        return (0, 0)
    x_first, weight_first = timings()
    return WEIGHT_FIRST_ROWS if x_first >= MIN_GAIN * weight_first else (0, 0)


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
