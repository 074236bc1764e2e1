"""Slow: the real bundled model learns a preference from its community.

"Start with 'Sure!'" is a preference SmolLM2-135M never shows, so votes find no answer to
👍 and members teach it by correction. With the shipped
learning defaults, three rounds of four corrections must move the node measurably
towards the preference on held-out questions it was never corrected on, and an unrelated
fact must survive (the model still gives "Paris" where the base model's answer states
it; the greedy wording may change, see gesal_core/guard.py). The collapse guard may roll
a round back: a rolled-back round changes nothing, so the curve never goes down.
"""

import asyncio

import pytest
import torch

from gesal_core.correction_curve import CHANNEL, correction_curve
from gesal_core.engine import Engine
from gesal_core.evaluation import HELDOUT_QUESTIONS, QUESTIONS
from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.guard import GuardConfig, fact_probes

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
        france = "What is the capital of France?"
        guard = engine.guard
        facts = fact_probes([france], guard.base([france]).answers)
        base_lp = guard.fact_logprobs(None, facts)
        node_lp = guard.fact_logprobs(torch.from_numpy(node.z), facts)
        prompt = build_prompt(engine.tokenizer, [{"role": "user", "content": france}])
        with torch.inference_mode(), engine.svf.factored(torch.from_numpy(node.z)):
            answer = generate(
                engine.svf.model,
                engine.tokenizer,
                [prompt],
                SamplingConfig(max_new_tokens=32, temperature=0),
            )[0].text
    finally:
        engine.close()
    lps = [p.opener_logprob for p in points]
    print(
        "log p('Sure!') by round:",
        [round(x, 2) for x in lps],
        "| log p(Paris) base",
        [round(x, 2) for x in base_lp],
        "node",
        [round(x, 2) for x in node_lp],
        "| France ->",
        answer,
    )
    statuses = [p.status for p in points[1:]]
    assert "updated" in statuses and set(statuses) <= {"updated", "rolled_back"}, statuses
    assert all(b >= a - 1e-4 for a, b in zip(lps, lps[1:], strict=False))
    assert lps[-1] - lps[0] >= 0.2  # nats, on held-out questions never corrected
    assert node.version == statuses.count("updated")
    # no forgetting of an unrelated fact: the node still says Paris where the base does
    assert facts and facts[0].fact == "Paris"
    assert node_lp[0] > base_lp[0] - GuardConfig().max_fact_drop
