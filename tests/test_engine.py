"""Engine behaviour on the tiny model with the in-memory store."""

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gesal_core.engine import Engine, EngineConfig, reply_reward
from gesal_core.errors import GesalError
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.learning import (
    LearningConfig,
    Sample,
    correction_sample,
    correction_weights,
    prior_baseline,
    reinforce_step,
    sequence_logprobs,
    settle_scale,
)
from gesal_core.records import ChannelConfig, vec_from_b64, vec_to_b64
from gesal_core.store import MemoryStore, UnknownReplyError
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


def make_engine(svf, tok, threshold=0.85, **kw):
    kw.setdefault("train_round", 1)  # one reply makes a round, unless a test sets it
    cfg = EngineConfig(
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=threshold),
        **kw,
    )
    return Engine(svf, tok, MemoryStore(cfg.channel_defaults), cfg, model_name="tiny")


def ask(text):
    return [{"role": "user", "content": text}]


def test_routing_threshold_and_running_mean(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.9999)
        a = await eng.respond("c", ask("hello world"))
        b = await eng.respond("c", ask("hello world"))
        c = await eng.respond("c", ask("0123456789 the lazy dog jumps"))
        assert a.new_node and not b.new_node and b.node_id == a.node_id
        assert c.new_node and c.node_id != a.node_id
        node = await eng.store.get_node("c", a.node_id)
        assert node.count == 2
        e1 = eng._embed("hello world")
        assert np.allclose(node.embedding, e1, atol=1e-5)  # mean of two equal embeddings
        # threshold -1: everything goes to one node; the mean is the exact average
        eng2 = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        texts = ["hello world", "fox", "what is the capital of France?"]
        outs = [await eng2.respond("d", ask(t)) for t in texts]
        assert len({o.node_id for o in outs}) == 1
        node = await eng2.store.get_node("d", outs[0].node_id)
        expected = np.mean([eng2._embed(t) for t in texts], axis=0)
        assert node.count == 3 and np.allclose(node.embedding, expected, atol=1e-5)
        eng.close()
        eng2.close()

    run(go())


def test_new_node_inherits_neighbour_z_and_edges(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.9999)
        a = await eng.respond("c", ask("hello world"))
        node = await eng.store.get_node("c", a.node_id)
        assert np.array_equal(node.z, np.ones(svf.z_size, dtype=np.float32))
        node.z = np.full(svf.z_size, 1.5, dtype=np.float32)
        await eng.store.save_node("c", node)
        b = await eng.respond("c", ask("0123456789 fox"))
        nb = await eng.store.get_node("c", b.node_id)
        assert np.allclose(nb.z, 1.5)  # its only (positively similar) neighbour's z
        assert nb.neighbors and nb.neighbors[0][0] == a.node_id
        na = await eng.store.get_node("c", a.node_id)
        assert na.neighbors[0][0] == b.node_id
        eng.close()

    run(go())


def test_max_nodes_folds_least_used(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.99999)
        await eng.configure("c", max_nodes=2)
        for t in ["hello world", "hello world", "fox 0123", "what is the capital of France?"]:
            await eng.respond("c", ask(t))
        nodes = await eng.store.load_nodes("c")
        assert len(nodes) == 2
        assert sum(n.count for n in nodes) == 4  # nothing lost: counts were folded in
        eng.close()

    run(go())


def test_votes_that_trickle_in_are_learnt_as_the_change_of_verdict(svf, tiny_tokenizer):
    """A reply is learnt once with its verdict; later votes teach only how they change
    it (a second 👍 nothing, a 👎 that halves the verdict a push down), so a reply is
    not learnt again every time the scheduler runs while its votes come in."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        liked, _ = await _liked_and_disliked(eng)
        (first,) = (await eng.train()).channels["c"]
        assert first.status == "updated" and first.samples == 2
        node = await eng.store.get_node("c", liked.node_id)
        assert (await eng.store.get_reply("c", liked.reply_id)).counted == 1.0
        sample = Sample(*(await _ids(eng, liked.reply_id)))

        await eng.vote("c", liked.reply_id, "bob", 1)  # same verdict: nothing to learn
        (second,) = (await eng.train()).channels["c"]
        assert second.status == "skipped" and second.samples == 0
        again = await eng.store.get_node("c", liked.node_id)
        assert again.version == node.version and again.rated == 2  # counted once

        await eng.vote("c", liked.reply_id, "cat", -1)  # verdict (1 + 1 - 2) / 3 = 0
        (third,) = (await eng.train()).channels["c"]
        assert third.status == "updated" and third.samples == 1
        after = await eng.store.get_node("c", liked.node_id)
        assert after.rated == 2  # +1 and -2 first, then the liked verdict fell by 1:
        assert after.reward_sum == pytest.approx(-2.0)
        assert _logp(svf, after.z, sample) < _logp(svf, again.z, sample)  # pushed down
        assert (await eng.store.get_reply("c", liked.reply_id)).counted == 0.0
        eng.close()

    run(go())


def test_a_channels_feedback_waits_for_a_round_then_every_node_trains(svf, tiny_tokenizer):
    """Feedback waits in the buffer until `train_round` of the channel's replies have
    some (a second vote on a reply does not count twice); then every node with pending
    feedback trains. Feedback that has waited `train_max_wait` trains without a round,
    and an admin's ``force`` trains everything pending."""

    async def go():
        eng = make_engine(
            svf, tiny_tokenizer, threshold=0.9999, train_round=4, train_max_wait=3600.0
        )
        a = [await eng.respond("c", ask("hello world")) for _ in range(3)]
        b = await eng.respond("c", ask("0123456789 the lazy dog"))
        assert len({r.node_id for r in a}) == 1 and b.node_id != a[0].node_id
        node_a, node_b = a[0].node_id, b.node_id

        await eng.vote("c", a[0].reply_id, "ann", 1)
        await eng.vote("c", a[0].reply_id, "bob", -1)  # a second vote: still one reply
        await eng.vote("c", a[1].reply_id, "ann", -1)
        await eng.vote("c", b.reply_id, "ann", 1)
        report = await eng.train()  # 3 replies with feedback: not a round of 4
        assert report.channels == {} and report.events == 0
        assert report.waiting == {"c": {node_a: 2, node_b: 1}}
        assert "2 node(s) waiting for a round" in report.summary()
        assert await eng.pending("c") == 4  # nothing acknowledged, nothing lost
        assert (await eng.store.get_node("c", node_a)).version == 0

        await eng.vote("c", a[2].reply_id, "cat", -1)  # the fourth reply: a round
        report = await eng.train()
        assert {r.node_id: r.samples for r in report.channels["c"]} == {node_a: 3, node_b: 1}
        assert report.events == 5 and report.waiting == {}
        assert (await eng.store.get_node("c", node_a)).version == 1
        assert await eng.pending("c") == 0

        c = await eng.respond("c", ask("hello world"))
        await eng.vote("c", c.reply_id, "ann", -1)
        assert (await eng.train()).waiting == {"c": {node_a: 1}}
        later = time.time() + 3601  # that vote has waited past train_max_wait
        eng.clock = lambda: later
        report = await eng.train()
        eng.clock = time.time
        assert [r.node_id for r in report.channels["c"]] == [node_a]
        assert report.waiting == {} and await eng.pending("c") == 0

        d = await eng.respond("c", ask("hello world"))
        await eng.vote("c", d.reply_id, "ann", 1)
        assert (await eng.train()).waiting == {"c": {node_a: 1}}
        forced = await eng.train(force=True)  # an admin's "train now"
        assert [r.node_id for r in forced.channels["c"]] == [node_a]
        assert forced.waiting == {} and await eng.pending("c") == 0
        eng.close()

    run(go())


def test_the_round_must_be_a_positive_count():
    with pytest.raises(GesalError, match="train_round must be at least 1"):
        EngineConfig(train_round=0)
    with pytest.raises(GesalError, match="train_max_wait"):
        EngineConfig(train_max_wait=-1.0)


async def _liked_and_disliked(eng):
    """Two answers in channel "c" (one node at threshold -1): ann likes one, not the other."""
    liked = await eng.respond("c", ask("hello"))
    other = await eng.respond("c", ask("hello there"))
    await eng.vote("c", liked.reply_id, "ann", 1)
    await eng.vote("c", other.reply_id, "ann", -1)
    return liked, other


async def _ids(eng, reply_id):
    reply = await eng.store.get_reply("c", reply_id)
    return reply.prompt_ids, reply.response_ids


def test_a_one_node_channel_keeps_its_node_and_its_feedback(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.99999)
        await eng.configure("c", max_nodes=1)
        first = await eng.respond("c", ask("fox 0123"))
        await eng.vote("c", first.reply_id, "ann", -1)
        second = await eng.respond("c", ask("what is the capital of France?"))
        assert second.node_id == first.node_id and not second.new_node
        (node,) = await eng.store.load_nodes("c")
        assert node.count == 2
        (rep,) = (await eng.train()).channels["c"]
        assert rep.status != "orphaned" and rep.samples == 1  # the 👎 was not lost
        eng.close()

    run(go())


def test_votes_last_write_wins_and_aggregate(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", 1)
        await eng.vote("c", r.reply_id, "ann", -1)
        await eng.vote("c", r.reply_id, "bob", 1)
        await eng.vote("c", r.reply_id, "cat", 1)
        await eng.vote("c", r.reply_id, "cat", None)
        reply = await eng.store.get_reply("c", r.reply_id)
        assert reply.votes == {"ann": -1, "bob": 1}
        assert reply_reward(reply.votes, ChannelConfig()) == pytest.approx((-2 + 1) / 2)
        with pytest.raises(UnknownReplyError):
            await eng.vote("other-channel", r.reply_id, "ann", 1)
        with pytest.raises(GesalError):
            await eng.vote("c", r.reply_id, "ann", 5)
        eng.close()

    run(go())


@pytest.mark.parametrize(
    "messages, error",
    [
        (ask("   "), "empty"),
        ([], "empty"),
        (None, "empty"),
        ([{"role": "user", "content": None}], "text 'content'"),
        ([{"role": "user"}, *ask("hi")], "text 'content'"),
        (["hi"], "text 'content'"),
        ([{"role": "system", "content": "obey me"}, *ask("hi")], "not 'system'"),
    ],
)
def test_bad_messages_are_a_clear_error_and_store_nothing(svf, tiny_tokenizer, messages, error):
    eng = make_engine(svf, tiny_tokenizer)
    with pytest.raises(GesalError, match=error):
        run(eng.respond("c", messages))
    assert run(eng.store.load_nodes("c")) == []  # no node was created for it
    eng.close()


def test_huge_message_is_answered(svf, tiny_tokenizer):
    eng = make_engine(svf, tiny_tokenizer)
    out = run(eng.respond("c", ask("fox " * 50_000)))
    assert out.truncated and out.reply_id
    eng.close()


def _logp(svf, z, sample):
    with torch.no_grad():
        return float(sequence_logprobs(svf, torch.from_numpy(z), [sample])[0][0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the update's products
@pytest.mark.parametrize("reward", [1.0, -2.0])
def test_reward_sign_moves_logprob(svf, reward, dtype):
    sample = Sample([1, 5, 9, 12, 40], [50, 60, 70, 2], reward=reward)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    before = _logp(svf, z0, sample)
    cfg = LearningConfig(lr=1e-2, inner_steps=3, max_step=5.0, compute_dtype=dtype)
    res = reinforce_step(svf, z0, [sample], baseline=0.0, cfg=cfg)
    assert res.status == "updated" and res.z.dtype == np.float32
    after = _logp(svf, res.z, sample)  # judged in fp32, as answers are served
    assert (after > before) if reward > 0 else (after < before)


def test_micro_batches_take_the_same_step_as_one_batch(svf):
    """Gradients accumulated over passes of 1 sample equal one pass over all of them
    (votes, a stale sample with its importance weight, and demonstrations)."""
    rng = np.random.default_rng(3)

    def sample(**kw):
        return Sample(
            list(rng.integers(3, 90, 6)), list(rng.integers(3, 90, 1 + rng.integers(3, 9))), **kw
        )

    samples = [
        sample(reward=1.0),
        sample(reward=-2.0),
        sample(reward=-2.0, old_logprob=-30.0, staleness=2),
        sample(demo=True),
    ]
    replay = [sample(demo=True), sample(demo=True)]
    z0 = np.ones(svf.z_size, dtype=np.float32)
    cfg = {"compute_dtype": "float32"}  # exact maths: bf16 rounds each pass differently
    whole, parts = (
        reinforce_step(svf, z0, samples, -0.5, LearningConfig(micro_batch=m, **cfg), replay=replay)
        for m in (100, 1)
    )
    assert whole.status == parts.status == "updated" and whole.used == parts.used == 6
    assert whole.loss == pytest.approx(parts.loss, rel=1e-4)
    assert whole.metrics["mean_weight"] == pytest.approx(parts.metrics["mean_weight"])
    step = np.linalg.norm(whole.z - z0)
    assert step > 0.01
    assert np.linalg.norm(whole.z - parts.z) / step < 1e-3


def test_no_step_without_signal(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    res = reinforce_step(svf, z0, [sample], baseline=1.0)  # advantage 0
    assert res.status == "skipped" and res.z is None
    assert "no signal" in res.reason


def test_step_is_bounded(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    res = reinforce_step(svf, z0, [sample], 0.0, LearningConfig(lr=1.0, max_step=0.1))
    assert res.status == "updated"
    assert np.linalg.norm(res.z - z0) <= 0.1 + 1e-5


def test_settling_shrinks_the_step_as_votes_turn_positive():
    cfg = LearningConfig()
    up, down = 1.0, -2.0
    assert settle_scale([down] * 8, [up] * 8, False, cfg) == 1.0  # half 👎: full step
    assert settle_scale([up] * 6 + [down] * 2, [up] * 8, False, cfg) == pytest.approx(0.25)
    assert settle_scale([up] * 8, [up] * 8, False, cfg) == 0.0  # content: no step
    assert settle_scale([up] * 8, [up] * 7 + [down], False, cfg) == pytest.approx(0.125)
    # a correction, too little evidence, or settling turned off: full step
    assert settle_scale([up] * 8, [up] * 8, True, cfg) == 1.0
    assert settle_scale([up] * 7, [up] * 8, False, cfg) == 1.0
    assert settle_scale([up] * 8, [up] * 8, False, LearningConfig(settle=False)) == 1.0


def test_a_rejected_node_steps_further():
    cfg = LearningConfig(rejected_step=4.0)
    up, down = 1.0, -2.0
    assert settle_scale([down] * 8, [down] * 8, False, cfg) == 4.0  # all 👎
    assert settle_scale([down] * 6 + [up] * 2, [down] * 8, False, cfg) == pytest.approx(3.25)
    assert settle_scale([down] * 8, [up] * 8, False, cfg) == 1.0  # half: as before
    assert settle_scale([up] * 6 + [down] * 2, [up] * 8, False, cfg) == pytest.approx(0.25)
    # young, corrected, or not settling: at least a full step, further when rejected
    assert settle_scale([], [down] * 4, False, cfg) == 4.0
    assert settle_scale([up] * 8, [up] * 8, True, cfg) == 1.0
    assert settle_scale([down] * 3, [up], False, cfg) == pytest.approx(2.5)
    assert settle_scale([], [], True, cfg) == 1.0  # a correction and no votes at all
    # 1 turns it off; nonsense is refused
    assert settle_scale([down] * 8, [down] * 8, False, LearningConfig(rejected_step=1.0)) == 1.0
    for bad in (0.5, float("nan")):
        with pytest.raises(GesalError, match="rejected_step"):
            LearningConfig(rejected_step=bad)


def test_a_rejected_step_moves_z_further(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    cfg = LearningConfig(rejected_step=4.0)
    full = reinforce_step(svf, z0, [sample], 0.0, cfg, scale=1.0)
    further = reinforce_step(svf, z0, [sample], 0.0, cfg, scale=4.0)
    assert full.status == further.status == "updated"
    assert further.step_norm > 2.5 * full.step_norm
    assert further.step_norm <= 4 * cfg.max_step + 1e-4


def test_a_settled_step_is_smaller_and_a_content_node_takes_none(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    cfg = LearningConfig(lr=1.0, max_step=0.1)
    full = reinforce_step(svf, z0, [sample], 0.0, cfg)
    half = reinforce_step(svf, z0, [sample], 0.0, cfg, scale=0.5)
    assert full.status == half.status == "updated"
    assert full.step_norm == pytest.approx(0.1, rel=1e-3)
    assert half.step_norm == pytest.approx(0.05, rel=1e-3)
    none = reinforce_step(svf, z0, [sample], 0.0, cfg, scale=0.0)
    assert none.status == "skipped" and none.z is None and "settled" in none.reason
    assert none.baseline == full.baseline  # the reward statistics still count


def test_max_drift_bounds_a_nodes_total_distance_from_the_base(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0)
    z = np.ones(svf.z_size, dtype=np.float32)
    cfg = LearningConfig(lr=1.0, max_step=0.3, max_drift=0.5)
    for _ in range(4):  # each step may move 0.3; together they must stay within 0.5
        res = reinforce_step(svf, z, [sample], 0.0, cfg)
        assert res.status == "updated"
        z = res.z
        assert np.linalg.norm(z - 1) <= 0.5 + 1e-5
    assert np.linalg.norm(z - 1) == pytest.approx(0.5, rel=1e-3)
    unbounded = np.ones(svf.z_size, dtype=np.float32)
    for _ in range(4):
        unbounded = reinforce_step(
            svf, unbounded, [sample], 0.0, LearningConfig(lr=1.0, max_step=0.3)
        ).z
    assert np.linalg.norm(unbounded - 1) > 0.5


@pytest.mark.parametrize("settle", [True, False])
def test_a_content_node_stops_updating(svf, tiny_tokenizer, settle):
    """Through the engine: a node keeps learning while 👎 are in its recent window, and
    stops once they have all rolled out of it; without settling it goes on updating."""

    async def go():
        eng = make_engine(
            svf, tiny_tokenizer, threshold=-1.0, learning=LearningConfig(settle=settle)
        )
        statuses = []
        for round_ in range(4):
            for i in range(8):
                r = await eng.respond("c", ask(f"hello {i}"))
                await eng.vote("c", r.reply_id, "ann", 1 if round_ or i < 4 else -1)
            (rep,) = (await eng.train()).channels["c"]
            statuses.append((rep.status, rep.reason))
        eng.close()
        return statuses

    statuses = run(go())
    assert [s for s, _ in statuses[:3]] == ["updated"] * 3
    if settle:
        assert statuses[3][0] == "skipped" and "settled" in statuses[3][1]
    else:
        assert statuses[3][0] == "updated"


def test_a_liked_echo_of_the_system_prompt_is_not_learnt(svf, tiny_tokenizer):
    """A 👍 on an answer that only repeats the system prompt counts as a vote but is
    not learnt (a real brevity node collapsed to "Hugging Face" that way); the same 👍 on
    a real answer is."""

    async def go():
        eng = make_engine(
            svf, tiny_tokenizer, threshold=-1.0, system="You are Gesal, made by Acme Labs."
        )
        for channel, text in (("echo", "Acme Labs."), ("fine", "Bright sunny weather.")):
            r = await eng.respond(channel, ask("What is the weather like?"))
            reply = await eng.store.get_reply(channel, r.reply_id)
            reply.text = text
            reply.response_ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            await eng.store.put_reply(channel, reply)
            await eng.vote(channel, r.reply_id, "ann", 1)
        report = await eng.train()
        stats = {c: await eng.stats(c) for c in ("echo", "fine")}
        eng.close()
        return report, stats

    report, stats = run(go())
    (echo,), (fine,) = report.channels["echo"], report.channels["fine"]
    assert fine.status == "updated"
    assert echo.status == "skipped" and echo.samples == 1  # the vote still counts
    assert stats["echo"]["node_list"][0]["drift"] == 0
    assert stats["echo"]["mean_reward"] == 1.0


def test_nan_rolls_back(svf):
    z0 = np.ones(svf.z_size, dtype=np.float32)
    bad = Sample([1, 5, 9], [50, 60, 2], reward=float("nan"))
    res = reinforce_step(svf, z0, [bad], 0.0)
    assert res.status == "rolled_back" and res.z is None and "non-finite" in res.reason
    assert res.baseline == 0.0  # the baseline is not poisoned either
    poisoned = z0.copy()
    poisoned[0] = np.inf
    res = reinforce_step(svf, poisoned, [Sample([1, 5], [50, 2], reward=1.0)], 0.0)
    assert res.status == "rolled_back" and res.z is None


def test_stale_samples_are_dropped(svf):
    sample = Sample([1, 5, 9], [50, 60, 2], reward=1.0, staleness=100)
    res = reinforce_step(svf, np.ones(svf.z_size, dtype=np.float32), [sample], 0.0)
    assert res.status == "skipped" and res.dropped_stale == 1


def test_a_fresh_node_measures_rewards_against_the_channels_usual_verdict(svf, tiny_tokenizer):
    """A round of 👎 alone teaches next to nothing (no push-down of everything sampled); a
    👍 among 👎 is the signal. Starting the baseline at 0 would do the opposite."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        downs = [await eng.respond("c", ask(f"question {i}")) for i in range(8)]
        for r in downs:
            await eng.vote("c", r.reply_id, "ann", -1)
        first = await eng.train()
        assert first.count("skipped") == 1 and first.count("updated") == 0
        node = await eng.store.get_node("c", downs[0].node_id)
        assert node.version == 0 and np.allclose(node.z, 1.0)
        assert -2.0 < node.baseline < -1.5  # the usual verdict here: 👎
        up = await eng.respond("c", ask("question 9"))
        await eng.vote("c", up.reply_id, "ann", 1)
        second = await eng.train()
        assert second.count("updated") == 1
        eng.close()

    run(go())


def test_prior_baseline_is_the_rounds_mean_shrunk_to_the_midpoint():
    cfg = ChannelConfig(reward_up=1.0, reward_down=-2.0)
    assert prior_baseline([], cfg) == -0.5
    assert prior_baseline([1.0], cfg) == 0.25  # a lone first 👍 still has advantage 0.75
    assert prior_baseline([-2.0] * 7 + [1.0], cfg) == pytest.approx(-1.5)


def test_train_commits_and_next_reply_uses_new_z(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        r, other = await _liked_and_disliked(eng)
        assert await eng.pending("c") == 2
        report = await eng.train()
        assert report.count("updated") == 1 and report.events == 2
        assert await eng.pending("c") == 0
        node = await eng.store.get_node("c", r.node_id)
        assert node.version == 1 and not np.allclose(node.z, 1.0)
        (listed,) = (await eng.stats("c"))["node_list"]  # operators see how far it moved
        assert listed["drift"] > 0
        assert listed["drift"] == pytest.approx(np.linalg.norm(node.z - 1), abs=1e-3)
        r2 = await eng.respond("c", ask("hello"))
        assert r2.z_version == 1
        again = await eng.train()  # nothing pending: nothing happens
        assert again.events == 0
        eng.close()

    run(go())


def test_two_channel_isolation_is_exact(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        a = await eng.respond("A", ask("hello"))
        b = await eng.respond("B", ask("hello"))
        before = (await eng.store.get_node("B", b.node_id)).z.copy()
        a2 = await eng.respond("A", ask("hello again"))
        await eng.vote("A", a.reply_id, "u1", 1)
        for user in ["u2", "u3"]:
            await eng.vote("A", a2.reply_id, user, -1)
        await eng.train()
        after_b = await eng.store.get_node("B", b.node_id)
        after_a = await eng.store.get_node("A", a.node_id)
        assert after_a.version == 1
        assert after_b.version == 0 and np.array_equal(after_b.z, before)
        prompt = torch.tensor(
            [b.reply_id and (await eng.store.get_reply("B", b.reply_id)).prompt_ids]
        )
        svf.set_merged(torch.from_numpy(after_b.z))
        logits_b = svf.model(prompt).logits.clone()
        svf.set_merged(None)
        assert torch.equal(logits_b, svf.model(prompt).logits)  # B is still the base model
        eng.close()

    run(go())


def test_correction_is_learned_as_demonstration(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        r = await eng.respond("c", ask("hello"))
        await eng.correct("c", r.reply_id, "ann", "Sure, here is a short answer!")
        reply = await eng.store.get_reply("c", r.reply_id)
        demo = Sample(reply.prompt_ids, reply.corrections[0]["ids"])
        before = _logp(svf, np.ones(svf.z_size, dtype=np.float32), demo)
        report = await eng.train()
        reps = report.channels["c"]
        assert reps[0].status == "updated" and reps[0].corrections == 1
        node = await eng.store.get_node("c", r.node_id)
        assert _logp(svf, node.z, demo) > before
        for empty in ("  ", None):
            with pytest.raises(GesalError, match="empty"):
                await eng.correct("c", r.reply_id, "ann", empty)
        eng.close()

    run(go())


def test_a_member_corrects_a_reply_once_the_last_correction_wins(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        r = await eng.respond("c", ask("hello"))
        for text in ["one", "two", "three"]:  # ann keeps sending: one demonstration
            await eng.correct("c", r.reply_id, "ann", text)
        await eng.correct("c", r.reply_id, "bob", "bob's")
        reply = await eng.store.get_reply("c", r.reply_id)
        assert [(c["user"], c["text"]) for c in reply.corrections] == [
            ("ann", "three"),
            ("bob", "bob's"),
        ]
        (rep,) = (await eng.train()).channels["c"]
        assert rep.corrections == 2  # ann's newest and bob's, not four
        eng.close()

    run(go())


def test_a_long_correction_keeps_its_question_in_view(svf):
    """Past the window the response is cut, not the prompt: a demonstration is learnt as
    an answer to its question. The scored tokens are its first ones, in full context."""
    vocab = svf.model.config.vocab_size

    def tokens(start: int, n: int) -> list[int]:
        return [3 + (start + i) % (vocab - 3) for i in range(n)]

    prompt, answer = tokens(10, 40), tokens(100, 300)  # 40 + 300 tokens
    ones = torch.ones(svf.z_size)
    long = Sample(prompt, answer, demo=True)
    lp, n = sequence_logprobs(svf, ones, [long], max_tokens=128, share_prefix=False)
    assert int(n[0]) == 128 - 40  # the whole prompt stayed
    cut = Sample(prompt, answer[:88], demo=True)  # what was scored: the answer's start
    lp_cut, _ = sequence_logprobs(svf, ones, [cut], max_tokens=128, share_prefix=False)
    assert float(lp[0]) == pytest.approx(float(lp_cut[0]), abs=1e-4)
    huge_prompt = Sample(tokens(10, 300), answer, demo=True)  # 300 + 300 tokens
    _, n = sequence_logprobs(svf, ones, [huge_prompt], max_tokens=128, share_prefix=False)
    assert int(n[0]) == 64  # both halves of the window: prompt end and answer start


def test_correction_weights_focus_on_what_the_member_changed():
    """Inserted tokens, and the token after a cut, carry the focus; the weights average
    to 1; a cut-off answer's missing end of text is not a change."""
    inserted = correction_weights([5, 6, 7, 8, 2], [5, 6, 99, 7, 8, 2], 0.5)
    assert inserted == pytest.approx([0.5, 0.5, 3.5, 0.5, 0.5, 0.5])
    shortened = correction_weights([5, 6, 7, 8, 9, 2], [5, 6, 2], 0.5)  # end of text after
    assert shortened == pytest.approx([0.5, 0.5, 2.0])  # the cut, although the bot's ends so
    cut_off = correction_weights([5, 6, 7, 8], [5, 6, 99, 7, 8, 2], 0.5)  # no end of text
    assert cut_off == pytest.approx([0.5, 0.5, 3.5, 0.5, 0.5, 0.5])
    opener = correction_weights([7, 8, 9, 2], [41, 42, 7, 8, 9, 2], 0.8)
    assert opener[:2] == pytest.approx([2.6, 2.6]) and np.mean(opener) == pytest.approx(1.0)
    assert correction_weights([5, 6, 2], [5, 6, 2], 0.5) is None  # nothing changed
    assert correction_weights([5, 6, 2], [9, 9, 9], 0.5) is None  # everything did
    assert correction_weights([5, 6, 2], [5, 9, 2], 0.0) is None  # off
    with pytest.raises(GesalError, match="demo_focus"):
        LearningConfig(demo_focus=1.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_focused_correction_learns_its_change_faster(svf, dtype):
    """The same correction, one update: with the focus on the inserted tokens their
    log-prob rises further than under the plain per-token mean, and the correction as a
    whole is still learnt."""
    prompt, said = [1, 5, 9, 12, 40], [50, 60, 70, 80, 90, 100, 110, 2]
    better = [50, 60, 77, 78, 70, 80, 90, 100, 110, 2]
    change = Sample(prompt + [50, 60], [77, 78])
    whole = Sample(prompt, better)
    z0 = np.ones(svf.z_size, dtype=np.float32)
    gains = {}
    for focus in (0.0, 0.8):
        demo = Sample(prompt, better, demo=True, weights=correction_weights(said, better, focus))
        cfg = LearningConfig(demo_focus=focus, compute_dtype=dtype)
        res = reinforce_step(svf, z0, [demo], 0.0, cfg)
        assert res.status == "updated"
        assert _logp(svf, res.z, whole) > _logp(svf, z0, whole)
        gains[focus] = _logp(svf, res.z, change) - _logp(svf, z0, change)
    assert gains[0.8] > gains[0.0] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_focuses_corrections_on_their_change(tiny_tokenizer, dtype):
    """Through the engine (a member's correction, a training round), a correction is
    learnt with the focus weights of `correction_sample`: the node's new z is the update
    of that sample, and focusing changes it.

    Whether focus raises the added words further is `test_a_focused_correction_learns_
    its_change_faster`'s question. Asked here of the engine's own reply, the answer
    depends on the machine: after Adam's sign-like steps the two gains are within about
    1% of each other, and one of three replies of the random tiny model reads less with
    focus even for one small normalised-gradient step."""

    async def go(focus):
        svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
        learning = LearningConfig(demo_focus=focus, compute_dtype=dtype)
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0, learning=learning)
        torch.manual_seed(7)
        r = await eng.respond("c", ask("hello"))
        await eng.correct("c", r.reply_id, "ann", "Sure, " + r.text)
        reply = await eng.store.get_reply("c", r.reply_id)
        ids = reply.corrections[0]["ids"]
        report = await eng.train()
        assert report.channels["c"][0].status == "updated"
        node = await eng.store.get_node("c", r.node_id)
        eng.close()
        demo = correction_sample(reply.prompt_ids, reply.response_ids, ids, focus)
        # unweighted without focus; with it, the change stands out
        assert (demo.weights is not None and len(set(demo.weights)) > 1) == (focus > 0)
        z0 = np.ones(svf.z_size, dtype=np.float32)
        pad = tiny_tokenizer.pad_token_id or 0
        direct = reinforce_step(svf, z0, [demo], 0.0, learning, pad)
        return reply.text, node.z, direct.z

    (text0, plain, plain_direct), (text1, focused, focused_direct) = run(go(0.0)), run(go(0.8))
    assert text0 == text1  # the same reply was corrected
    np.testing.assert_allclose(plain, plain_direct, rtol=0, atol=1e-6)
    np.testing.assert_allclose(focused, focused_direct, rtol=0, atol=1e-6)
    assert np.abs(focused - plain).max() > 1e-3  # about one Adam step of one component


def test_export_import_round_trip_is_exact_and_byte_stable(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.9999)
        r = await eng.respond("c", ask("hello"))
        fox = await eng.respond("c", ask("fox 0123"))
        await eng.vote("c", r.reply_id, "ann", 1)
        await eng.vote("c", fox.reply_id, "ann", -1)
        await eng.train()
        await eng.configure("c", threshold=0.7)
        data = await eng.export("c")
        text = Engine.dumps(data)
        assert Engine.dumps(await eng.export("c")) == text  # byte-stable
        await eng.import_graph("copy", json.loads(text))
        copy = await eng.export("copy")
        copy["channel"] = "c"
        assert Engine.dumps(copy) == text  # exact, z vectors included
        node = await eng.store.get_node("copy", r.node_id)
        assert node.version == 1 and (await eng.store.get_config("copy")).threshold == 0.7
        with pytest.raises(GesalError, match="not a gesal-bot"):
            await eng.import_graph("x", {"nodes": []})
        bad = json.loads(text)
        bad["model"]["z_size"] = 3
        with pytest.raises(GesalError, match="SVF components"):
            await eng.import_graph("x", bad)
        eng.close()

    run(go())


def _damaged(text: str, how: str) -> dict:
    data = json.loads(text)
    node, reply = data["nodes"][0], data["replies"][0]
    if how == "embedding missing":
        node["embedding"] = None
    elif how == "embedding wrong size":
        node["embedding"] = vec_to_b64(np.ones(3, np.float32))
    elif how == "embedding not finite":
        node["embedding"] = vec_to_b64(np.full(len(vec_from_b64(node["embedding"])), np.nan))
    elif how == "two nodes, one id":
        data["nodes"].append(dict(node))
    elif how == "reply of no node":
        reply["node_id"] = "nowhere"
    elif how == "vote of 7":
        reply["votes"] = {"ann": 7}
    elif how == "token beyond the vocabulary":
        reply["response_ids"] = [10**9]
    elif how == "model missing":
        data["model"] = None
    elif how == "not base64":
        node["z"] = "%%%"
    elif how == "merged into nothing":
        data["merged"] = {"gone": "also-gone"}
    elif how == "nodes not a list":
        data["nodes"] = {"a": 1}
    elif how == "NaN reward in the settings":
        data["config"]["reward_up"] = float("nan")
    elif how == "reward beyond the bound":
        data["config"]["reward_down"] = -50.0
    return data


DAMAGES = [
    ("embedding missing", r"^nodes\[0\]\.embedding: must be a base64 .* string, not null$"),
    ("embedding wrong size", r"^nodes\[0\]\.embedding: has 3 components; this model's .* 32$"),
    ("embedding not finite", r"^nodes\[0\]\.embedding: component 0 is nan, not a finite"),
    ("two nodes, one id", r"^nodes\[1\]\.node_id: '\w+' is the id of an earlier node too$"),
    ("reply of no node", r"^replies\[0\]\.node_id: 'nowhere' is neither a node of the export"),
    ("vote of 7", r"^replies\[0\]\.votes\.ann: a vote is 1 or -1, not 7$"),
    ("token beyond the vocabulary", r"^replies\[0\]\.response_ids\[0\]: 1000000000 is not a token"),
    ("model missing", r"^model\.z_size: .* model with null SVF components"),
    ("not base64", r"^nodes\[0\]\.z: is not valid base64$"),
    ("merged into nothing", r"^merged\.gone: was merged into 'also-gone', which is not a node"),
    ("nodes not a list", r"^nodes: must be a JSON list, not a JSON object$"),
    ("NaN reward in the settings", "channel settings are invalid: reward_up must be a finite"),
    ("reward beyond the bound", "channel settings are invalid: reward_down must be below 0"),
]


def test_a_damaged_import_is_refused_and_changes_nothing(svf, tiny_tokenizer):
    """Import replaces a channel: every check runs before the channel is touched."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", 1)
        await eng.train()
        text = Engine.dumps(await eng.export("c"))
        for how, message in DAMAGES:
            with pytest.raises(GesalError, match=message):
                await eng.import_graph("c", _damaged(text, how))
            assert Engine.dumps(await eng.export("c")) == text, how  # still whole
        again = await eng.respond("c", ask("hello"))  # and still answering
        assert again.node_id == r.node_id
        eng.close()

    run(go())


def test_a_round_trip_keeps_the_merge_map_so_late_votes_still_count(svf, tiny_tokenizer):
    """A vote on a reply of a folded node goes to the node that took it over, also after
    export and import (without the map it was orphaned and silently dropped)."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=0.99999)
        await eng.configure("c", max_nodes=2)
        first = await eng.respond("c", ask("fox 0123"))
        for t in ["hello world", "hello world", "what is the capital of France?"]:
            await eng.respond("c", ask(t))
        assert await eng.store.get_node("c", first.node_id) is None  # folded away
        data = await eng.export("c")
        assert data["merged"] and first.node_id in data["merged"]
        await eng.import_graph("copy", json.loads(Engine.dumps(data)))
        await eng.vote("copy", first.reply_id, "ann", -1)
        report = await eng.train("copy")
        (node_report,) = report.channels["copy"]
        assert node_report.node_id == data["merged"][first.node_id]
        assert node_report.status != "orphaned" and node_report.samples == 1
        eng.close()

    run(go())


def test_exploration_widens_on_downvotes_and_narrows_back(svf, tiny_tokenizer):
    eng = make_engine(svf, tiny_tokenizer, explore_max_temperature=1.0)  # (default: off)
    from gesal_core.records import Node

    node = Node("n", np.zeros(4, np.float32), np.ones(svf.z_size, np.float32))
    assert eng.responder.explore(node).temperature == pytest.approx(0.9)
    node.recent = [-2.0] * 8
    hot = eng.responder.explore(node)
    assert hot.temperature == pytest.approx(1.0)
    assert hot.top_p == eng.config.sampling.top_p  # never the unbounded tail
    node.recent = [-2.0] * 4 + [1.0] * 4
    assert eng.responder.explore(node).temperature == pytest.approx(0.9)
    eng.close()
    plain = make_engine(svf, tiny_tokenizer)  # the default bound is below 0.9: no widening
    node.recent = [-2.0] * 8
    assert plain.responder.explore(node).temperature == pytest.approx(0.9)
    plain.close()


def test_downvoted_answer_is_not_repeated(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0, max_resamples=8)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", -1)
        await eng.train()
        node = await eng.store.get_node("c", r.node_id)
        assert " ".join(r.text.lower().split()) in node.downvoted
        outs = [await eng.respond("c", ask("hello")) for _ in range(5)]
        repeats = sum(o.text == r.text for o in outs)
        assert repeats <= 1  # resampling avoids it (bounded tries may rarely fail)
        eng.close()

    run(go())


def test_a_downvoted_answer_is_avoided_before_the_next_training_run(svf, tiny_tokenizer):
    """Greedy answers repeat exactly: the one after a 👎 is resampled at once, not only
    after training wrote the node's list; a retraction lifts it again."""

    async def go():
        cfg = EngineConfig(
            train_round=1,  # one reply makes a round: train on every vote
            sampling=SamplingConfig(max_new_tokens=4, temperature=0.0),
            guard=GuardConfig(enabled=False),
            channel_defaults=ChannelConfig(threshold=-1.0),
        )
        eng = Engine(svf, tiny_tokenizer, MemoryStore(cfg.channel_defaults), cfg)
        r = await eng.respond("c", ask("hello"))
        await eng.respond("c", ask("hello"))
        assert eng.serving.stats.resamples == 0  # nothing to avoid yet
        await eng.vote("c", r.reply_id, "ann", -1)
        await eng.respond("c", ask("hello"))
        avoided = eng.serving.stats.resamples
        assert avoided > 0
        await eng.respond("other", ask("hello"))  # another channel: nothing to avoid there
        assert eng.serving.stats.resamples == avoided
        await eng.vote("c", r.reply_id, "ann", None)
        await eng.respond("c", ask("hello"))
        assert eng.serving.stats.resamples == avoided
        await eng.vote("c", r.reply_id, "ann", -1)
        await eng.train()  # the node's own list takes it over; the engine's is emptied
        assert not eng.downvotes
        node = await eng.store.get_node("c", r.node_id)
        assert " ".join(r.text.lower().split()) in node.downvoted
        eng.close()

    run(go())


def test_correction_curve_raises_the_opener_above_the_base(tiny_tokenizer):
    from gesal_core.correction_curve import correction_curve

    from .fakes.tiny import make_engine as make_tiny_engine

    # fp32 pinned: "auto" picks bf16 or fp32 by timing the machine it runs on. On this
    # random model round 2 does not always gain on round 1, whatever the step, so what
    # holds is that every round is above the base.
    eng = make_tiny_engine(tiny_tokenizer, learning=LearningConfig(compute_dtype="float32"))
    try:
        points = run(
            correction_curve(
                eng, ["hello world", "fox 0123"], ["lazy dog"], "Sure!", rounds=2, per_round=2
            )
        )
    finally:
        eng.close()
    assert [p.round for p in points] == [0, 1, 2] and points[-1].corrections == 4
    assert points[0].status == "base" and all(p.status == "updated" for p in points[1:])
    lps = [p.opener_logprob for p in points]
    assert lps[0] < min(lps[1:])  # corrections make the opener likelier than at the base


@pytest.mark.parametrize("replaces", [True, False])
def test_a_corrected_replys_downvote_does_not_fight_its_correction(svf, tiny_tokenizer, replaces):
    """👎 + "Sure! <same answer>" would push down the words the demonstration pushes up; by
    default the correction alone teaches, so the z equals that of the correction alone."""

    async def go():
        eng = make_engine(
            svf,
            tiny_tokenizer,
            threshold=-1.0,
            # (the 👎 makes "voted" a rejected node, whose step is larger)
            learning=LearningConfig(correction_replaces_vote=replaces, rejected_step=1.0),
        )
        for channel, vote in (("voted", -1), ("silent", None)):
            torch.manual_seed(0)  # the same sampled answer in both channels
            r = await eng.respond(channel, ask("hello"))
            if vote:
                await eng.vote(channel, r.reply_id, "ann", vote)
            await eng.correct(channel, r.reply_id, "ann", "Sure, here is a short answer!")
        await eng.train()
        zs = [(await eng.store.load_nodes(ch))[0].z for ch in ("voted", "silent")]
        eng.close()
        return zs

    voted, silent = run(go())
    assert not np.allclose(voted, 1.0)
    assert np.array_equal(voted, silent) is replaces


def _two_rounds(svf, tok, replay: int, second_vote: int = -1, channel: str = "c"):
    """Round 1: a 👍 on one answer. Round 2: ``second_vote`` on another. Returns the liked
    answer as a sample and the node's z after each round."""

    async def go():
        eng = make_engine(svf, tok, threshold=-1.0, learning=LearningConfig(replay=replay))
        torch.manual_seed(0)
        liked = await eng.respond(channel, ask("hello"))
        await eng.vote(channel, liked.reply_id, "ann", 1)
        await eng.train()
        z1 = (await eng.store.load_nodes(channel))[0].z.copy()
        later = await eng.respond(channel, ask("hello there"))
        await eng.vote(channel, later.reply_id, "bob", second_vote)
        report = await eng.train()
        z2 = (await eng.store.load_nodes(channel))[0].z.copy()
        reply = await eng.store.get_reply(channel, liked.reply_id)
        eng.close()
        return Sample(reply.prompt_ids, reply.response_ids), z1, z2, report

    return run(go())


def test_replay_relearns_earlier_liked_answers(svf, tiny_tokenizer):
    """With replay the second round (a 👎 on something else) still pulls the earlier liked
    answer up; without it that round only pushes its own answer down."""
    liked, z1, with_replay, _ = _two_rounds(svf, tiny_tokenizer, replay=16)
    _, z1_off, without, _ = _two_rounds(svf, tiny_tokenizer, replay=0)
    assert np.array_equal(z1, z1_off)  # round 1 has nothing to replay: identical
    gain_on = _logp(svf, with_replay, liked) - _logp(svf, z1, liked)
    gain_off = _logp(svf, without, liked) - _logp(svf, z1, liked)
    assert gain_on > gain_off and gain_on > 0


def test_replay_steps_only_while_the_community_still_votes_down(svf):
    """Old feedback is re-learnt when the node's new answers are still rejected, and never
    re-applied to a node whose community is content (votes as expected, no complaint)."""
    z0 = np.ones(svf.z_size, dtype=np.float32)
    liked = [Sample([1, 2, 3], [6, 7], demo=True)] * 4
    content = Sample([1, 2, 3], [4, 5], reward=1.0)  # exactly what the node expects
    res = reinforce_step(svf, z0, [content], baseline=1.0, replay=liked)
    assert res.status == "skipped" and res.z is None
    rejected = Sample([1, 2, 3], [4, 5], reward=-2.0)  # as expected, but still 👎
    assert reinforce_step(svf, z0, [rejected], baseline=-2.0).status == "skipped"
    res = reinforce_step(svf, z0, [rejected], baseline=-2.0, replay=liked)
    assert res.status == "updated" and res.used == 4  # the replayed answers (A = 0 adds none)


def test_replay_stays_within_its_node(svf, tiny_tokenizer):
    """A liked answer in one node is never replayed into another node's update."""

    async def go(replay):
        ch = f"c{replay}"  # a store shared by both runs (Redis) keeps them apart
        eng = make_engine(
            svf, tiny_tokenizer, threshold=0.9999, learning=LearningConfig(replay=replay)
        )
        torch.manual_seed(0)
        a = await eng.respond(ch, ask("hello world"))
        await eng.vote(ch, a.reply_id, "ann", 1)
        await eng.train()
        b = await eng.respond(ch, ask("0123456789 the lazy dog jumps"))
        b2 = await eng.respond(ch, ask("0123456789 the lazy dog jumps"))
        assert b.node_id != a.node_id
        await eng.vote(ch, b.reply_id, "ann", 1)
        await eng.vote(ch, b2.reply_id, "bob", -1)
        await eng.train()
        z = (await eng.store.get_node(ch, b.node_id)).z.copy()
        eng.close()
        return z

    on, off = run(go(16)), run(go(0))
    assert not np.allclose(on, 1.0) and np.array_equal(on, off)


def test_the_documented_engine_example_runs_and_bad_input_is_a_gesal_error(
    svf, tiny_tokenizer, monkeypatch, capsys
):
    """docs/architecture.md's "The engine from Python" snippet, run as written (on the tiny
    model instead of the bundled one), and the errors the doc promises for bad input."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
    section = doc.read_text().split("### The engine from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    engines: list[Engine] = []  # the one the snippet loads, to read its channel after

    def tiny_load(cls, *args, **kwargs):  # with the library's round, as Engine.load has
        engines.append(make_engine(svf, tiny_tokenizer, train_round=EngineConfig.train_round))
        return engines[-1]

    monkeypatch.setattr(Engine, "load", classmethod(tiny_load))
    exec(compile(code, "docs/architecture.md", "exec"), {"__name__": "documented"})
    out = capsys.readouterr().out
    assert "2 feedback events" in out and "1 node(s)" in out  # the vote and correction
    stats = run(engines[0].stats("my-app:general"))
    assert stats["nodes"] == 1 and stats["pending_feedback"] == 0

    async def bad():
        eng = make_engine(svf, tiny_tokenizer)
        reply = await eng.respond("c", ask("What is tea?"))
        for call in (
            eng.respond("c", ask("   ")),
            eng.vote("c", reply.reply_id, "alice", 2),
            eng.vote("c", "no-such-reply", "alice", 1),
            eng.correct("c", reply.reply_id, "alice", ""),
        ):
            with pytest.raises(GesalError):
                await call
        assert await eng.pending("c") == 0
        eng.close()

    run(bad())


async def _poison(eng, channel):
    """A liked reply whose stored text is a number, as an export from a build that
    checked no types (or a hand-edited record) leaves it: learning from it raises
    AttributeError in that channel's training, every time."""
    r = await eng.respond(channel, ask("hello"))
    await eng.vote(channel, r.reply_id, "ann", 1)
    reply = await eng.store.get_reply(channel, r.reply_id)
    reply.text = 42
    await eng.store.put_reply(channel, reply)
    return r


def test_a_failing_channel_never_stops_the_others_and_is_parked(svf, tiny_tokenizer):
    """The poisoned channel fails alone: the healthy one trains on every run, the
    poisoned one's feedback stays pending and after `park_after` (3) failures in a row it
    is parked, shown in its stats, and skipped; an admin's train retries it, and once the
    poison is gone trains it and unparks it."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        assert eng.config.park_after == 3
        poisoned = await _poison(eng, "bad")
        for n in (1, 2, 3):
            healthy = await eng.respond("good", ask(f"hello {n}"))
            await eng.vote("good", healthy.reply_id, "ann", -1)
            report = await eng.train()
            assert [r.status for r in report.channels["good"]] != []
            assert await eng.pending("good") == 0  # trained on every run
            assert "bad" not in report.channels and report.failed["bad"].startswith(
                "AttributeError: 'int' object has no attribute"
            )
            assert await eng.pending("bad") == 1  # kept for later
            stats = await eng.stats("bad")
            assert stats["train_failures"] == n and stats["train_parked"] == (n == 3)
            assert stats["train_error"] == report.failed["bad"]
        assert report.parked == {"bad": stats["train_error"]}
        assert "training failed in bad" in report.summary()
        assert "parked until an admin acts: bad" in report.summary()

        healthy = await eng.respond("good", ask("hello 4"))  # parked: skipped, not failed
        await eng.vote("good", healthy.reply_id, "ann", -1)
        report = await eng.train()
        assert report.failed == {} and report.parked == {"bad": stats["train_error"]}
        assert "good" in report.channels and await eng.pending("good") == 0
        assert (await eng.stats("bad"))["train_failures"] == 3
        assert (await eng.train("bad")).parked  # naming it is not an admin's "train now"

        report = await eng.train("bad", force=True)  # an admin retries: the poison is there
        assert "bad" in report.failed and await eng.pending("bad") == 1
        assert (await eng.stats("bad"))["train_parked"]

        reply = await eng.store.get_reply("bad", poisoned.reply_id)
        reply.text = "hello"  # the poison gone, the admin trains it again
        await eng.store.put_reply("bad", reply)
        report = await eng.train("bad", force=True)
        assert report.failed == {} and report.parked == {} and report.events == 1
        assert await eng.pending("bad") == 0
        stats = await eng.stats("bad")
        assert (stats["train_failures"], stats["train_parked"], stats["train_error"]) == (
            0,
            False,
            None,
        )
        eng.close()

    run(go())


def test_a_reset_unparks_a_channel_and_drops_its_poison(svf, tiny_tokenizer):
    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0, park_after=1)
        await _poison(eng, "bad")
        assert "bad" in (await eng.train()).parked
        assert (await eng.stats("bad"))["train_parked"]
        await eng.reset("bad")
        stats = await eng.stats("bad")
        assert not stats["train_parked"] and stats["train_failures"] == 0
        assert stats["pending_feedback"] == 0
        fresh = await eng.respond("bad", ask("hello"))
        await eng.vote("bad", fresh.reply_id, "ann", -1)
        report = await eng.train()
        assert "bad" in report.channels and report.failed == {} and report.parked == {}
        assert await eng.pending("bad") == 0
        eng.close()

    run(go())


def test_a_failure_shown_in_stats_names_no_address(svf, tiny_tokenizer, monkeypatch):
    """Admin stats get one line of the error with addresses removed; the log has the
    traceback."""

    def broken(*args, **kwargs):
        raise RuntimeError("lost redis://bob:hunter2@10.0.0.7:6379/0 and bob@10.0.0.7\nmore")

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0, park_after=2)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", 1)  # a 👍 is checked for degeneration
        monkeypatch.setattr("gesal_core.training.samples.degenerate_reason", broken)
        report = await eng.train()
        error = (await eng.stats("c"))["train_error"]
        assert report.failed == {"c": error}
        assert error == "RuntimeError: lost <address> and <address>"
        eng.close()

    run(go())


def test_an_unreachable_store_ends_the_run_and_counts_against_no_channel(
    svf, tiny_tokenizer, monkeypatch
):
    from gesal_core.store import StoreUnavailableError

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0, park_after=1)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", -1)

        async def down(*args, **kwargs):
            raise StoreUnavailableError("the database is not reachable")

        with monkeypatch.context() as m:
            m.setattr(eng.store, "pending", down)
            with pytest.raises(StoreUnavailableError):
                await eng.train()
        stats = await eng.stats("c")
        assert stats["train_failures"] == 0 and not stats["train_parked"]
        assert "c" in (await eng.train()).channels  # back: it trains as usual
        eng.close()

    run(go())


def test_config_refuses_non_finite_and_out_of_range_values(svf, tiny_tokenizer):
    """What `/gesal config` and the playground send: a bad value is one sentence and
    changes nothing; the bounds themselves are accepted."""
    nan, inf = float("nan"), float("inf")
    bad = [
        ("reward_up", nan, "reward_up must be a finite number"),
        ("reward_up", "nan", "reward_up must be a finite number"),
        ("reward_up", inf, "reward_up must be a finite number"),
        ("reward_down", -inf, "reward_down must be a finite number"),
        ("threshold", nan, "threshold must be a finite number"),
        ("reward_up", 0.0, "reward_up must be above 0 and at most 10"),
        ("reward_up", 10.5, "reward_up must be above 0 and at most 10"),
        ("reward_down", 0.5, "reward_down must be below 0 and at least -10"),
        ("reward_down", -11, "reward_down must be below 0 and at least -10"),
        ("threshold", 1.5, "threshold must be between -1 and 1"),
        ("max_nodes", 0, "max_nodes must be between 1 and 10000"),
        ("max_nodes", 2.5, "max_nodes must be a whole number"),
        ("reward_up", "lots", "reward_up must be a number"),
        ("colour", 1, "unknown setting"),
    ]

    async def go():
        eng = make_engine(svf, tiny_tokenizer)
        before = await eng.configure("c", threshold=0.5, reward_up=2.0)
        for name, value, words in bad:
            with pytest.raises(GesalError, match=words) as err:
                await eng.configure("c", **{name: value})
            message = str(err.value)
            assert "\n" not in message and ". " not in message, message  # one sentence
            assert await eng.store.get_config("c") == before, (name, value)
        edges = await eng.configure("c", threshold=-1, reward_up=10, reward_down=-10)
        assert (edges.threshold, edges.reward_up, edges.reward_down) == (-1.0, 10.0, -10.0)
        eng.close()

    run(go())


def test_a_node_with_a_nan_baseline_trains_again_and_heals(svf, tiny_tokenizer):
    """A NaN baseline (and NaN in the recent rewards), what an unchecked NaN reward
    leaves behind, restarts from the channel's usual verdict: the node updates, its
    statistics are finite again, and the channel's export imports."""

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        liked, _ = await _liked_and_disliked(eng)
        await eng.train()
        node = await eng.store.get_node("c", liked.node_id)
        assert node.rated > 0  # its own baseline is the one used
        node.baseline, node.recent = float("nan"), [*node.recent, float("nan")]
        await eng.store.save_node("c", node)
        await _liked_and_disliked(eng)
        (rep,) = (await eng.train()).channels["c"]
        assert rep.status == "updated", rep.reason
        after = await eng.store.get_node("c", liked.node_id)
        assert after.version == node.version + 1
        assert np.isfinite(after.baseline) and np.isfinite(after.recent).all()
        assert np.isfinite(after.z).all()
        await eng.import_graph("copy", json.loads(Engine.dumps(await eng.export("c"))))
        eng.close()

    run(go())


def test_a_non_finite_update_is_never_committed(svf, tiny_tokenizer, monkeypatch):
    """Whatever a step returns, a NaN z or baseline is not written: the node is rolled
    back and keeps a finite baseline."""
    from gesal_core.learning import StepResult

    def nan_steps(svf_, z0, *args, **kwargs):
        yield
        return StepResult(np.full_like(z0, np.nan), "updated", "", float("nan"))

    async def go():
        eng = make_engine(svf, tiny_tokenizer, threshold=-1.0)
        liked, _ = await _liked_and_disliked(eng)
        monkeypatch.setattr("gesal_core.training.node_update.reinforce_steps", nan_steps)
        (rep,) = (await eng.train()).channels["c"]
        assert rep.status == "rolled_back" and "non-finite" in rep.reason
        node = await eng.store.get_node("c", liked.node_id)
        assert node.version == 0 and np.allclose(node.z, 1.0)
        assert np.isfinite(node.baseline)
        assert await eng.pending("c") == 0  # the feedback counted, the step did not
        eng.close()

    run(go())


def test_channel_meta_reads_the_stores_fields_typed():
    """The store keeps loose fields; code above it reads `ChannelMeta`. Absent fields
    take defaults, unknown ones are ignored, and a folded node's feedback follows the
    merge map to the node that holds it now."""
    from gesal_core.records import ChannelMeta

    assert ChannelMeta.from_dict({}) == ChannelMeta()
    meta = ChannelMeta.from_dict(
        {
            "merged": {"a": "b", "b": "c"},
            "last_train": 12.5,
            "train_failures": 2,
            "train_parked": True,
            "train_error": "RuntimeError: x",
            "trained_events": 7,
            "from_a_newer_build": 1,
        }
    )
    assert meta.owner("a") == meta.owner("b") == "c" and meta.owner("d") == "d"
    assert (meta.last_train, meta.train_failures, meta.train_parked) == (12.5, 2, True)
    assert (meta.train_error, meta.trained_events) == ("RuntimeError: x", 7)
