"""Answering through the serving path: log π recorded while generating vs scored after.

    python -m bench.serving_logprob [--repeats 3] [--tokens 16] [--sizes 1,8]

The engine keeps each answer's log π (the importance weight of a stale sample needs it).
`generate` records it from the logits of each decoding step; the alternative is to score
every answer again after generating it, one more forward pass over prompt and answer.
Both variants run the real `BatchedGenerator` on N requests, each on its own node
(per-row z through the factored forward, as concurrent channels are served), greedy,
interleaved round by round; "scored after" is the same code with the recording made to
fail, which falls back to that extra pass. The answers are the same in both, and the
JSON records how far apart the two log π are. Results go to ``serving_logprob.json`` for
the default 16 tokens, otherwise to ``serving_logprob_<T>tok.json``.
"""

from __future__ import annotations

from unittest import mock

from bench.common import (
    apply_threads,
    base_args,
    interleaved,
    median,
    model_meta,
    node_requests,
    report,
)
from gesal_core import generate as generation
from gesal_core.generate import SamplingConfig
from gesal_core.model import load_model
from gesal_core.serving import BatchedGenerator
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
    lm = load_model(args.model, progress=False)
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False, merged_cache_mb=0))
    worker = ModelWorker()
    gen = BatchedGenerator(svf, lm.tokenizer, worker)
    greedy = SamplingConfig(max_new_tokens=tokens, temperature=0)
    # anonymous adapters: never merged, so every batch runs factored
    requests = node_requests(lm.tokenizer, svf.z_size, max(sizes), greedy)

    def scored_after(batch):
        with mock.patch.object(generation._ChosenLogprobs, "finish", lambda self, new: None):
            return gen(batch)

    gen(requests[:1])  # warm-up
    rows, raw = [], {}
    try:
        for n in sizes:
            batch = requests[:n]
            a, b = gen(batch), scored_after(batch)
            assert [o.response_ids for o, _ in a] == [o.response_ids for o, _ in b]
            t = interleaved(
                {
                    "recorded": lambda batch=batch: gen(batch),
                    "scored_after": lambda batch=batch: scored_after(batch),
                },
                args.repeats,
            )
            raw[n] = t
            rec, after = median(t["recorded"]), median(t["scored_after"])
            rows.append(
                {
                    "N": n,
                    "answer_tokens": sum(len(o.response_ids) for o, _ in a),
                    "recorded_s": rec,
                    "scored_after_s": after,
                    "speedup": after / rec,
                    "max_logprob_diff": max(
                        abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)
                    ),
                }
            )
    finally:
        worker.close()
    default = ap.get_default("tokens")
    report(
        "serving_logprob" if tokens == default or args.quick else f"serving_logprob_{tokens}tok",
        rows,
        {**model_meta(lm), "repeats": args.repeats, "max_new_tokens": tokens, "times_s": raw},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
