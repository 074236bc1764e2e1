"""Node-switch latency: time to first token on a node different from the last one.

    python -m bench.node_switch [--repeats 5]

Variants, timed round-robin in one run (prefill + one token, batch of one):

* base model: the plain HF model, no SVF layers at all (the baseline), its linears on
  packed weights where the SVF model's are (a CPU: `gesal_core.prepacked`);
* same node: SVF merged, no switch at all;
* re-merge: merge the new node's z into every weight first (serving without the LRU;
  ~0.7 s of arithmetic on a CPU);
* LRU hit: the new node is hot, its merged weights are in the LRU (a pointer swap);
* factored: the new node is cold, run it through ``((x Vhᵀ) ⊙ σz) Uᵀ`` with no merge.
"""

from __future__ import annotations

import itertools
import time

from bench.common import (
    PROMPTS,
    apply_threads,
    base_args,
    chat_ids,
    decode,
    median,
    model_meta,
    node_z,
    report,
)
from gesal_core.model import load_model
from gesal_core.prepacked import prepack_linears
from gesal_core.svf import SVFConfig, SVFModel


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=5)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    lm = load_model(args.model, progress=False)
    plain = load_model(args.model, progress=False).model  # untouched: the base model
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    if svf.prepacked:  # the same matrix kernels as the SVF model's
        prepack_linears(plain)
    ids = chat_ids(lm.tokenizer, PROMPTS[1])
    za, zb = node_z(svf.z_size, 1), node_z(svf.z_size, 2)
    svf.set_merged(za, key="A")
    svf.set_merged(zb, key="B")  # both hot: in the LRU
    cold = itertools.count(100)

    def first_token():
        decode(svf.model, ids, 1)

    def base_model():
        decode(plain, ids, 1)

    def same_node():
        svf.set_merged(za, key="A")  # already current: nothing to do
        first_token()

    def remerge():
        svf.set_merged(node_z(svf.z_size, next(cold)))  # anonymous: never cached
        first_token()

    def lru_hit():
        svf.set_merged(
            zb if svf.state.merged_key == "A" else za,
            key="B" if svf.state.merged_key == "A" else "A",
        )
        first_token()

    def factored():
        with svf.factored(node_z(svf.z_size, next(cold))):
            first_token()

    variants = {
        "base model (no SVF)": base_model,
        "same node (no switch)": same_node,
        "switch: re-merge all weights": remerge,
        "switch: hot node, LRU hit": lru_hit,
        "switch: cold node, factored": factored,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            svf.set_merged(za, key="A")  # every switch starts from node A (untimed)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = times["base model (no SVF)"]
    floor = median(times["same node (no switch)"])
    rows = [
        {
            "variant": name,
            "median_ms": 1000 * median(ts),
            "vs_base": median(ts) / median(base),
            # per-round differences to the base model's TTFT of the same round: the
            # neighbour's noise hits both alike
            "over_base_ms": 1000 * median([a - b for a, b in zip(ts, base, strict=True)]),
            "over_same_node_ms": 1000 * (median(ts) - floor),
            "overhead_le_50ms": "met"
            if median([a - b for a, b in zip(ts, base, strict=True)]) <= 0.05
            else "not met",
        }
        for name, ts in times.items()
    ]
    report(
        "node_switch",
        rows,
        {
            **model_meta(lm),
            "repeats": repeats,
            "prompt_tokens": ids.shape[1],
            "lru_mb": svf.merged_cache.max_bytes / 2**20,
            "merged_set_mb": svf.merged_cache.bytes / max(1, len(svf.merged_cache)) / 2**20,
            "times_s": times,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
