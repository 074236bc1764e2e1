"""Multi-channel throughput: N concurrent requests on N different nodes.

    python -m bench.multichannel [--repeats 2] [--tokens 16] [--sizes 1,4,8,16]

* batched: one left-padded batch, each row with its own z through the factored forward
  (what the model worker does with concurrent requests from different channels);
* one by one, merged: each request alone at the base model's speed, its node's weights
  merged *outside* the timer (the most favourable case for one-by-one: every node hot);
* one by one, factored: each request alone through the factored path (no merges);
* one by one, re-merge: merged plus the merge it needs first (serving with no batching
  and no merged-weight cache).

Every request decodes exactly ``--tokens`` tokens, so throughput is N·tokens / time.
Results go to ``multichannel.json`` for the default 16 tokens, otherwise to
``multichannel_<T>tok.json`` (short answers are dominated by the prompts' prefill, which
batching cannot speed up on a CPU; serving answers up to 128 tokens by default).
"""

from __future__ import annotations

import time

import torch

from bench.common import (
    PROMPTS,
    apply_threads,
    base_args,
    chat_ids,
    decode,
    left_pad,
    median,
    model_meta,
    node_z,
    report,
)
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--sizes", default="1,4,8,16")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    tokens = 4 if args.quick else args.tokens
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    lm = load_model(args.model, progress=False)
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False, merged_cache_mb=0))
    pad = lm.tokenizer.pad_token_id or 0
    prompts = [chat_ids(lm.tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(max(sizes))]
    zs = torch.stack([node_z(svf.z_size, 10 + i) for i in range(max(sizes))])
    decode(svf.model, prompts[0], 2)  # warm-up
    rows, raw = [], {}
    for n in sizes:
        ids, mask = left_pad(prompts[:n], pad)
        t: dict[str, list[float]] = {"batched": [], "merged": [], "factored": [], "merge": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            with svf.factored(zs[:n]):
                decode(svf.model, ids, tokens, attention_mask=mask)
            t["batched"].append(time.perf_counter() - start)
            merged = factored = merge = 0.0
            for i in range(n):
                start = time.perf_counter()
                svf.set_merged(zs[i])  # anonymous: a real merge every time
                merge += time.perf_counter() - start
                start = time.perf_counter()
                decode(svf.model, prompts[i], tokens)
                merged += time.perf_counter() - start
                start = time.perf_counter()
                with svf.factored(zs[i]):
                    decode(svf.model, prompts[i], tokens)
                factored += time.perf_counter() - start
            t["merged"].append(merged)
            t["factored"].append(factored)
            t["merge"].append(merge)
        raw[n] = t
        work = n * tokens
        b = work / median(t["batched"])
        m = work / median(t["merged"])
        f = work / median(t["factored"])
        r = work / (median(t["merged"]) + median(t["merge"]))
        rows.append(
            {
                "N": n,
                "batched_tok_s": b,
                "one_by_one_merged_tok_s": m,
                "one_by_one_factored_tok_s": f,
                "one_by_one_remerge_tok_s": r,
                "batched_vs_merged": b / m,
                "batched_vs_remerge": b / r,
            }
        )
    default = ap.get_default("tokens")
    report(
        "multichannel" if tokens == default or args.quick else f"multichannel_{tokens}tok",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "new_tokens": tokens,
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
