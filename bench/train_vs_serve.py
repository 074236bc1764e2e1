"""How long does an answer wait while the model worker trains?

    python -m bench.train_vs_serve [--repeats 3] [--samples 24]

One `ModelWorker` owns the model, as in the bot. A training update of ``--samples``
rated answers (a round of 8 votes plus 16 replayed examples is 24) starts; 0.3 s later a
chat request for a 16-token answer arrives. Timed side by side, round by round:

* stepwise (the bot): `ModelWorker.steps(reinforce_steps, ...)`, which yields after every
  forward/backward pass of ``LearningConfig.micro_batch`` samples;
* whole update: the same update as one worker job (`ModelWorker.run(reinforce_step, ...)`),
  which holds the model from its first pass to its last;
* idle: the same answer with nothing else running (the floor).

It prints the answer's latency and the update's own duration in each mode.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.common import PROMPTS, apply_threads, base_args, median, model_meta, report
from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.learning import LearningConfig, Sample, reinforce_step, reinforce_steps
from gesal_core.model import load_model
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.worker import ModelWorker

DELAY_S = 0.3


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16, help="answer tokens")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    k = 6 if args.quick else args.samples
    lm = load_model(args.model, progress=False)
    tok = lm.tokenizer
    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    learning = LearningConfig()
    pad = tok.pad_token_id or 0
    samples = []
    for i in range(k):  # real prompts, with 24-token answers from the model itself
        prompt = build_prompt(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        out = generate(svf.model, tok, [prompt], SamplingConfig(max_new_tokens=24, temperature=0))
        samples.append((prompt.input_ids, out[0].response_ids))
    z0 = np.ones(svf.z_size, dtype=np.float32)
    question = build_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    answer_cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=0)

    def batch():  # fresh Sample objects: plan_batch writes advantages into them
        return [
            Sample(p, r, reward=1.0 if j % 2 == 0 else -2.0) for j, (p, r) in enumerate(samples)
        ]

    def answer():
        generate(svf.model, tok, [question], answer_cfg)

    async def round_(mode: str) -> tuple[float, float]:
        worker = ModelWorker()
        try:
            t0 = time.perf_counter()
            if mode == "idle":
                await worker.run(answer)
                return time.perf_counter() - t0, 0.0
            if mode == "stepwise":
                job = worker.steps(reinforce_steps, svf, z0, batch(), 0.0, learning, pad)
            else:
                job = worker.run(reinforce_step, svf, z0, batch(), 0.0, learning, pad)
            training = asyncio.ensure_future(job)
            await asyncio.sleep(DELAY_S)
            asked = time.perf_counter()
            await worker.run(answer)
            waited = time.perf_counter() - asked
            result = await training
            assert result.status == "updated", result.reason
            return waited, time.perf_counter() - t0
        finally:
            worker.close()

    modes = ("stepwise", "whole update", "idle")
    asyncio.run(round_("idle"))  # warm-up
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(asyncio.run(round_(m)))
    idle = median([a for a, _ in times["idle"]])
    rows = []
    for m in modes:
        latency = median([a for a, _ in times[m]])
        rows.append(
            {
                "mode": m,
                "answer_latency_s": latency,
                "over_idle_s": latency - idle,
                "update_s": median([u for _, u in times[m]]) if m != "idle" else 0.0,
            }
        )
    report(
        "train_vs_serve",
        rows,
        {
            **model_meta(lm),
            "repeats": args.repeats,
            "samples": k,
            "micro_batch": learning.micro_batch,
            "inner_steps": learning.inner_steps,
            "answer_tokens": args.tokens,
            "answer_asked_after_s": DELAY_S,
            "times_s": times,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
