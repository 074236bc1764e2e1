"""Routing latency: nearest node of a channel at 100, 1k and 10k nodes.

    python -m bench.routing [--repeats 200] [--dim 576]

Times `graph.route` on a prebuilt `GraphIndex` (one query), and building the index from
node records (the engine rebuilds it per request). Embeddings are random unit vectors of
the model's hidden size; routing cost does not depend on their values.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import apply_threads, base_args, median, report
from gesal_core import graph
from gesal_core.records import Node


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=200)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--sizes", default="100,1000,10000")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    rng = np.random.default_rng(0)
    rows, raw = [], {}
    dummy_z = np.ones(1, dtype=np.float32)
    for n in [int(s) for s in args.sizes.split(",")]:
        emb = rng.standard_normal((n, args.dim)).astype(np.float32)
        nodes = [Node(f"n{i}", emb[i], dummy_z) for i in range(n)]
        queries = rng.standard_normal((args.repeats, args.dim)).astype(np.float32)
        builds = []
        for _ in range(max(3, args.repeats // 20)):
            start = time.perf_counter()
            index = graph.GraphIndex.build(nodes)
            builds.append(time.perf_counter() - start)
        routes = []
        for q in queries:
            start = time.perf_counter()
            graph.route(index, q, 0.8)
            routes.append(time.perf_counter() - start)
        raw[n] = {"route": routes, "build": builds}
        r, b = median(routes), median(builds)
        rows.append(
            {
                "nodes": n,
                "route_ms": 1000 * r,
                "build_index_ms": 1000 * b,
                "route_plus_build_ms": 1000 * (r + b),
                "route_le_2ms": "met" if r <= 0.002 else "not met",
            }
        )
    report(
        "routing",
        rows,
        {"dim": args.dim, "repeats": args.repeats, "dtype": "float32", "model": "-"},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
