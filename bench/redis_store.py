"""Redis cost of a node: bytes per node, and a node load + commit round trip.

    python -m bench.redis_store [--repeats 50] [--z-size 51840] [--dim 576]

Runs against a private embedded redis-server (started in a temporary folder, stopped at
the end). Bytes are Redis's own ``MEMORY USAGE`` of the node's hash (z as float32 bytes).
The round trip is ``get_node`` then a compare-and-set ``commit`` of a new z.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

import numpy as np

from bench.common import apply_threads, base_args, median, report
from gesal_core.records import Node, NodeUpdate
from gesal_core.store.embedded import start_embedded
from gesal_core.store.layout import Keys
from gesal_core.store.redis_store import RedisStore


async def _measure(store: RedisStore, server, args) -> dict:
    channel = "bench:1"
    rng = np.random.default_rng(0)
    z = np.ones(args.z_size, dtype=np.float32)
    emb = rng.standard_normal(args.dim).astype(np.float32)
    for i in range(args.nodes):
        await store.save_node(channel, Node(f"n{i}", emb, z + 0.01 * i))
    sizes = [server.client().memory_usage(Keys(channel).node(f"n{i}")) for i in range(args.nodes)]
    loads, commits = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        node = await store.get_node(channel, "n0")
        loads.append(time.perf_counter() - start)
        update = NodeUpdate(
            node_id="n0",
            expected_version=node.version,
            z=node.z + 1e-3,
            baseline=0.0,
            rated_delta=1,
            reward_sum_delta=1.0,
            recent=[1.0],
            updated=True,
            rolled_back=False,
            downvoted=[],
        )
        start = time.perf_counter()
        await store.commit(channel, [update], [])
        commits.append(time.perf_counter() - start)
    start = time.perf_counter()
    await store.load_nodes(channel)
    load_all = time.perf_counter() - start
    return {"sizes": sizes, "loads": loads, "commits": commits, "load_all": load_all}


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=50)
    ap.add_argument("--z-size", type=int, default=51840)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--nodes", type=int, default=20)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded(tmp)
        try:
            store = RedisStore(server.url)
            m = asyncio.run(_measure(store, server, args))
        finally:
            server.stop()
    load, commit = median(m["loads"]), median(m["commits"])
    rows = [
        {"figure": "bytes per node (MEMORY USAGE)", "value": float(median(m["sizes"]))},
        {"figure": "raw z + embedding bytes", "value": float(4 * (args.z_size + args.dim))},
        {"figure": "node load (get_node) ms", "value": 1000 * load},
        {"figure": "node commit (Lua CAS) ms", "value": 1000 * commit},
        {"figure": "load + commit round trip ms", "value": 1000 * (load + commit)},
        {"figure": f"load_nodes of {args.nodes} nodes ms", "value": 1000 * m["load_all"]},
    ]
    report(
        "redis_store",
        rows,
        {
            "model": f"z_size={args.z_size}",
            "dtype": "float32",
            "repeats": args.repeats,
            "transport": "unix socket, embedded redis-server, AOF everysec",
            "times_s": {"load": m["loads"], "commit": m["commits"]},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
