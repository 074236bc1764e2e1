"""A memory-bounded LRU of merged weight sets, one set per adapter key.

Merging a z into every target weight costs ~0.7 s for SmolLM2-135M on a 2-core CPU, so
switching nodes by re-merging would put that on the first token of every answer on a
different node than the last. Keeping the merged weights of the hot nodes makes a switch
a pointer swap; the bound keeps a community with many nodes from eating the host's memory
(one fp32 set for SmolLM2-135M's MLPs is ~318 MB).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

WeightSet = dict[str, torch.Tensor]


def weight_set_bytes(weights: WeightSet) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


class MergedCache:
    """Least-recently-used merged weight sets, at most ``max_bytes`` in total.

    A set larger than the whole bound is never stored (the caller keeps using it as the
    current weights, it just is not remembered). Tensors are stored by reference: the
    layers replace their ``merged_weight`` instead of writing into it, so a cached set is
    never mutated behind the cache's back.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._sets: OrderedDict[Hashable, tuple[WeightSet, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sets

    def __len__(self) -> int:
        return len(self._sets)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._sets)

    def get(self, key: Hashable) -> WeightSet | None:
        entry = self._sets.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._sets.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, weights: WeightSet) -> bool:
        """Remember ``weights`` under ``key``, evicting the oldest sets to fit; False if too big."""
        size = weight_set_bytes(weights)
        self.discard(key)
        if size > self.max_bytes:
            return False
        while self._sets and self.bytes + size > self.max_bytes:
            _, (_, old) = self._sets.popitem(last=False)
            self.bytes -= old
            self.evictions += 1
        self._sets[key] = (weights, size)
        self.bytes += size
        return True

    def discard(self, key: Hashable) -> None:
        entry = self._sets.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        self._sets.clear()
        self.bytes = 0
