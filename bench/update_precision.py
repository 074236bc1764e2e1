"""How far an update computed with bf16 products is from the fp32 one, on the real model.

    python -m bench.update_precision [--tokens 24]

`LearningConfig.compute_dtype` lets an update run its products in bf16 (see
`gesal_core.svf.precision`); this says what that costs in precision, per kind of sample:

* votes: real prompts with greedy answers, alternately 👍 and 👎 (the update's RL term);
* corrections: the same prompts with a member's better answer (the demonstration term).

For each it prints the cosine between the bf16 and fp32 gradients of z, the share of z
components whose gradient sign agrees (a fresh Adam's first step is about lr times that
sign, so this is what the first step sees), the same share among the components with the
largest tenth of |gradient|, and the largest error of a summed log-prob in nats (what a
stale sample's importance weight sees: bf16 in the update, against fp32 when it was sampled).
"""

from __future__ import annotations

import numpy as np

from bench.common import (
    PROMPTS,
    apply_threads,
    base_args,
    chat_ids,
    cosine,
    decode,
    model_meta,
    report,
)
from gesal_core.learning import Sample, sequence_logprobs, shares_prefix
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def _gradient(svf: SVFModel, samples: list[Sample], dtype: str, pad: int):
    """d loss / dz at z = 1 and the summed log-probs, as an update computes them."""
    z = svf.trainable()
    share = shares_prefix(svf, dtype)
    with svf.compute_precision(dtype):
        logp, ntok = sequence_logprobs(svf, z, samples, pad_id=pad, share_prefix=share)
    if samples[0].demo:
        loss = -(logp / ntok.clamp_min(1)).sum()
    else:
        loss = -sum(s.reward * lp for s, lp in zip(samples, logp, strict=True))
    loss.backward()
    return z.grad.detach().cpu().numpy().copy(), logp.detach()


def compare(svf: SVFModel, samples: list[Sample], pad: int) -> dict:
    g32, lp32 = _gradient(svf, samples, "float32", pad)
    g16, lp16 = _gradient(svf, samples, "bfloat16", pad)
    same = np.sign(g32) == np.sign(g16)
    top = np.abs(g32) >= np.quantile(np.abs(g32), 0.9)
    return {
        "gradient_cosine": cosine(g32, g16),
        "gradient_relative_l2": float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32)),
        "sign_agreement": float(same.mean()),
        "sign_agreement_top_10pct": float(same[top].mean()),
        "logprob_max_abs_error_nats": float((lp16 - lp32).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=1)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    pad = tok.pad_token_id or 0
    votes, demos = [], []
    for i in range(args.samples):
        ids = chat_ids(tok, PROMPTS[i % len(PROMPTS)])
        out = decode(svf.model, ids, 8 if args.quick else args.tokens)
        prompt, answer = ids[0].tolist(), out[0, ids.shape[1] :].tolist()
        votes.append(Sample(prompt, answer, reward=1.0 if i % 2 == 0 else -2.0))
        # a member's better answer: the bot's own words with a smiley after them (the
        # emoji task's correction), as token ids of the text
        better = tok.decode(answer, skip_special_tokens=True).strip() + " 😊"
        demos.append(Sample(prompt, tok(better, add_special_tokens=False).input_ids, demo=True))
    rows = [
        {"samples": "votes", **compare(svf, votes, pad)},
        {"samples": "corrections", **compare(svf, demos, pad)},
    ]
    report(
        "update_precision",
        rows,
        {**model_meta(lm), "response_tokens": len(votes[0].response_ids), "n": args.samples},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
