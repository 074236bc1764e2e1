"""Graph memory: route a prompt to the nearest node of its channel, or start a new one.

Pure functions over `Node` records plus a small cached index, so routing costs one
matrix-vector product (about a millisecond at 10k nodes) and never touches the store.
Routing and folding need only ids, embeddings, counts and ages, so they take a channel's
`NodeHead`s (or whole `Node`s): the z vectors are read only for the node that answers and
for a new node's `K_INIT` neighbours (`init_neighbours`).

Embeddings are unit vectors, so cosine similarity is a dot product. A node's embedding
is the running mean of its prompts' unit embeddings; it is re-normalised for routing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .records import Node, NodeHead

K_EDGES = 4  # kNN edges kept per node
K_INIT = 3  # neighbours whose z seeds a new node

_N = TypeVar("_N", Node, NodeHead)


def new_node_id() -> str:
    return uuid.uuid4().hex[:12]


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


@dataclass
class GraphIndex:
    """Node ids and a matrix of their unit embeddings, for fast routing."""

    ids: list[str]
    matrix: np.ndarray  # (N, H) float32

    @classmethod
    def build(cls, nodes: Sequence[Node | NodeHead]) -> GraphIndex:
        if not nodes:
            return cls([], np.zeros((0, 0), dtype=np.float32))
        return cls(
            [n.node_id for n in nodes],
            _unit(np.stack([n.embedding for n in nodes]).astype(np.float32)),
        )

    def similarities(self, embedding: np.ndarray) -> np.ndarray:
        if not self.ids:
            return np.zeros(0, dtype=np.float32)
        return self.matrix @ _unit(embedding.astype(np.float32))

    def nearest(
        self, embedding: np.ndarray, k: int = 1, exclude: str | None = None
    ) -> list[tuple[str, float]]:
        sims = self.similarities(embedding)
        order = np.argsort(-sims)
        out = []
        for i in order:
            if self.ids[i] != exclude:
                out.append((self.ids[i], float(sims[i])))
            if len(out) == k:
                break
        return out


@dataclass
class Route:
    node_id: str | None  # None: no node is similar enough, create one
    similarity: float


def route(index: GraphIndex, embedding: np.ndarray, threshold: float) -> Route:
    """Nearest node if its cosine similarity reaches ``threshold``, else a new node."""
    best = index.nearest(embedding, k=1)
    if best and best[0][1] >= threshold:
        return Route(best[0][0], best[0][1])
    return Route(None, best[0][1] if best else -1.0)


def init_neighbours(index: GraphIndex, embedding: np.ndarray) -> list[tuple[str, float]]:
    """The nodes whose z `initial_z` blends for a new node at ``embedding``: the
    `K_INIT` nearest with a positive similarity (the only z a new node needs read)."""
    return [(i, s) for i, s in index.nearest(embedding, k=K_INIT) if s > 0]


def initial_z(
    index: GraphIndex, nodes: Mapping[str, Node], embedding: np.ndarray, z_size: int
) -> np.ndarray:
    """A new node's z: its nearest neighbours' z weighted by (positive) similarity, or ones.

    Starting from neighbours means a community's learned style carries over to a new
    topic instead of restarting from the base model. ``nodes`` needs to hold only the
    `init_neighbours`.
    """
    neighbours = init_neighbours(index, embedding)
    if not neighbours:
        return np.ones(z_size, dtype=np.float32)
    weights = np.array([s for _, s in neighbours], dtype=np.float64)
    weights /= weights.sum()
    z = sum(
        w * nodes[i].z.astype(np.float64) for (i, _), w in zip(neighbours, weights, strict=True)
    )
    return np.asarray(z, dtype=np.float32)


def knn_edges(
    index: GraphIndex, node: Node | NodeHead, k: int = K_EDGES
) -> list[tuple[str, float]]:
    return index.nearest(node.embedding, k=k, exclude=node.node_id)


def least_used(nodes: Sequence[_N]) -> _N:
    """The node to fold away when a channel is full: fewest prompts, then oldest."""
    return min(nodes, key=lambda n: (n.count, n.updated_at))


def merge_into(target: Node, victim: Node) -> Node:
    """Fold ``victim`` into ``target``: count-weighted mean of embeddings and of z.

    The victim's reward statistics are added so no feedback history is silently lost.
    """
    total = max(target.count + victim.count, 1)
    wt, wv = target.count / total, victim.count / total
    if target.count + victim.count == 0:
        wt = wv = 0.5
    target.embedding = (wt * target.embedding + wv * victim.embedding).astype(np.float32)
    target.z = (wt * target.z + wv * victim.z).astype(np.float32)
    target.count += victim.count
    target.rated += victim.rated
    target.reward_sum += victim.reward_sum
    target.downvoted = (target.downvoted + victim.downvoted)[-64:]
    target.version += 1
    return target
