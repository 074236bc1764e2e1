"""SVD of the target weights: computing it vs loading it from the disk cache.

    python -m bench.svd_cache [--repeats 3] [--model NAME]

Both paths are timed side by side in one run on the same loaded model; the cache path
includes hashing the weights (that is how a cache hit is recognised).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from bench.common import median, report, timed
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, decompose, find_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    lm = load_model(args.model, progress=False)
    cfg = SVFConfig(progress=False)
    names = find_targets(lm.model, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GESAL_CACHE_DIR"] = tmp
        decompose(lm.model, names, lm.name, cfg)  # fill the cache
        compute = timed(
            lambda: decompose(lm.model, names, lm.name, SVFConfig(progress=False, cache_svd=False)),
            args.repeats,
        )
        load = timed(lambda: decompose(lm.model, names, lm.name, cfg), args.repeats)
    rows = [
        {"path": "compute SVD", "median_s": median(compute), "runs": len(compute)},
        {"path": "load from cache", "median_s": median(load), "runs": len(load)},
        {"path": "speed-up", "median_s": median(compute) / median(load), "runs": len(load)},
    ]
    report(
        "svd_cache",
        rows,
        {
            "model": lm.name,
            "matrices": len(names),
            "dtype": str(lm.dtype),
            "repeats": args.repeats,
            "compute_s": compute,
            "load_s": load,
        },
    )


if __name__ == "__main__":
    main()
