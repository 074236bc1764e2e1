"""One update with the response log-probs' fused tail vs autograd's own, side by side.

    python -m bench.logprob_tail [--repeats 5] [--sizes 4,16]

An update scores log π(y) = logit[y] − logsumexp(logits) at every response position;
the vocabulary is 49k words, so that tail works on (positions × 49k) tensors. Autograd's
graph for it allocates five of them per pass, `gesal_core.learning.target_logprobs` one
(its backward builds g · (onehot − softmax) in place). Both variants run the same
`reinforce_step` on the same samples, with `LearningConfig()` defaults (bf16 products
where "auto" picks them), interleaved round by round, on one thread and on every core.
The steps must agree: the script asserts it.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import torch

from bench.common import (
    apply_threads,
    base_args,
    greedy_pairs,
    interleaved,
    median,
    model_meta,
    report,
    with_threads,
)
from gesal_core.learning import LearningConfig, Sample, reinforce_step
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def autograd_target_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The tail written plainly: gather minus logsumexp, differentiated by autograd."""
    x = logits.float()
    return x.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=5)
    ap.add_argument("--sizes", default="4,16")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    sizes = [4] if args.quick else [int(s) for s in args.sizes.split(",")]
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    cfg = LearningConfig()
    pad = tok.pad_token_id or 0
    pairs = greedy_pairs(svf.model, tok, max(sizes), 8 if args.quick else args.tokens)
    z0 = np.ones(svf.z_size, dtype=np.float32)

    def step(k: int) -> np.ndarray:
        samples = [
            Sample(p, r, reward=1.0 if j % 2 == 0 else -2.0) for j, (p, r) in enumerate(pairs[:k])
        ]
        res = reinforce_step(svf, z0, samples, 0.0, cfg, pad)
        assert res.status == "updated", res.reason
        return res.z

    def autograd_step(k: int) -> np.ndarray:
        with mock.patch("gesal_core.learning.logprobs.target_logprobs", autograd_target_logprobs):
            return step(k)

    cores = os.cpu_count() or 1
    step(1), autograd_step(1)  # warm-up (the bf16 weight copies are made once)
    rows, raw = [], {}
    for k in sizes:
        fused, plain = step(k), autograd_step(k)
        rel = float(np.linalg.norm(fused - plain) / np.linalg.norm(plain - z0))
        assert rel < 0.05, f"the fused tail changed the step by {rel:.3f} (relative L2)"
        t = interleaved(
            {
                "fused": lambda k=k: step(k),
                "autograd": lambda k=k: autograd_step(k),
                "fused_all_cores": lambda k=k: with_threads(cores, lambda: step(k)),
                "autograd_all_cores": lambda k=k: with_threads(cores, lambda: autograd_step(k)),
            },
            args.repeats,
        )
        raw[k] = t
        m = {name: median(v) for name, v in t.items()}
        rows.append(
            {
                "k": k,
                "fused_s": m["fused"],
                "autograd_s": m["autograd"],
                "speedup": m["autograd"] / m["fused"],
                "fused_all_cores_s": m["fused_all_cores"],
                "autograd_all_cores_s": m["autograd_all_cores"],
                "speedup_all_cores": m["autograd_all_cores"] / m["fused_all_cores"],
                "step_relative_l2_difference": rel,
            }
        )
    report(
        "logprob_tail",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "cores": cores,
            "compute_dtype": cfg.compute_dtype,
            "response_tokens": len(pairs[0][1]),
            "times_s": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
