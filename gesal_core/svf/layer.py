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
    # factored products without gradients on lo <= rows < hi rows run weight-first
    # (`SVFLinear._weight_first`); (0, 0): never. `layout.weight_first_rows` picks it.
    weight_first_rows: tuple[int, int] = (0, 0)


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
        self.register_buffer("merged_weight", self._compose(torch.ones_like(S)))
        self.state = state
        self.offset = offset
        self._merged_key: object = ("ones",)

    @property
    def z_slice(self) -> slice:
        return slice(self.offset, self.offset + self.rank)

    def _compose(self, z: torch.Tensor) -> torch.Tensor:
        """W' = U diag(σ ⊙ z) Vᵀ, accumulated in float32 and stored in the factors' dtype,
        in the storage order of the weight this layer replaced."""
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
            return F.linear(x, self.merged_weight, self.bias)
        # σz is formed in fp32 and only then rounded to the products' dtype: z itself in
        # bf16 reads every value within 1/256 of 1 as exactly 1, so the first steps of an
        # update (3e-3 each) would be invisible to its own bf16 forward passes
        z = state.z[..., self.z_slice]
        scale = self.S * z.to(torch.promote_types(z.dtype, torch.float32))
        if scale.dim() == 2 and scale.shape[0] != x.shape[0]:
            raise ValueError(f"per-row z has {scale.shape[0]} rows but the batch has {x.shape[0]}")
        lo, hi = state.weight_first_rows
        # (the gradient test first: a compiled update pass must not guard on its rows)
        training = torch.is_grad_enabled() and state.z.requires_grad
        if not training and lo <= x.numel() // self.in_features < hi:
            return self._weight_first(x, scale)
        return self._x_first(x, scale)

    def _x_first(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The factored product as ``((x Vhᵀ) ⊙ σz) Uᵀ``."""
        if scale.dim() == 2:  # one adapter per batch row: (B, r) -> (B, 1, ..., 1, r)
            scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), self.rank)
        h = F.linear(x, self.Vh)
        return F.linear(h * scale.to(h.dtype), self.U, self.bias)

    def _weight_first(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The factored product as ``(U (σz ⊙ (Vh xᵀ)))ᵀ``: the same sums, with the big
        factor as the left operand. On a CPU, MKL streams a factor from memory faster
        this way than it runs ``x Vhᵀ`` on a few rows, whose weight it packs first
        (`bench.factored_order`; a whole batch of 8: `bench.serving_batch`, "x-first
        products"). The result is made contiguous: a transposed activation sends
        later linears (the LM head) down a slower path."""
        h = self.Vh @ x.reshape(-1, self.in_features).t()  # (r, rows)
        scale = scale.to(h.dtype)
        if scale.dim() == 2:  # rows are batch-major: (r, B, rows per B) × (r, B, 1)
            h = h.view(self.rank, scale.shape[0], -1) * scale.t().unsqueeze(-1)
            h = h.view(self.rank, -1)
        else:
            h = h * scale.unsqueeze(1)
        y = (self.U @ h).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
