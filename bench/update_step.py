"""Time of one learning update on k rated samples: SVF (z only) vs PEFT LoRA r=8.

    python -m bench.update_step [--repeats 3] [--sizes 1,4,16]

Both run the same REINFORCE objective with the same inner steps on the same samples:
SVF through `gesal_core.learning.reinforce_step`, LoRA through the evaluation harness's
`LoraLearner.train` (the baseline method of issue 4). Samples are real prompts with
greedy answers of ``--tokens`` tokens, votes alternating 👍/👎.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.common import PROMPTS, apply_threads, base_args, chat_ids, decode, median, report
from gesal_core.engine import EngineConfig
from gesal_core.evaluation import LoraLearner
from gesal_core.learning import LearningConfig, Sample, reinforce_step
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    learning = LearningConfig()
    pairs = []
    for i in range(max(sizes)):
        ids = chat_ids(tok, PROMPTS[i % len(PROMPTS)])
        out = decode(svf.model, ids, 8 if args.quick else args.tokens)
        pairs.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist()))
    cfg = EngineConfig(learning=learning)
    lora = LoraLearner(
        lambda: load_model(args.model, progress=False).model,
        tok,
        cfg,
        sorted({t.rsplit(".", 1)[-1] for t in svf.target_names}),
    )
    pad = tok.pad_token_id or 0
    z0 = np.ones(svf.z_size, dtype=np.float32)

    def svf_step(k):
        samples = [
            Sample(p, r, reward=1.0 if j % 2 == 0 else -2.0) for j, (p, r) in enumerate(pairs[:k])
        ]
        res = reinforce_step(svf, z0, samples, 0.0, learning, pad)
        assert res.status == "updated", res.reason

    def lora_step(k):
        for j, (p, r) in enumerate(pairs[:k]):
            lora.replies[f"h{j}"] = (p, r, "")
            lora.votes[f"h{j}"] = 1 if j % 2 == 0 else -1
        lora.baseline = 0.0
        res = asyncio.run(lora.train())
        assert res["updated"] == 1, res

    svf_step(1)
    lora_step(1)  # warm-up
    rows, raw = [], {}
    for k in sizes:
        t = {"svf": [], "lora": []}
        for _ in range(args.repeats):
            for name, fn in (("svf", svf_step), ("lora", lora_step)):
                start = time.perf_counter()
                fn(k)
                t[name].append(time.perf_counter() - start)
        raw[k] = t
        s, lo = median(t["svf"]), median(t["lora"])
        rows.append(
            {
                "k": k,
                "svf_s": s,
                "lora_s": lo,
                "svf_vs_lora": s / lo,
                "svf_le_1.5s": ("met" if s <= 1.5 else "not met") if k == 4 else "-",
            }
        )
    report(
        "update_step",
        rows,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "device": str(lm.device),
            "repeats": args.repeats,
            "inner_steps": learning.inner_steps,
            "response_tokens": len(pairs[0][1]),
            "trainable_params": {
                "svf": svf.z_size,
                "lora": sum(p.numel() for p in lora.params),
            },
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
