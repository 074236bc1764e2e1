"""Wire SVF layers into a Hugging Face causal LM and switch adapters on it.

`SVFModel` discovers the target projections, decomposes them once (cached on disk,
keyed by the model's identity), swaps each for an `SVFLinear`, and then lets callers
run the model under one z (merged), a z per batch row (factored) or a trainable z.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import re
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import SVFError
from ..layout import is_input_major
from ..paths import cache_dir
from ..prepacked import PrepackedLinear, prepack_linears, supported
from .cache import MergedCache
from .compiled import CompiledPasses
from .config import ATTENTION_PARENTS, MLP_PARENTS, TARGET_SETS, SVFConfig
from .layer import SVFLinear, SVFState
from .precision import ComputePrecision

log = logging.getLogger(__name__)
_merge_keys = itertools.count()


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D is a Linear with a transposed weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout (out, in), whatever the module stores."""
    return module.weight.T if _is_conv1d(module) else module.weight


def find_targets(model: nn.Module, config: SVFConfig) -> list[str]:
    """Qualified names of the projections to adapt; raises if nothing matches."""
    linears = [
        name
        for name, mod in model.named_modules()
        if (isinstance(mod, nn.Linear) or _is_conv1d(mod))
        and not any(name == ex or name.endswith("." + ex) for ex in config.exclude)
    ]
    targets = config.targets
    if isinstance(targets, str):
        if targets not in TARGET_SETS:
            raise SVFError(f"unknown SVF target set {targets!r}; use one of {TARGET_SETS}")
        wanted: set[str] = set()
        if targets in ("mlp", "all"):
            wanted |= MLP_PARENTS
        if targets in ("attention", "all"):
            wanted |= ATTENTION_PARENTS
        chosen = [n for n in linears if set(n.split(".")[:-1]) & wanted]
    else:
        leaves = set(targets)
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] in leaves]
    if not chosen:
        sample = ", ".join(linears[:8]) or "none"
        raise SVFError(
            f"no module matches SVF targets {config.describe_targets()!r} in "
            f"{type(model).__name__}; linear layers found: {sample}"
        )
    return chosen


def weights_digest(model: nn.Module, names: list[str]) -> str:
    """Hash of the target weights' bytes: the SVD cache must never serve stale factors."""
    h = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in names:
        w = _linear_weight(modules[name]).detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(str(w.dtype).encode())
        h.update(w.view(torch.uint8).numpy())
    return h.hexdigest()[:20]


def _svd_cache_path(model_name: str, digest: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:80]
    return cache_dir() / "svd" / f"{safe}-{digest}.safetensors"


def decompose(
    model: nn.Module,
    names: list[str],
    model_name: str,
    config: SVFConfig,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD of each target, loaded from the disk cache when the weights match."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    digest = weights_digest(model, names)
    path = _svd_cache_path(model_name, digest)
    if config.cache_svd and path.exists():
        try:
            flat = load_file(str(path))
            return {n: (flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"]) for n in names}
        except Exception as exc:  # a truncated or foreign file: recompute, never trust it
            log.warning("ignoring unreadable SVD cache %s: %s", path, exc)
    modules = dict(model.named_modules())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    start = time.perf_counter()
    for name in tqdm(
        names, desc="SVD of target weights (one-time)", disable=not config.progress, file=sys.stderr
    ):
        w = _linear_weight(modules[name]).detach().float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        factors[name] = (U.contiguous(), S.contiguous(), Vh.contiguous())
    log.info("SVD of %d matrices took %.1fs", len(names), time.perf_counter() - start)
    if config.cache_svd:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        flat = {}
        for n, (U, S, Vh) in factors.items():
            flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"] = U.cpu(), S.cpu(), Vh.cpu()
        save_file(flat, str(tmp), metadata={"model": model_name, "digest": digest})
        tmp.replace(path)
    return factors


def _is_anonymous(key: Hashable) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == "anon"


class SVFModel:
    """A causal LM whose target projections are SVF layers sharing one `SVFState`.

    The wrapped model is modified in place. By default it runs merged: `set_merged` picks
    the z that every forward uses (initially ones, i.e. the base model) and that choice
    stays until the next call, because re-merging 90 matrices costs ~0.7 s on a CPU.
    `factored` temporarily switches to per-row (or trainable) z.

    Merged weight sets are remembered in a memory-bounded LRU (`merged_cache`), keyed
    like `set_merged`'s ``key``, so switching back to a hot node is a pointer swap.
    """

    def __init__(self, model: nn.Module, model_name: str, config: SVFConfig | None = None):
        self.model = model
        self.config = config or SVFConfig()
        self.state = SVFState()
        self.target_names = find_targets(model, self.config)
        factors = decompose(model, self.target_names, model_name, self.config)
        modules = dict(model.named_modules())
        self.layers: dict[str, SVFLinear] = {}
        offset = 0
        for name in self.target_names:
            base = modules[name]
            weight = _linear_weight(base)
            U, S, Vh = (t.to(device=weight.device, dtype=weight.dtype) for t in factors[name])
            layer = SVFLinear(
                U, S, Vh, base.bias, self.state, offset, input_major=is_input_major(weight)
            )
            parent_name, _, leaf = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, leaf, layer)
            self.layers[name] = layer
            offset += layer.rank
        self.z_size = offset
        self.device = next(iter(self.layers.values())).U.device
        self.merged_cache = MergedCache(int(self.config.merged_cache_mb * 2**20))
        # `compute_precision("auto")`: an update's products in bf16 where that is fast
        self.compute_precision = ComputePrecision(model)
        # the model's forward under torch.compile, for updates that ask (compiled lazily)
        self.compiled_passes = CompiledPasses(model)
        model.requires_grad_(False)
        # serving's products on weights packed once for oneDNN (`gesal_core.prepacked`)
        self.prepacked = self.config.prepack and all(
            supported(layer.U) for layer in self.layers.values()
        )
        if self.prepacked:
            for layer in self.layers.values():
                layer.prepack()
            prepack_linears(model)

    # -- z vectors -------------------------------------------------------------------
    def ones(self) -> torch.Tensor:
        """The identity adapter: W' = W."""
        return torch.ones(self.z_size, dtype=torch.float32)

    def check_z(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.z_size:
            raise SVFError(f"z has {z.shape[-1]} components but this model needs {self.z_size}")
        if not torch.isfinite(z).all():
            raise SVFError("z contains NaN or infinity")
        return z

    # -- modes ----------------------------------------------------------------------
    def set_merged(self, z: torch.Tensor | None, key: Hashable = None) -> None:
        """Materialise W' for z in every layer (skipped when ``key`` is already merged).

        ``key`` names the adapter (the engine uses (channel, node, version)): the same key
        must always mean the same z. Keyed sets are kept in the LRU, so coming back to a
        recently used key costs nothing; without a key the merge is anonymous, never cached.
        """
        if z is not None:
            z = self.check_z(z).detach().to(self.device)
        if key is None:
            key = ("ones",) if z is None else ("anon", next(_merge_keys))
        self.state.mode, self.state.z = "merged", None
        self.state.merged_z, self.state.merged_key = z, key
        cacheable = not _is_anonymous(key)
        cached = self.merged_cache.get(key) if cacheable else None
        if cached is not None:
            for name, layer in self.layers.items():
                layer.use_merged(cached[name], key)
            return
        for layer in self.layers.values():
            layer.merge(z, key)
        if cacheable:
            self.merged_cache.put(key, {n: lay.merged_weight for n, lay in self.layers.items()})

    def has_merged(self, key: Hashable) -> bool:
        """True when switching to ``key`` is free: it is current or in the LRU."""
        return (
            key == self.state.merged_key
            and self.state.mode == "merged"
            or (key in self.merged_cache)
        )

    def forget(self, drop: Callable[[Hashable], bool]) -> None:
        """Drop the merged weights of every key ``drop`` accepts, current ones included.

        A key must always mean the same z; an import can break that (it restores nodes
        with their ids and versions but another z), so the engine forgets the channel.
        """
        for key in self.merged_cache.keys():  # noqa: SIM118 (a list copy: safe to discard from)
            if drop(key):
                self.merged_cache.discard(key)
        if drop(self.state.merged_key):  # the layers re-merge before their next merged use
            self.state.merged_key = ("anon", next(_merge_keys))
            self.state.merged_z = None

    def merge_steps(self, z: torch.Tensor | None, key: Hashable, layers_per_step: int = 4):
        """Merge z into the LRU a few layers at a time, without touching the current weights.

        A generator: each ``next()`` composes ``layers_per_step`` layers, so a worker can do
        it in idle moments and stop to serve a request in between (a whole merge would
        stall the model thread for ~0.7 s on a CPU). The set enters the LRU when complete.
        """
        if _is_anonymous(key):
            raise ValueError("only keyed adapters can be cached")
        if z is not None:
            z = self.check_z(z).detach().to(self.device)
        staged: dict[str, torch.Tensor] = {}
        items = list(self.layers.items())
        for i in range(0, len(items), max(1, layers_per_step)):
            if key in self.merged_cache:  # someone merged it meanwhile
                return
            for name, layer in items[i : i + layers_per_step]:
                staged[name] = layer.compose(z)
            yield
        self.merged_cache.put(key, staged)

    @contextlib.contextmanager
    def factored(self, z: torch.Tensor) -> Iterator[None]:
        """Run with ``z`` of shape (Z,) or (B, Z): one adapter per batch row.

        If ``z`` requires grad, this is the training mode: the returned logits depend
        differentiably on z and on nothing else that can learn.
        """
        self.check_z(z.detach())
        previous = (self.state.mode, self.state.z)
        self.state.mode, self.state.z = "factored", z.to(self.device)
        try:
            yield
        finally:
            self.state.mode, self.state.z = previous

    def trainable(self, z0: torch.Tensor | None = None) -> nn.Parameter:
        """A fresh trainable copy of z0 (default ones), to use inside `factored`."""
        start = self.ones() if z0 is None else self.check_z(z0).detach().float()
        return nn.Parameter(start.clone().to(self.device))

    def factor_bytes(self) -> int:
        return sum(
            (lay.U.numel() + lay.S.numel() + lay.Vh.numel()) * lay.U.element_size()
            for lay in self.layers.values()
        )

    def packed_bytes(self) -> int:
        """Memory of the packed copies beside the plain weights (`gesal_core.prepacked`):
        the factors' and the other frozen linears'; merged sets are counted by the LRU."""
        return sum(
            m.packed_bytes()
            for m in self.model.modules()
            if isinstance(m, SVFLinear | PrepackedLinear)
        )
