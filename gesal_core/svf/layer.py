"""The SVF layer: W' = U diag(σ ⊙ z) Vᵀ with ``nn.Linear`` semantics.

One `SVFState` is shared by every layer of a model, so switching adapters (one z for the
whole batch, a z per batch row, or a trainable z) is a single assignment, not a walk over
90 modules. A flat z vector holds all layers' components; each layer reads its slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import prepacked
from ..prepacked import PackedCopy


@dataclass
class SVFState:
    """What every SVF layer of one model is currently doing.

    mode ``"merged"``: layers use a materialised W' for ``merged_key`` (fast decoding).
    mode ``"factored"``: layers compute ``((x Vhᵀ) ⊙ σz) Uᵀ`` with ``z`` of shape
    ``(Z,)`` (shared) or ``(B, Z)`` (one adapter per batch row). A ``z`` that requires
    grad makes this the training mode: gradients reach z and nothing else.
    """

    mode: str = "merged"
    z: torch.Tensor | None = None
    merged_z: torch.Tensor | None = None
    merged_key: object = ("ones",)


class SVFLinear(nn.Module):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D``) by its thin SVD.

    The base factors are buffers, so ``model.parameters()`` never offers them to an
    optimiser; only the z handed in through the state can learn.
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        state: SVFState,
        offset: int,
        input_major: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.rank = U.shape
        self.in_features = Vh.shape[1]
        # merged weights take the storage order of the weight this layer replaces
        # (`gesal_core.layout`); the factors stay row-major, which batches and updates
        # ran as fast in (`bench.weight_layout`)
        self.input_major = input_major
        self.register_buffer("U", U.contiguous())
        self.register_buffer("S", S.contiguous())
        self.register_buffer("Vh", Vh.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # (U, Vh) packed for oneDNN once `prepack` ran; merged weights are then packed too
        self._packed: tuple[PackedCopy, PackedCopy] | None = None
        self.register_buffer("merged_weight", self._compose(torch.ones_like(S)))
        self.state = state
        self.offset = offset
        self._merged_key: object = ("ones",)

    def prepack(self) -> None:
        """Run products without gradients on weights packed once for oneDNN
        (`gesal_core.prepacked`): the factors get a packed copy, merged weights are
        packed from now on instead of kept plain."""
        if self._packed is None:
            self._packed = (PackedCopy(self.U), PackedCopy(self.Vh))
            self.merged_weight = prepacked.pack(self.merged_weight)

    def packed_bytes(self) -> int:
        """Memory of the factors' packed copies (merged weights are counted by the LRU)."""
        return 0 if self._packed is None else sum(c.nbytes for c in self._packed)

    @property
    def z_slice(self) -> slice:
        return slice(self.offset, self.offset + self.rank)

    def _compose(self, z: torch.Tensor) -> torch.Tensor:
        """W' = U diag(σ ⊙ z) Vᵀ, accumulated in float32 and stored in the factors' dtype,
        in the storage order of the weight this layer replaced, or packed after `prepack`."""
        weight = self._plain(z)
        return prepacked.pack(weight) if self._packed is not None else weight

    def _plain(self, z: torch.Tensor) -> torch.Tensor:
        scale = (self.S.float() * z.float().to(self.S.device)).unsqueeze(0)
        us = self.U.float() * scale
        if self.input_major:  # (V (U diag)ᵀ)ᵀ is W' stored (in, out) with no extra copy
            return (self.Vh.float().t() @ us.t()).t().to(self.U.dtype)
        return (us @ self.Vh.float()).to(self.U.dtype)

    def merge(self, z_full: torch.Tensor | None, key: object) -> None:
        """Materialise W' for the flat vector ``z_full`` (None means all ones)."""
        if key == self._merged_key:
            return
        self.merged_weight = self.compose(z_full)
        self._merged_key = key

    def use_merged(self, weight: torch.Tensor, key: object) -> None:
        """Adopt an already merged W' (from the LRU): a pointer swap, no arithmetic."""
        self.merged_weight = weight
        self._merged_key = key

    def compose(self, z_full: torch.Tensor | None) -> torch.Tensor:
        """W' for the flat vector ``z_full`` without installing it."""
        z = torch.ones_like(self.S) if z_full is None else z_full[self.z_slice]
        with torch.no_grad():
            return self._compose(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.mode == "merged":
            if self._merged_key != state.merged_key:
                self.merge(state.merged_z, state.merged_key)
            return self._merged(x)
        # σz is formed in fp32 and only then rounded to the products' dtype: z itself in
        # bf16 reads every value within 1/256 of 1 as exactly 1, so the first steps of an
        # update (3e-3 each) would be invisible to its own bf16 forward passes
        z = state.z[..., self.z_slice]
        scale = self.S * z.to(torch.promote_types(z.dtype, torch.float32))
        if scale.dim() == 2:  # one adapter per batch row: (B, r) -> (B, 1, ..., 1, r)
            if scale.shape[0] != x.shape[0]:
                raise ValueError(
                    f"per-row z has {scale.shape[0]} rows but the batch has {x.shape[0]}"
                )
            scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), self.rank)
        # (the gradient test first: a compiled update pass must not guard on anything else)
        training = torch.is_grad_enabled() and state.z.requires_grad
        packed = None if training else self._packed_factors(x)
        if packed is not None:
            vh, u = packed
            return prepacked.linear(prepacked.linear(x, vh) * scale, u, self.bias)
        h = F.linear(x, self.Vh)
        return F.linear(h * scale.to(h.dtype), self.U, self.bias)

    def _packed_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Vh, U) packed, if this product may run on them (see `prepacked.usable`)."""
        if self._packed is None or not prepacked.usable(x, self.bias):
            return None
        u, vh = self._packed[0].of(self.U), self._packed[1].of(self.Vh)
        return None if u is None or vh is None else (vh, u)

    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight
        if not weight.is_mkldnn:
            return F.linear(x, weight, self.bias)
        if prepacked.usable(x, self.bias):
            return prepacked.linear(x, weight, self.bias)
        # a gradient or another dtype through a packed merged weight: nothing in gesal
        # asks for one (updates run factored), so composing it plain on demand is enough
        z = self.state.merged_z
        plain = self._plain(torch.ones_like(self.S) if z is None else z[self.z_slice])
        return F.linear(x, plain.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
