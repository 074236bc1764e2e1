"""Which weights SVF adapts, and where their SVD factors are cached."""

from __future__ import annotations

from dataclasses import dataclass, field

# Parent-module names that mark a projection as part of the MLP or of attention.
# Classifying by parent rather than by leaf name matters for GPT-2, whose `c_proj`
# exists both in `attn` and in `mlp`.
MLP_PARENTS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe"})
ATTENTION_PARENTS = frozenset({"self_attn", "attn", "attention", "self_attention"})
TARGET_SETS = ("mlp", "attention", "all")


@dataclass(frozen=True)
class SVFConfig:
    """Configuration of the SVF adapter.

    ``targets`` is ``"mlp"`` (the Transformer² default: gate/up/down or c_fc/c_proj),
    ``"attention"``, ``"all"``, or an explicit tuple of leaf names such as
    ``("gate_proj", "up_proj")``. Nothing matching is an error, never a silent no-op:
    the published GESAL code adapts nothing because its names do not match.
    """

    targets: str | tuple[str, ...] = "mlp"
    cache_svd: bool = True
    progress: bool = True
    exclude: tuple[str, ...] = field(default=("lm_head",))
    # Bound of the LRU of merged weight sets (hot nodes switch by a pointer swap).
    merged_cache_mb: float = 1024.0
    # Products without gradients (answers, scoring) on weights packed once for oneDNN,
    # where the model is float32 on a CPU (`gesal_core.prepacked`): faster answers for
    # twice the memory of the frozen weights. False keeps every product on plain weights.
    prepack: bool = True

    def describe_targets(self) -> str:
        return self.targets if isinstance(self.targets, str) else ",".join(self.targets)
