"""Low-precision compute for learning updates: bf16 matmuls, fp32 everything that learns.

Why: an update is a forward and a backward pass over every sample for each inner step,
and nearly all of its time is matrix products. On CPUs with AVX512-BF16 or AMX (and on
any recent GPU) a bf16 product runs several times faster than an fp32 one
(``python -m bench.update_step`` prints both rates, and the update's time in each).
The model that *answers* stays in its own dtype; only the gradient of z is computed with
bf16 products, under autocast, so the residual stream, norms, the attention kernel,
softmax, log-probs, z, its gradient and the optimiser stay fp32.

Autocast alone re-casts every frozen weight at every call, and in a profile of one
update the casts took about as long as the products. `LowPrecisionWeights` keeps one
bf16 copy of each frozen weight and swaps it in for the length of a forward pass
(pointer swaps, no arithmetic), so the casts are paid once per process.

Where bf16 is slow (emulated on CPUs without the instructions), ``"auto"`` stays in
fp32: the choice is made by timing both on this machine once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from ..config import COMPUTE_DTYPES
from ..errors import SVFError

log = logging.getLogger(__name__)

# bf16 must beat fp32 by this much to be chosen by "auto": below it the precision lost
# is not worth the time saved, and timing noise must not flip the choice.
MIN_SPEEDUP = 1.5


def _matmul_seconds(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    x = torch.randn(256, 576, device=device).to(dtype)
    w = torch.randn(1536, 576, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms the kernels up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            x @ w.T
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_speedup(device_type: str) -> float:
    """How many times faster a bf16 matmul is than an fp32 one here (measured once)."""
    device = torch.device(device_type)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    try:
        fp32 = _matmul_seconds(torch.float32, device)
        bf16 = _matmul_seconds(torch.bfloat16, device)
    except RuntimeError as exc:  # no bf16 kernel on this device at all
        log.info("bf16 matmul unavailable on %s: %s", device_type, exc)
        return 0.0
    speedup = fp32 / bf16
    log.info("bf16 matmul on %s: %.2fx fp32", device_type, speedup)
    return speedup


def resolve_compute_dtype(
    name: str, model_dtype: torch.dtype, device: torch.device
) -> torch.dtype | None:
    """The dtype an update's products run in, or None for the model's own.

    Only an fp32 model is ever lowered: a model loaded in bf16 or fp16 already computes
    in it.
    """
    if name not in COMPUTE_DTYPES:
        raise SVFError(f"unknown compute dtype {name!r}; use one of {COMPUTE_DTYPES}")
    if name == "float32" or model_dtype != torch.float32:
        return None
    if name == "auto" and bf16_speedup(device.type) < MIN_SPEEDUP:
        return None
    return torch.bfloat16


def _fp32_attention_on_cpu() -> None:
    """Make Hugging Face's SDPA attention run in fp32 under CPU bf16 autocast.

    In a profile of one update on a CPU its backward pass is several times slower in
    bf16 than in fp32, while the projections around it gain from bf16.
    Installed once, on first use of low precision; outside CPU bf16 autocast the wrapper
    calls the original unchanged, so serving and everything else are unaffected.
    """
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # an older transformers: attention stays as autocast makes it
        return
    original = AttentionInterface._global_mapping.get("sdpa")
    if original is None or getattr(original, "gesal_fp32_on_cpu", False):
        return

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        # (RoPE has already promoted q and k to fp32; autocast would cast them back down)
        lowered = torch.is_autocast_enabled("cpu") and query.device.type == "cpu"
        if lowered and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                q, k, v = query.float(), key.float(), value.float()
                return original(module, q, k, v, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    sdpa.gesal_fp32_on_cpu = True
    AttentionInterface.register("sdpa", sdpa)


# oneDNN's AMX bf16 matmul (torch 2.13 on CPU) divides by zero, and the process dies of
# SIGFPE, for an (M, K) x (K, N) product with M <= 32 rows where M x K equals 3/4 of a
# core's L2 cache in elements: its small-M blocking heuristic computes
# div_up(.., L2_threshold - M x K) after checking only for ">". With a 2 MiB L2 (Sapphire
# Rapids and later) that is M = 32, K = 49,152: the backward pass of SmolLM2's LM head
# when an update pass scores exactly 32 response positions; `tests/test_precision.py`
# has the shape. Wide layers (K = out_features
# in the backward) therefore never see 32 rows or fewer: they get zero rows up to
# `SAFE_ROWS`, which costs a few small products and changes no row's result.
WIDE_OUT = 16384  # out_features from which M x K can reach 3/4 of a 1 MiB L2 at M <= 32
SAFE_ROWS = 33


def _pad_rows(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if not 0 < rows < SAFE_ROWS:
        module._gesal_rows = None
        return None
    module._gesal_rows = (rows, x.shape[:-1])
    flat = x.reshape(rows, x.shape[-1])
    return (torch.cat([flat, flat.new_zeros(SAFE_ROWS - rows, x.shape[-1])]), *args[1:])


def _unpad_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    padded = getattr(module, "_gesal_rows", None)
    if padded is None:
        return None
    module._gesal_rows = None
    rows, lead = padded
    return output[:rows].reshape(*lead, output.shape[-1])


def _is_frozen_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return linear and isinstance(weight, torch.Tensor) and not weight.requires_grad


class LowPrecisionWeights:
    """One copy in ``dtype`` of every frozen projection of ``model``, swapped in on demand.

    Covers plain linear layers (attention, the LM head, a PEFT layer's base) and the SVD
    factors of SVF layers. Trainable weights (LoRA's A and B) are never copied: autocast
    casts them on the fly and their gradients stay in their own dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        from .layer import SVFLinear

        self.dtype = dtype
        _fp32_attention_on_cpu()
        self._swaps: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        for module in model.modules():
            if isinstance(module, SVFLinear):
                for name in ("U", "Vh"):
                    full = getattr(module, name)
                    self._swaps.append((module, name, full, full.detach().to(dtype)))
            elif _is_frozen_linear(module):
                full = module.weight
                low = nn.Parameter(full.detach().to(dtype), requires_grad=False)
                self._swaps.append((module, "weight", full, low))
        self.device_type = next(model.parameters()).device.type
        # see SAFE_ROWS; only CPU products go through oneDNN
        wide = [
            m for m, name, full, _ in self._swaps if name == "weight" and full.shape[0] >= WIDE_OUT
        ]
        self._wide = wide if self.device_type == "cpu" else []

    def nbytes(self) -> int:
        return sum(low.numel() * low.element_size() for *_, low in self._swaps)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the block (a forward pass) on the low-precision copies, under autocast.

        Autograd keeps what the backward pass needs, so ``backward()`` may run after the
        block; the full-precision weights are back in place as soon as it ends, whatever
        happens inside, so answers served in between never see the copies.
        """
        for module, name, _, low in self._swaps:
            setattr(module, name, low)
        hooks = [m.register_forward_pre_hook(_pad_rows) for m in self._wide]
        hooks += [m.register_forward_hook(_unpad_rows) for m in self._wide]
        try:
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            for module, name, full, _ in self._swaps:
                setattr(module, name, full)


class ComputePrecision:
    """What an update's forward pass runs under, per model: ``with precision("auto"):``.

    Resolves the dtype name (`resolve_compute_dtype`) and makes the low-precision copies
    on first use, then keeps them (half the size of the fp32 weights they copy), so later
    updates pay no casts. One per model: `SVFModel.compute_precision` is the engine's,
    and the evaluation's LoRA baseline makes its own.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._copies: dict[torch.dtype, LowPrecisionWeights] = {}

    def resolve(self, name: str = "auto") -> torch.dtype | None:
        """The dtype ``name`` means for this model here (None: the model's own)."""
        some = next(self.model.parameters())
        return resolve_compute_dtype(name, some.dtype, some.device)

    def nbytes(self) -> int:
        """Memory held by the low-precision copies made so far."""
        return sum(copies.nbytes() for copies in self._copies.values())

    def lowers(self, name: str = "auto") -> bool:
        """True when ``name`` makes this model's products less precise than its own."""
        return self.resolve(name) is not None

    @contextlib.contextmanager
    def __call__(self, name: str = "auto") -> Iterator[None]:
        dtype = self.resolve(name)
        if dtype is None:
            yield
            return
        if dtype not in self._copies:
            self._copies[dtype] = LowPrecisionWeights(self.model, dtype)
        with self._copies[dtype].active():
            yield
