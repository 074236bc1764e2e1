"""Linear weights packed once for oneDNN: the CPU's products without gradients.

Why: MKL's sgemm packs its weight operand into its own blocked layout on every call. For
the few rows of serving (a decoding step of one answer, a batch of 8) that repacking is
most of the product: the weight streams from memory at about half the speed a weight
packed beforehand runs at. oneDNN packs a weight once
(``torch.ops.mkldnn._reorder_linear_weight``) and then runs any number of rows on it
(``torch.ops.mkldnn._linear_pointwise``): the same float32 sums in another blocking
order. Side by side on one thread (`bench.serving_batch`, `bench.factored_order`,
docs/performance.md, "Serving"), a batch of 8 answers on 8 nodes and one answer on a hot
node both run faster.

What it costs: the packed copy is an opaque tensor beside the plain weight, so the
frozen weights it covers take twice their memory (a merged weight set is packed instead
of kept plain, so the LRU of hot nodes holds no second copy). The operator has no
autograd formula, so anything that wants a gradient (an update's passes) and anything
in another dtype (an update's bf16 copies, under autocast) runs on the plain weights.
CPU and float32 only; elsewhere nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocking for this many rows; a packed weight runs any row count
# (`bench.factored_order`: 1 to 144 rows on one packing), and serving's batches hold 8
ROWS_HINT = 8


def supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: a float32 matrix on a CPU with oneDNN."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of an (out, in) weight, in any storage order."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` on W's packed copy; ``x`` of any leading shape."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def usable(x: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """True when a product of ``x`` may run packed: float32, and no gradient wanted of
    it (the packed operator has none; autograd would silently return nothing)."""
    # an update's passes under torch.compile trace the plain products: the packed copies
    # are opaque tensors inductor cannot lower
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(t is not None and t.requires_grad for t in operands))


class PackedCopy:
    """A weight's packed copy, used only while that very tensor is the weight (an
    update's bf16 copies swapped in by `svf.precision.LowPrecisionWeights` never meet
    the float32 packing) and repacked if the weight was written in place since."""

    __slots__ = ("packed", "source", "version")

    def __init__(self, weight: torch.Tensor) -> None:
        self.source = weight
        self.version = weight._version
        self.packed = pack(weight)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        if weight is not self.source:
            return None
        if weight._version != self.version:
            self.version, self.packed = weight._version, pack(weight)
        return self.packed


class PrepackedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose products without gradients run on a packed copy.

    It shares its ``weight`` and ``bias`` Parameters with the layer it replaces, so tied
    weights (the LM head and the token embedding) stay tied and module names stay the same.
    """

    @classmethod
    def replacing(cls, linear: nn.Linear) -> PrepackedLinear:
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.packed_copy = PackedCopy(linear.weight)
        return new

    def packed_bytes(self) -> int:
        return self.packed_copy.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_copy.of(self.weight) if usable(x, self.weight, self.bias) else None
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, packed, self.bias)


def prepack_linears(model: nn.Module) -> int:
    """Replace every frozen float32 ``nn.Linear`` of ``model`` on a CPU by a
    `PrepackedLinear`; returns how many. Layers with trainable weights stay as they are."""
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            frozen = type(child) is nn.Linear and not child.weight.requires_grad
            if frozen and supported(child.weight):
                setattr(parent, name, PrepackedLinear.replacing(child))
                done += 1
    return done
