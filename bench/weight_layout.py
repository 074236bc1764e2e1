"""Weights stored input-major vs as HF stores them, on the serving and update paths.

    python -m bench.weight_layout [--repeats 3] [--tokens 16]

`gesal_core.model.load_model` stores every linear weight input-major on a CPU
(`gesal_core.layout`): the same (out, in) tensors, so the same answers, with storage in
(in, out) order. This runs two copies of the model, one in each order, round by round:

* one answer: one node, hot (its merged weights in the LRU), through `BatchedGenerator`;
* 8 answers from 8 nodes in one batch (a z per row, the factored forward), and the same 8
  served one by one (each node hot), so the batching ratio is measured in both orders;
* one update of a node's z on 4 rated samples (`LearningConfig` defaults, its products
  in the dtype "auto" picks here) and the same in fp32.

Answers are greedy and must be the same token ids in both orders (asserted). Serving
runs on plain weights here (``SVFConfig(prepack=False)``): on weights packed for oneDNN
(`gesal_core.prepacked`, a CPU's default) the storage order of the plain ones no longer
reaches an answer's products, only an update's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bench.common import (
    apply_threads,
    base_args,
    greedy_pairs,
    interleaved,
    median,
    model_meta,
    node_requests,
    report,
)
from gesal_core.engine import EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.layout import set_weight_layout
from gesal_core.learning import LearningConfig, Sample, reinforce_step
from gesal_core.model import load_model
from gesal_core.serving import BatchedGenerator
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.worker import ModelWorker

ORDERS = ("row-major", "input-major")


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    tokens, n = (4, 2) if args.quick else (args.tokens, 8)
    worker = ModelWorker()
    greedy = SamplingConfig(max_new_tokens=tokens, temperature=0)
    system = EngineConfig().system
    learning = LearningConfig()
    fp32 = dataclasses.replace(learning, compute_dtype="float32")
    variants, lm = {}, None
    answers: dict[str, list] = {}
    for order in ORDERS:
        lm = load_model(args.model, progress=False)
        set_weight_layout(lm.model, on=order == "input-major")
        svf = SVFModel(
            lm.model, lm.name, SVFConfig(progress=False, merged_cache_mb=400.0 * n, prepack=False)
        )
        gen = BatchedGenerator(svf, lm.tokenizer, worker)
        requests = node_requests(lm.tokenizer, svf.z_size, n, greedy, system, keyed=True)
        for r in requests:
            svf.set_merged(torch.from_numpy(r.z), key=r.key)  # hot: in the merged LRU
        pairs = greedy_pairs(svf.model, lm.tokenizer, 4, 24)
        samples = [Sample(p, r, reward=1.0 if j % 2 else -2.0) for j, (p, r) in enumerate(pairs)]
        z0 = np.ones(svf.z_size, dtype=np.float32)

        pad = lm.tokenizer.pad_token_id or 0

        def update(cfg, svf=svf, samples=samples, z0=z0, pad=pad):
            res = reinforce_step(svf, z0, samples, 0.0, cfg, pad)
            assert res.status == "updated", res.reason

        def one_by_one(gen=gen, requests=requests):
            return [a for r in requests for a in gen([r])]

        answers[order] = [o.response_ids for o, _ in gen(requests)]
        update(learning)  # warm-up: the low-precision copies are made once
        variants[f"one answer, {order}"] = lambda gen=gen, r=requests[0]: gen([r])
        variants[f"{n} batched, {order}"] = lambda gen=gen, rs=requests: gen(rs)
        variants[f"{n} one by one, {order}"] = one_by_one
        variants[f"update k=4, {order}"] = lambda u=update: u(learning)
        variants[f"update k=4 fp32, {order}"] = lambda u=update: u(fp32)
    assert answers["row-major"] == answers["input-major"], "answers differ between orders"
    try:
        times = interleaved(variants, args.repeats)
    finally:
        worker.close()
    m = {name: median(ts) for name, ts in times.items()}
    rows = []
    for what in ("one answer", f"{n} batched", f"{n} one by one", "update k=4", "update k=4 fp32"):
        row, inp = m[f"{what}, row-major"], m[f"{what}, input-major"]
        rows.append(
            {
                "variant": what,
                "row-major s": row,
                "input-major s": inp,
                "speed-up": row / inp,
            }
        )
    batching = {o: m[f"{n} one by one, {o}"] / m[f"{n} batched, {o}"] for o in ORDERS}
    for order, ratio in batching.items():
        print(f"{n} batched vs one by one, weights {order}: {ratio:.2f}x")
    auto = "bfloat16" if svf.compute_precision.lowers(learning.compute_dtype) else "float32"
    report(
        "weight_layout",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "max_new_tokens": tokens,
            "batch": n,
            "update_compute_dtype": auto,
            "batched_vs_one_by_one": batching,
            "times_s": times,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
