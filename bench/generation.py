"""Generation speed: base model vs SVF (merged, factored) vs PEFT LoRA r=8.

    python -m bench.generation [--repeats 3] [--tokens 32] [--model NAME]

Batch of one, greedy, exactly ``--tokens`` new tokens after a short chat prompt. All five
variants are timed round-robin in the same run on separate copies of the same model, so
they share the machine's (noisy, shared) state; ratios are against the base model.
Where the SVF model runs its products on packed weights (a CPU: `gesal_core.prepacked`),
the base model's and the LoRA models' frozen linears do too, so the ratios compare
adapters, not matrix kernels.
"""

from __future__ import annotations

from bench.common import (
    PROMPTS,
    apply_threads,
    base_args,
    chat_ids,
    decode,
    interleaved,
    lora_model,
    median,
    node_z,
    report,
)
from gesal_core.model import load_model
from gesal_core.prepacked import prepack_linears
from gesal_core.svf import SVFConfig, SVFModel


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    tokens = 8 if args.quick else args.tokens

    def load():
        return load_model(args.model, progress=False)

    base = load()
    ids = chat_ids(base.tokenizer, PROMPTS[0])
    svf = SVFModel(load().model, base.name, SVFConfig(progress=False))
    z = node_z(svf.z_size, seed=1)
    svf.set_merged(z, key="node")
    lora = lora_model(lambda: load().model, svf.target_names)
    lora_m = lora_model(lambda: load().model, svf.target_names)
    lora_m.merge_adapter()  # W + BA folded in once, as a LoRA server does for one adapter
    if svf.prepacked:
        for model in (base.model, lora, lora_m):
            prepack_linears(model)

    def svf_factored():
        with svf.factored(z):
            decode(svf.model, ids, tokens)

    variants = {
        "base (HF generate)": lambda: decode(base.model, ids, tokens),
        "SVF merged": lambda: decode(svf.model, ids, tokens),
        "SVF factored": svf_factored,
        "LoRA r=8 unmerged": lambda: decode(lora, ids, tokens),
        "LoRA r=8 merged": lambda: decode(lora_m, ids, tokens),
    }
    for fn in variants.values():  # warm-up: first calls allocate and tune kernels
        fn()
    times = interleaved(variants, args.repeats)
    base_tps = tokens / median(times["base (HF generate)"])
    rows = []
    for name, ts in times.items():
        tps = tokens / median(ts)
        rows.append(
            {"variant": name, "median_s": median(ts), "tok_s": tps, "vs_base": tps / base_tps}
        )
    report(
        "generation",
        rows,
        {
            "model": base.name,
            "dtype": str(base.dtype),
            "device": str(base.device),
            "repeats": args.repeats,
            "new_tokens": tokens,
            "prompt_tokens": ids.shape[1],
            "batch": 1,
            "svf_merged_note": "z merged once before timing (a hot node in the LRU)",
            "times_s": times,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
