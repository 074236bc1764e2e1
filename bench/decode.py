"""How fast can this machine decode, and how far is HF ``generate`` from that bound?

    python -m bench.decode [--repeats 3] [--tokens 32] [--compile]

* memory bandwidth: a large tensor read (sum) and copy, in GB/s;
* the decode bound: weight bytes read per token / read bandwidth (batch 1 decoding reads
  every weight once per token, so it cannot beat this);
* eager HF ``generate`` on the weights as HF stores them (the baseline), HF with a static
  KV cache, a minimal greedy loop (forward + argmax, no logits processors: what is left is
  the model itself), and with ``--compile`` the static cache under ``torch.compile``;
* eager ``generate`` and the greedy loop again on the same weights stored input-major, as
  `gesal_core.model.load_model` stores them on a CPU (`gesal_core.layout`).
"""

from __future__ import annotations

import os
import time

import torch

from bench.common import (
    PROMPTS,
    apply_threads,
    base_args,
    chat_ids,
    decode,
    interleaved,
    median,
    model_meta,
    report,
    timed,
    with_threads,
)
from gesal_core.generate import cache_kwargs, cache_of
from gesal_core.layout import set_weight_layout
from gesal_core.model import load_model


def bandwidth_gbs(mb: int, repeats: int) -> dict[str, float]:
    """Best-of-repeats read and copy bandwidth of a ``mb``-MiB float32 tensor."""
    src = torch.rand(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    read = min(timed(lambda: src.sum(), repeats + 2))
    copy = min(timed(lambda: dst.copy_(src), repeats + 2))
    return {"read": nbytes / read / 1e9, "copy": 2 * nbytes / copy / 1e9}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads (the input embedding: one row only)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == emb.data_ptr()
    emb_bytes = emb.numel() * emb.element_size()
    return total - (0 if tied else emb_bytes)


@torch.inference_mode()
def greedy_loop(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The least a decoder can do per token: one forward with the KV cache, one argmax."""
    out = model(input_ids=ids, use_cache=True)
    past, nxt = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, past))
        past, nxt = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return nxt


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    ap.add_argument("--bandwidth-mb", type=int, default=512)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    tokens = 8 if args.quick else args.tokens
    lm = load_model(args.model, progress=False)
    ours, ids = lm.model, chat_ids(lm.tokenizer, PROMPTS[0])
    model = load_model(args.model, progress=False).model
    set_weight_layout(model, on=False)  # the baseline: weights as HF stores them
    mb = 64 if args.quick else args.bandwidth_mb
    bw = bandwidth_gbs(mb, args.repeats)
    per_token = weight_bytes_per_token(model)
    variants = {
        "HF generate, eager (baseline)": lambda: decode(model, ids, tokens),
        "HF generate, static KV cache": lambda: decode(
            model, ids, tokens, cache_implementation="static"
        ),
        "minimal greedy loop": lambda: greedy_loop(model, ids, tokens),
        "HF generate, eager, input-major weights": lambda: decode(ours, ids, tokens),
        "minimal greedy loop, input-major weights": lambda: greedy_loop(ours, ids, tokens),
    }
    eager = variants["HF generate, eager (baseline)"]
    many = f"HF generate, eager, {os.cpu_count()} threads"
    compile_s = None
    if args.compile:
        model_c = load_model(args.model, progress=False).model
        set_weight_layout(model_c, on=False)
        model_c.forward = torch.compile(model_c.forward)
        start = time.perf_counter()
        decode(model_c, ids, tokens, cache_implementation="static")  # compiles
        compile_s = time.perf_counter() - start
        variants["HF generate, static cache + torch.compile"] = lambda: decode(
            model_c, ids, tokens, cache_implementation="static"
        )
    for fn in variants.values():
        fn()
    times = interleaved(variants, args.repeats)
    # more threads, timed after the others against its own eager runs: switching the
    # thread pool back and forth slowed the variants that followed it in a round
    cores = os.cpu_count() or 1
    many_ours = f"HF generate, eager, input-major weights, {cores} threads"
    pair = interleaved(
        {
            "eager": eager,
            many: lambda: with_threads(cores, lambda: decode(model, ids, tokens)),
            many_ours: lambda: with_threads(cores, lambda: decode(ours, ids, tokens)),
        },
        args.repeats,
    )
    base = tokens / median(times["HF generate, eager (baseline)"])
    bound = bw["read"] * 1e9 / per_token
    rows = []
    for name, ts in times.items():
        tps = tokens / median(ts)
        rows.append(
            {
                "variant": name,
                "median_s": median(ts),
                "tok_s": tps,
                "vs_eager": tps / base,
                "of_bound": tps / bound,
            }
        )
    for name in (many, many_ours):
        rows.append(
            {
                "variant": name + " (own pairing)",
                "median_s": median(pair[name]),
                "tok_s": tokens / median(pair[name]),
                "vs_eager": median(pair["eager"]) / median(pair[name]),
                "of_bound": tokens / median(pair[name]) / bound,
            }
        )
    # several threads can read more than one: their own bound, in the same units
    bw_all = with_threads(cores, lambda: bandwidth_gbs(mb, args.repeats))
    for label, gbs in (("", bw), (f", {cores} threads", bw_all)):
        tps = gbs["read"] * 1e9 / per_token
        rows.append(
            {
                "variant": f"bandwidth bound (weights / read GB/s{label})",
                "median_s": tokens / tps,
                "tok_s": tps,
                "vs_eager": tps / base,
                "of_bound": tps / bound,
            }
        )
    print(
        f"read bandwidth {bw['read']:.1f} GB/s ({cores} threads: {bw_all['read']:.1f}), "
        f"copy {bw['copy']:.1f} GB/s; {per_token / 1e6:.0f} MB of weights per token"
    )
    report(
        "decode",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "new_tokens": tokens,
            "prompt_tokens": ids.shape[1],
            "bandwidth_gbs": bw,
            "bandwidth_gbs_all_threads": bw_all,
            "weight_bytes_per_token": per_token,
            "compile_seconds": compile_s,
            "times_s": {**times, "threads pairing": pair},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
