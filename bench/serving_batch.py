"""Answering N channels through the real serving path: batched vs one by one, and what
the per-node KV cache of the chat template's head saves.

    python -m bench.serving_batch [--repeats 3] [--tokens 16] [--sizes 1,8]

`bench.multichannel` times raw decoding; this runs `BatchedGenerator`, which the engine
calls, on N requests from N channels, each on its own node, greedy, up to ``--tokens``
new tokens (the answers are the same in every variant, so the work is too):

* batched: all N in one call, a z per row through the factored forward;
* one by one: N calls, each node hot (its merged weights in the LRU, built outside the
  timer): the most favourable case for serving them one by one.

Each with the template-head cache warm (the nodes have answered before, the steady state)
and turned off (``ServingConfig(prefix_cache_mb=0)``: every prompt prefilled whole).
Two more variants run both ways on a second copy of the model whose products run on
plain weights (``SVFConfig(prepack=False)``) instead of weights packed for oneDNN
(`gesal_core.prepacked`, what a CPU serves with): the same sums in another blocking
order. Variants run interleaved round by round.

Results go to ``serving_batch.json`` for the default 16 tokens on one thread; another
``--tokens`` adds ``_<T>tok`` to the name and more threads ``_<N>threads``
(``--threads 2``, the bot's own setting on a 2-core host: ``serving_batch_2threads.json``).
"""

from __future__ import annotations

import torch

from bench.common import (
    apply_threads,
    base_args,
    interleaved,
    median,
    model_meta,
    node_requests,
    report,
)
from gesal_core.engine import EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.model import load_model
from gesal_core.serving import BatchedGenerator, ServingConfig
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.worker import ModelWorker


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--sizes", default="1,8")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    tokens = 4 if args.quick else args.tokens
    sizes = [1, 2] if args.quick else [int(s) for s in args.sizes.split(",")]
    n_max = max(sizes)
    lm = load_model(args.model, progress=False)
    worker = ModelWorker()
    greedy = SamplingConfig(max_new_tokens=tokens, temperature=0)
    system = EngineConfig().system
    gens, requests = {}, []
    for name, prepack in (("", True), (", plain products", False)):
        model = lm if prepack else load_model(args.model, progress=False)
        # room for every node's merged weights: one by one runs each node hot
        svf = SVFModel(
            model.model,
            model.name,
            SVFConfig(progress=False, merged_cache_mb=400.0 * n_max, prepack=prepack),
        )
        requests = node_requests(lm.tokenizer, svf.z_size, n_max, greedy, system, keyed=True)
        for r in requests:
            svf.set_merged(torch.from_numpy(r.z), key=r.key)  # hot: in the merged LRU
        gens[f"head cache{name}"] = BatchedGenerator(svf, lm.tokenizer, worker)
        if prepack:
            gens["no head cache"] = BatchedGenerator(
                svf, lm.tokenizer, worker, ServingConfig(prefix_cache_mb=0)
            )
    head = requests[0].prompt.head
    variants = {}
    for name, gen in gens.items():
        variants[f"batched, {name}"] = lambda n, gen=gen: gen(requests[:n])
        variants[f"one by one, {name}"] = lambda n, gen=gen: [
            a for r in requests[:n] for a in gen([r])
        ]
    rows, raw = [], {}
    try:
        for n in sizes:
            answers = {name: fn(n) for name, fn in variants.items()}  # warm-up: heads cached
            ids = {name: [o.response_ids for o, _ in a] for name, a in answers.items()}
            assert len({tuple(map(tuple, v)) for v in ids.values()}) == 1, "answers differ"
            work = sum(len(x) for x in next(iter(ids.values())))
            t = interleaved(
                {name: (lambda fn=fn, n=n: fn(n)) for name, fn in variants.items()}, args.repeats
            )
            raw[n] = t
            m = {name: median(v) for name, v in t.items()}
            rows.append(
                {
                    "N": n,
                    "answer_tokens": work,
                    **{f"{name} tok/s": work / s for name, s in m.items()},
                    "batched vs one by one (head cache)": m["one by one, head cache"]
                    / m["batched, head cache"],
                    "batched vs one by one (no head cache)": m["one by one, no head cache"]
                    / m["batched, no head cache"],
                    "batched vs one by one (plain products)": m[
                        "one by one, head cache, plain products"
                    ]
                    / m["batched, head cache, plain products"],
                    "packed vs plain products, batched": m["batched, head cache, plain products"]
                    / m["batched, head cache"],
                    "packed vs plain products, one by one": m[
                        "one by one, head cache, plain products"
                    ]
                    / m["one by one, head cache"],
                    "head cache speed-up, batched": m["batched, no head cache"]
                    / m["batched, head cache"],
                    "head cache speed-up, one by one": m["one by one, no head cache"]
                    / m["one by one, head cache"],
                }
            )
    finally:
        worker.close()
    print(f"template head: {head} of the first prompt's {len(requests[0].prompt.input_ids)} ids")
    name = "serving_batch"
    if tokens != ap.get_default("tokens") and not args.quick:
        name += f"_{tokens}tok"
    threads = torch.get_num_threads()
    if threads != 1 and not args.quick:  # 2: the bot's own setting on a 2-core host
        name += f"_{threads}threads"
    report(
        name,
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "max_new_tokens": tokens,
            "head_tokens": head,
            "prompt_tokens": [len(r.prompt.input_ids) for r in requests],
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
