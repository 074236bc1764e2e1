"""How many corrections does a preference the model never shows need?

Votes can only reinforce what the bot already says: a community that wants answers to
start with "Sure" gets no 👍 to give while the model never does it. Corrections
(`Engine.correct`) are the way in. This measures their effect directly, round by round, on one node:

    repeat: answer `per_round` training prompts -> 👎 each and correct it with the
            preferred answer -> train
    after each round: log π("<opener>" | held-out question) under the node's z, and the
            share of greedy held-out answers that already comply

The log-probability moves long before greedy answers flip, so it shows the *rate* of
learning where compliance alone would read 0% for a while. Used by
``python -m bench.corrections`` and by the slow real-model test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .engine import Engine
from .generate import SamplingConfig, build_prompt, generate
from .learning import Sample, sequence_logprobs

CHANNEL = "corrections-curve"


@dataclass
class CurvePoint:
    round: int
    corrections: int
    opener_logprob: float  # mean over held-out prompts, nats
    greedy_compliance: float
    status: str  # the round's training outcome ("base" before any)
    seconds: float
    sample: str  # one held-out greedy answer


async def correction_curve(
    engine: Engine,
    train: list[str],
    heldout: list[str],
    opener: str = "Sure!",
    rounds: int = 3,
    per_round: int = 4,
    max_new_tokens: int = 24,
) -> list[CurvePoint]:
    """Run the loop above on a fresh channel of ``engine`` (all prompts in one node)."""
    await engine.reset(CHANNEL)
    await engine.configure(CHANNEL, threshold=-1.0)  # one node: the per-node rate
    tok, svf, system = engine.tokenizer, engine.svf, engine.config.system
    prompts = [build_prompt(tok, [{"role": "user", "content": q}], system) for q in heldout]
    opener_ids = tok(opener, add_special_tokens=False)["input_ids"]

    def measure(z: np.ndarray) -> tuple[float, float, str]:
        zt = torch.from_numpy(np.asarray(z, dtype=np.float32))
        with torch.inference_mode():
            lp, _ = sequence_logprobs(svf, zt, [Sample(p.input_ids, opener_ids) for p in prompts])
            with svf.factored(zt):
                outs = generate(
                    svf.model, tok, prompts, SamplingConfig(max_new_tokens, temperature=0)
                )
        word = opener.rstrip("!.,").lower()
        ok = [o.text.strip().lower().startswith(word) for o in outs]
        return float(lp.mean()), float(np.mean(ok)), outs[0].text

    ones = np.ones(svf.z_size, dtype=np.float32)
    lp, comp, text = await engine.worker.run(measure, ones)
    points = [CurvePoint(0, 0, lp, comp, "base", 0.0, text)]
    k = 0
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        for _ in range(per_round):
            q = train[k % len(train)]
            k += 1
            reply = await engine.respond(CHANNEL, [{"role": "user", "content": q}])
            await engine.vote(CHANNEL, reply.reply_id, "member", -1)
            await engine.correct(CHANNEL, reply.reply_id, "member", f"{opener} {reply.text}")
        report = await engine.train(CHANNEL, force=True)  # a point per round, full or not
        statuses = [n.status for n in report.channels.get(CHANNEL, [])]
        node = (await engine.nodes(CHANNEL))[0]
        lp, comp, text = await engine.worker.run(measure, node.z)
        points.append(
            CurvePoint(
                r,
                k,
                lp,
                comp,
                ",".join(statuses) or "nothing",
                time.perf_counter() - start,
                text,
            )
        )
    return points
