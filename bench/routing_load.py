"""What a mention and a /metrics scrape read from Redis, at 1, 100 and 1,000 nodes.

    python -m bench.routing_load [--repeats 10] [--sizes 1,100,1000] [--z-size 51840]

One channel on a private embedded redis-server (unix socket, AOF everysec; started in a
temporary folder, stopped at the end) grows to each size, its nodes holding z vectors of
the bundled model's size (51,840 float32) and 576-wide embeddings. At each size, timed
in interleaved rounds so both see the same noise:

* "mention routing": the store read plus routing of one mention that lands on an
  existing node. Before: every node read with its z, then routed (`full_route`, whole
  records, the baseline). After: the engine's own
  `ChannelGraph.route(create=False)`, which reads every node's embedding (no z), then the
  chosen node. The engine runs a tiny random model, which routing never calls.
* "/metrics refresh": the per-channel gauges. Before: the loaded nodes counted
  (`full_refresh`). After: `Metrics.refresh` (`Store.node_count`, a ZCARD).

Medians are printed; the JSON keeps every timing.
"""

from __future__ import annotations

import asyncio
import tempfile

import numpy as np

from bench.common import apply_threads, base_args, interleaved, median, report
from bot.metrics import Metrics
from gesal_core import graph
from gesal_core.records import Node
from gesal_core.store.embedded import start_embedded
from gesal_core.store.redis_store import RedisStore

CHANNEL = "bench:routing"


async def full_route(store, channel: str, emb: np.ndarray) -> Node:
    """Routing from whole node records, z included: the baseline for `Store.node_heads`."""
    nodes = await store.load_nodes(channel)
    cfg = await store.get_config(channel)
    route = graph.route(graph.GraphIndex.build(nodes), emb, cfg.threshold)
    assert route.node_id is not None
    return next(n for n in nodes if n.node_id == route.node_id)


async def full_refresh(metrics: Metrics, store) -> None:
    """The /metrics gauges from whole node records: the baseline for `Store.node_count`."""
    for channel in await store.channels():
        metrics.pending.labels(channel).set(await store.pending_count(channel))
        metrics.nodes.labels(channel).set(len(await store.load_nodes(channel)))


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=10)
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--z-size", type=int, default=51840)
    ap.add_argument("--dim", type=int, default=576)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    sizes = [1, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = min(args.repeats, 3) if args.quick else args.repeats

    # the tiny engine lives with the tests' fakes; importing it here keeps it off the
    # bot's import path
    from tests.conftest import make_tiny_tokenizer
    from tests.fakes.tiny import make_engine

    rng = np.random.default_rng(0)
    rows, raw = [], {}
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded(tmp)
        try:
            store = RedisStore(server.url)
            eng = make_engine(make_tiny_tokenizer(), store=store, threshold=0.85)
            metrics = Metrics()
            made = 0
            for n in sizes:
                for i in range(made, n):
                    emb = rng.standard_normal(args.dim).astype(np.float32)
                    z = 1 + 0.01 * rng.standard_normal(args.z_size).astype(np.float32)
                    run(store.save_node(CHANNEL, Node(f"n{i}", emb / np.linalg.norm(emb), z)))
                made = n
                pick = run(store.get_node(CHANNEL, f"n{n // 2}"))
                query = pick.embedding + 0.01 * rng.standard_normal(args.dim).astype(np.float32)

                def heads(query=query, want=pick.node_id):
                    node, new, _ = run(eng.graph.route(CHANNEL, query, create=False))
                    assert not new and node.node_id == want and node.z.size == args.z_size

                def full(query=query, want=pick.node_id):
                    assert run(full_route(store, CHANNEL, query)).node_id == want

                route_t = interleaved({"full": full, "heads": heads}, repeats)
                metrics_t = interleaved(
                    {
                        "full": lambda: run(full_refresh(metrics, store)),
                        "counts": lambda: run(metrics.refresh(eng)),
                    },
                    repeats,
                )
                raw[n] = {"route": route_t, "metrics": metrics_t}
                for what, t, old, new in (
                    ("mention routing", route_t, "full", "heads"),
                    ("/metrics refresh", metrics_t, "full", "counts"),
                ):
                    before, after = median(t[old]), median(t[new])
                    rows.append(
                        {
                            "nodes": n,
                            "read": what,
                            "before_ms": 1000 * before,
                            "after_ms": 1000 * after,
                            "ratio": before / after,
                        }
                    )
            eng.close()
            run(store.close())
        finally:
            loop.close()
            server.stop()
    report(
        "routing_load",
        rows,
        {
            "model": f"z_size={args.z_size}, dim={args.dim}",
            "dtype": "float32",
            "repeats": repeats,
            "transport": "unix socket, embedded redis-server, AOF everysec",
            "before": "every node read with its z (load_nodes)",
            "after": "routing: node_heads + get_node; /metrics: node_count + pending_count",
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
