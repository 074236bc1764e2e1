"""Logit error of a node's z exported as a rank-k LoRA, for k from 1 to full rank.

    python -m bench.lora_export [--ks 1,4,16,64,256,576]

The z is a *trained* one: a few REINFORCE updates on real prompts with alternating votes
(random perturbations spread over every component and would understate what low rank
keeps). Errors are measured on held-out prompts against the full SVF adapter.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import PROMPTS, apply_threads, base_args, chat_ids, decode, left_pad, report
from gesal_core.learning import LearningConfig, Sample, reinforce_step
from gesal_core.lora_export import logit_error
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=3)
    ap.add_argument("--ks", default="1,4,16,64,256,576")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    lm = load_model(args.model, progress=False)
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    pad = lm.tokenizer.pad_token_id or 0
    train = [chat_ids(lm.tokenizer, p) for p in PROMPTS[:4]]
    samples = []
    for i, ids in enumerate(train):
        out = decode(svf.model, ids, 6 if args.quick else 16)
        samples.append(
            Sample(ids[0].tolist(), out[0, ids.shape[1] :].tolist(), 1.0 if i % 2 else -2.0)
        )
    z = np.ones(svf.z_size, dtype=np.float32)
    cfg = LearningConfig(lr=1e-2)  # a few large-ish steps: a visibly adapted node
    for _ in range(1 if args.quick else args.repeats):
        res = reinforce_step(svf, z, samples, 0.0, cfg, pad)
        if res.z is not None:
            z = res.z
    held_out, mask = left_pad([chat_ids(lm.tokenizer, p) for p in PROMPTS[8:12]], pad)
    del mask  # the error is compared position by position; padding hurts both alike
    ks = [1, 16] if args.quick else [int(k) for k in args.ks.split(",")]
    rows = []
    for k in ks:
        start = time.perf_counter()
        err = logit_error(svf, torch.from_numpy(z), k, held_out)
        err["seconds"] = time.perf_counter() - start
        err["lora_params"] = sum(
            min(k, lay.rank) * (lay.in_features + lay.out_features) for lay in svf.layers.values()
        )
        rows.append(err)
    report(
        "lora_export",
        rows,
        {
            "model": lm.name,
            "dtype": str(lm.dtype),
            "repeats": args.repeats,
            "z_minus_1_norm": float(np.linalg.norm(z - 1)),
            "svf_params": svf.z_size,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
