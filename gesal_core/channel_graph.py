"""A channel's graph of nodes, as the store holds it: which node answers a prompt, a new
node's starting z and edges, and folding when the channel is full.

The maths (similarities, initial z, kNN edges, merging) is in gesal_core/graph.py; this
room reads and writes the store around it, under a per-channel lock so that two new
prompts of one channel never race to create a node. Routing reads the nodes' heads
(`Store.node_heads`, no z), so a mention's store read grows with the embeddings only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import numpy as np

from . import graph
from .records import ChannelConfig, ChannelMeta, Node, NodeHead
from .store import NodeGoneError, Store

log = logging.getLogger(__name__)


class ChannelGraph:
    """Routing, node creation and folding over one store's channels."""

    def __init__(self, store: Store, z_size: int) -> None:
        self.store = store
        self.z_size = z_size
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def route(
        self, channel: str, emb: np.ndarray, create: bool = True
    ) -> tuple[Node, bool, float]:
        """The node that answers ``emb``: the nearest one, or a new one (True) when none
        is similar enough, with the similarity routing saw. The one z read is the
        answering node's, or a new node's neighbours' (and a fold's two nodes when the
        channel is full). ``create=False`` returns what a new node would start from
        without storing it. A node deleted between the two reads (a reset, or a fold by
        another process) raises NodeGoneError, as `observe` would have."""
        async with self._locks[channel]:  # two new prompts must not race to create
            heads = await self.store.node_heads(channel)
            cfg = await self.store.get_config(channel)
            index = graph.GraphIndex.build(heads)
            route = graph.route(index, emb, cfg.threshold)
            if route.node_id is not None:
                return await self.node(channel, route.node_id), False, route.similarity
            if not create:
                z = await self.initial_z(channel, index, emb)
                return Node("(new)", emb.copy(), z), True, route.similarity
            node, new = await self._grow(channel, heads, index, emb, cfg)
            return node, new, route.similarity

    async def _grow(
        self,
        channel: str,
        heads: list[NodeHead],
        index: graph.GraphIndex,
        emb: np.ndarray,
        cfg: ChannelConfig,
    ) -> tuple[Node, bool]:
        """A new node for ``emb`` (True), folding the least used one away first when the
        channel is full; the only node itself (False) when there is none to fold it into."""
        if len(heads) >= cfg.max_nodes:
            if not await self.fold_least_used(channel, heads, index):
                return await self.node(channel, heads[0].node_id), False  # the only node
            heads = await self.store.node_heads(channel)
            index = graph.GraphIndex.build(heads)
        node = Node(
            node_id=graph.new_node_id(),
            embedding=emb.copy(),
            z=await self.initial_z(channel, index, emb),
        )
        await self.store.save_node(channel, node)
        await self._link(channel, heads, index, node)
        return node, True

    async def _link(
        self, channel: str, heads: list[NodeHead], index: graph.GraphIndex, node: Node
    ) -> None:
        """Give a new node its kNN edges, and keep its neighbours' edge lists current."""
        edges = graph.knn_edges(index, node)
        await self.store.set_neighbors(channel, node.node_id, edges)
        grown = graph.GraphIndex.build([*heads, node])
        by_id = {h.node_id: h for h in heads}
        for other, _ in edges:
            await self.store.set_neighbors(channel, other, graph.knn_edges(grown, by_id[other]))
        node.neighbors = edges

    async def node(self, channel: str, node_id: str) -> Node:
        """A node that must exist; NodeGoneError when it was deleted meanwhile."""
        node = await self.store.get_node(channel, node_id)
        if node is None:
            raise NodeGoneError(node_id)
        return node

    async def initial_z(self, channel: str, index: graph.GraphIndex, emb: np.ndarray):
        """`graph.initial_z`, reading the z of only the neighbours it blends."""
        nodes = {i: await self.node(channel, i) for i, _ in graph.init_neighbours(index, emb)}
        return graph.initial_z(index, nodes, emb, self.z_size)

    async def fold_least_used(
        self, channel: str, heads: list[NodeHead], index: graph.GraphIndex
    ) -> bool:
        """Fold a full channel's least used node into its nearest; False when there is no
        other node (max_nodes 1): deleting the only one would orphan the feedback waiting
        on its replies. The merge map (`ChannelMeta.merged`) sends the folded node's
        feedback to its target from then on."""
        least = graph.least_used(heads)
        nearest = index.nearest(least.embedding, k=1, exclude=least.node_id)
        if not nearest:
            return False
        victim = await self.node(channel, least.node_id)
        target = await self.node(channel, nearest[0][0])
        await self.store.save_node(channel, graph.merge_into(target, victim))
        merged = dict((await self.meta(channel)).merged)
        merged[victim.node_id] = target.node_id
        await self.store.set_meta(channel, merged=merged)
        await self.store.delete_node(channel, victim.node_id)
        log.info("channel %s full: folded node %s away", channel, victim.node_id)
        return True

    async def observe(self, channel: str, node_id: str, emb: np.ndarray) -> None:
        """Count a prompt the node answers: its embedding joins the node's running mean."""
        await self.store.observe(channel, node_id, emb)

    async def meta(self, channel: str) -> ChannelMeta:
        """The channel's merge map and training health, typed."""
        return ChannelMeta.from_dict(await self.store.meta(channel))

    async def owner(self, channel: str, node_id: str) -> str:
        """The node a reply of ``node_id`` sends its feedback to now (`ChannelMeta.owner`)."""
        return (await self.meta(channel)).owner(node_id)
