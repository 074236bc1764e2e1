"""Reads that must not grow with what a channel's nodes hold: routing a mention reads
the nodes' embeddings (heads) and one z, a /metrics scrape reads counts only. Each test
runs on the in-memory store and on a real Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from bot.metrics import Metrics
from gesal_core import graph
from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig, Node, Reply
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama
from .fakes.tiny import make_engine

PROMPTS = [
    "hello world",
    "0123456789 the lazy dog jumps",
    "what is the capital of France?",
    "fox fox fox fox",
    "zzzz qqqq xxxx",
    "1 + 1 = 2, 2 + 2 = 4",
    "The quick brown fox.",
    "Why is the sky blue?",
]


class CountingStore:
    """A store that notes every node record (with its z) read through it; everything
    else passes through untouched."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.z_reads: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def load_nodes(self, channel: str) -> list[Node]:
        nodes = await self._inner.load_nodes(channel)
        self.z_reads += [n.node_id for n in nodes]
        return nodes

    async def get_node(self, channel: str, node_id: str) -> Node | None:
        node = await self._inner.get_node(channel, node_id)
        if node is not None:
            self.z_reads.append(node_id)
        return node


class NoNodeReads(CountingStore):
    """A store on which reading any node record fails the test."""

    async def load_nodes(self, channel: str) -> list[Node]:
        raise AssertionError("load_nodes read every node")

    async def get_node(self, channel: str, node_id: str) -> Node | None:
        raise AssertionError(f"get_node read node {node_id}")


@pytest.fixture(params=["memory", "redis"])
def new_store(request):
    if request.param == "memory":
        return lambda defaults=None: MemoryStore(defaults)
    return request.getfixturevalue("make_redis_store")


@pytest.fixture
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_mention_reads_only_the_z_it_answers_with(svf, tiny_tokenizer, new_store):
    async def go():
        cfg = EngineConfig(
            sampling=SamplingConfig(max_new_tokens=2, temperature=0.9),
            guard=GuardConfig(enabled=False),
            channel_defaults=ChannelConfig(threshold=0.9999),
        )
        store = CountingStore(new_store(cfg.channel_defaults))
        eng = Engine(svf, tiny_tokenizer, store, cfg, model_name="tiny")
        try:
            first = [await eng.respond("c", ask(p)) for p in PROMPTS]
            ids = {o.node_id for o in first}
            assert len(ids) >= 5  # enough nodes that reading them all would show

            store.z_reads.clear()
            again = await eng.respond("c", ask(PROMPTS[2]))
            assert not again.new_node and again.node_id == first[2].node_id
            assert store.z_reads == [again.node_id]

            heads = await store.node_heads("c")
            emb = eng._embed("a new topic: sourdough starters")
            expected = {i for i, _ in graph.init_neighbours(graph.GraphIndex.build(heads), emb)}
            assert 0 < len(expected) <= graph.K_INIT < len(heads)
            for record in (False, True):  # a new node reads its neighbours' z only
                store.z_reads.clear()
                out = await eng.respond("c", ask("a new topic: sourdough starters"), record)
                assert out.new_node and set(store.z_reads) == expected
                assert len(store.z_reads) == len(expected)
        finally:
            eng.close()

    asyncio.run(go())


def _node(i: int, rng: np.random.Generator, z_size: int = 64) -> Node:
    return Node(
        node_id=f"n{i}",
        embedding=rng.standard_normal(16).astype(np.float32),
        z=rng.standard_normal(z_size).astype(np.float32),
        count=i,
        updated_at=1000.0 + i,
    )


def test_node_heads_match_the_nodes_without_their_z(new_store):
    async def go():
        store, rng = new_store(), np.random.default_rng(0)
        for i in range(5):
            await store.save_node("c", _node(i, rng))
        await store.delete_node("c", "n2")
        nodes, heads = await store.load_nodes("c"), await store.node_heads("c")
        assert [h.node_id for h in heads] == [n.node_id for n in nodes] == ["n0", "n1", "n3", "n4"]
        for h, n in zip(heads, nodes, strict=True):
            assert np.array_equal(h.embedding, n.embedding) and h.embedding.dtype == np.float32
            assert (h.count, h.updated_at) == (n.count, n.updated_at)
            assert not hasattr(h, "z")
        assert await store.node_count("c") == 4
        assert await store.node_heads("empty") == [] and await store.node_count("empty") == 0
        if hasattr(store, "close"):
            await store.close()

    asyncio.run(go())


def _sample(text: str, name: str, labels: str) -> float:
    key = f"{name}{{{labels}}}"
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in metrics:\n{text}")


def test_metrics_gauges_count_nodes_and_pending_feedback_without_reading_nodes(
    new_store, tiny_tokenizer
):
    async def go():
        inner, rng = new_store(), np.random.default_rng(1)
        for channel, n_nodes, n_votes in (("a:1", 7, 3), ("b:2", 1, 0), ("c:3", 12, 5)):
            for i in range(n_nodes):
                await inner.save_node(channel, _node(i, rng))
            reply = Reply("r1", "n0", [1], [2], "q", "a", 0)
            await inner.put_reply(channel, reply)
            for v in range(n_votes):
                await inner.set_vote(channel, "r1", f"user{v}", 1)
        metrics = Metrics()
        engine = make_engine(tiny_tokenizer, store=NoNodeReads(inner))
        try:
            await metrics.refresh(engine)
        finally:
            engine.close()
        text = metrics.render().decode()
        if hasattr(inner, "close"):
            await inner.close()
        return text

    text = asyncio.run(go())
    for channel, n_nodes, n_votes in (("a:1", 7, 3), ("b:2", 1, 0), ("c:3", 12, 5)):
        assert _sample(text, "gesal_nodes", f'channel="{channel}"') == n_nodes
        assert _sample(text, "gesal_pending_feedback", f'channel="{channel}"') == n_votes


# -- the embedded Redis's memory limit ---------------------------------------------------


def test_the_settings_default_maxmemory_is_the_embedded_servers():
    from bot.settings import Settings
    from gesal_core.store.embedded import DEFAULT_MAXMEMORY

    assert Settings.model_fields["gesal_redis_maxmemory"].default == DEFAULT_MAXMEMORY


def test_the_embedded_redis_runs_with_the_configured_maxmemory(tmp_path, monkeypatch):
    import os

    from gesal_core.store import open_store
    from gesal_core.store.embedded import start_embedded

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("GESAL_DATA_DIR", str(tmp_path / "data"))

    async def opened() -> int:
        store, close = await open_store(embedded_maxmemory="32mb")
        try:
            client = redis.Redis(unix_socket_path=store.url.removeprefix("unix://"))
            return int(client.config_get("maxmemory")["maxmemory"])
        finally:
            await close()

    assert asyncio.run(opened()) == 32 * 2**20
    server = start_embedded(tmp_path / "r", maxmemory="64mb")
    pid = server.process.pid
    assert int(server.client().config_get("maxmemory")["maxmemory"]) == 64 * 2**20
    os.close(server._lock_fd)  # the owner dies; the next start adopts its server
    server._lock_fd = None
    adopted = start_embedded(tmp_path / "r", maxmemory="128mb")
    try:
        assert adopted.process is None
        assert int(adopted.client().config_get("maxmemory")["maxmemory"]) == 128 * 2**20
    finally:
        adopted.stop()
    server.process.wait(10)
    assert pid
