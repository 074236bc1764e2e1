"""Slow: the real bundled model learns a preference from its community (issue 3).

"Start with 'Sure!'" is a preference SmolLM2-135M never shows (0% after 128 votes in
prototypes: no 👍 ever came), so members teach it by correction. With the shipped
learning defaults, three rounds of four corrections must move the node measurably
towards the preference on held-out questions it was never corrected on, and an unrelated
fact must survive. The collapse guard may roll a round back (`python -m bench.corrections`
printed one rollback in six rounds, on round 1): a rolled-back round changes nothing, so
the curve never goes down.
"""

import asyncio

import pytest
import torch

from gesal_core.correction_curve import CHANNEL, correction_curve
from gesal_core.engine import Engine
from gesal_core.evaluation import HELDOUT_QUESTIONS, QUESTIONS
from gesal_core.generate import SamplingConfig, build_prompt, generate

pytestmark = pytest.mark.slow


def test_corrections_teach_the_real_model_an_opener_it_never_uses():
    torch.manual_seed(0)  # the sampled answers that members correct
    engine = Engine.load()

    async def go():
        points = await correction_curve(
            engine, QUESTIONS, HELDOUT_QUESTIONS[:4], "Sure!", rounds=3, per_round=4
        )
        node = (await engine.store.load_nodes(CHANNEL))[0]
        return points, node

    try:
        points, node = asyncio.run(go())
        prompt = build_prompt(
            engine.tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
        )
        with torch.inference_mode(), engine.svf.factored(torch.from_numpy(node.z)):
            fact = generate(
                engine.svf.model,
                engine.tokenizer,
                [prompt],
                SamplingConfig(max_new_tokens=32, temperature=0),
            )[0].text
    finally:
        engine.close()
    lps = [p.opener_logprob for p in points]
    print("log p('Sure!') by round:", [round(x, 2) for x in lps], "| France ->", fact)
    statuses = [p.status for p in points[1:]]
    assert "updated" in statuses and set(statuses) <= {"updated", "rolled_back"}, statuses
    assert all(b >= a - 1e-4 for a, b in zip(lps, lps[1:], strict=False))
    assert lps[-1] - lps[0] >= 0.2  # nats, on held-out questions never corrected
    assert node.version == statuses.count("updated")
    assert "Paris" in fact  # no forgetting of an unrelated fact
