import asyncio

import numpy as np
import pytest
import torch

from gesal_core.engine import Engine, EngineConfig
from gesal_core.errors import GesalError
from gesal_core.generate import SamplingConfig
from gesal_core.guard import (
    Guard,
    GuardConfig,
    GuardVerdict,
    ProbeResult,
    degenerate_reason,
    template_words,
)
from gesal_core.learning import LearningConfig
from gesal_core.records import ChannelConfig
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty"),
        ("A: A: A: A: A: A: A: A: A: A:", "repetition loop"),
        ("the the the the the the the the the the", "repetition loop"),
        ("!!!!!!!!!!!!!!!!!!!!", "repetition loop"),
        ("I'm sorry, but I can't help with that.", "refusal or self-description"),
        # brevity, seed 1, 64 votes
        (
            "I'm sorry for your mistake, but I'm unable to provide electricity",
            "refusal or self-description",
        ),
        ("I am SmolLM, an AI assistant trained by Hugging Face.", "refusal or self-description"),
        ("The capital of Canada is Ottawa.", None),
        ("Photosynthesis turns light, water and CO2 into sugar and oxygen in plants.", None),
        ("Sure! The speed of light is approximately 300,000,000,000,000 meters per second.", None),
        ("A googol is 1 followed by 100 zeros: 1000000000000 is only a trillion.", None),
        # LoRA brevity, seed 0, 128 votes
        ("The largest planet is approximately 9.92222222222222222222222222222", "repetition loop"),
        # seen at 128 votes in real brevity runs: the node echoed questions back
        ("What is the capital of France?", "a question instead of an answer"),
        ("How do plants grow?", "a question instead of an answer"),
        ("Kábázás a tác báám nemáníké?", "a question instead of an answer"),
        ("Tokyo. Anything else you would like to know?", None),
        ("Is it Tokyo? Yes: Tokyo is the capital of Japan.", None),
        # a real brevity answer at 16 votes (the base model also says Neptune): a statement
        # with a follow-up question has answered; a question with commas has not
        (
            "The largest planet in the universe is Neptune, but what about the largest "
            "planet in our solar system?",
            None,
        ),
        ("What, then, is the capital of France?", "a question instead of an answer"),
        # emoji, seed 1, 16 votes (its start): no letter or digit, under the NLL bar
        ("🏨🏨🔏⚕🐦❀ ✌🌬", "no words"),
        ("…", "no words"),
        ("42", None),
        ("東京です。", None),
        ("Tokyo 🗼✨", None),
        # emoji, seed 0, 64 votes: mixed emoji that no repeated-character rule sees
        ("Cats purr because they need to relax. 🐖🐖🌱🌍🌈🌌🌊🌌🌌🌈🌊🌌", "repetition loop"),
        ("🌟 Electricity is energy. 🌟\n\n1️⊕⌘🌍🌊⌍️🌐⌍️🌊", "repetition loop"),
        ("Paris 🇫🇷🇩🇪🇮🇹 and friends... 😊🎉!", None),
        # emoji, seed 0, 64 votes: one emoji again and again, spaced
        (
            "Cats purr because they are mammals and have a reproductive system that helps "
            "them reproduce. 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊",
            "repetition loop",
        ),
        ("15 times 3 is a bit tricky, but I can help! ❤️ ❤️ ❤️ ❤️ ❤️ ❤️", "repetition loop"),
        ("Wait . . . . . . what?", "repetition loop"),
        ("Tokyo! 😊 Have a nice day 😊 😊", None),
    ],
)
def test_degenerate_answers_are_recognised(text, reason):
    assert degenerate_reason(text) == reason


@pytest.fixture
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


def test_guard_batches_nodes_and_caches_the_base(svf, tiny_tokenizer):
    guard = Guard(svf, tiny_tokenizer, GuardConfig(max_new_tokens=4))
    z = np.ones(svf.z_size, dtype=np.float32)
    verdicts = guard.check_many([(z, ["hello"]), (z, ["fox"])])
    assert [v.ok for v in verdicts] == [True, True]  # z = 1 is the base: nothing changes
    assert verdicts[0].candidate.answers == verdicts[0].base.answers
    # the base answers each node's probe list once, and the fact questions once
    assert len(guard._base_cache) == 3
    guard.check_many([(z, ["hello"]), (z, ["fox"])])
    assert len(guard._base_cache) == 3


def test_engine_rolls_back_an_update_the_guard_rejects(svf, tiny_tokenizer):
    async def go():
        # A guard that tolerates no drift at all (any topic change beyond -1) rejects.
        cfg = EngineConfig(
            train_round=1,  # one reply makes a round: train on every vote
            sampling=SamplingConfig(max_new_tokens=4),
            guard=GuardConfig(max_new_tokens=4, max_topic_drop=-1.0),
            channel_defaults=ChannelConfig(threshold=-1.0),
            # a small step: the tiny model stays fluent, so only the topic check can fire
            learning=LearningConfig(lr=1e-3, inner_steps=2, max_step=0.25),
        )
        eng = Engine(svf, tiny_tokenizer, MemoryStore(cfg.channel_defaults), cfg)
        r = await eng.respond("c", [{"role": "user", "content": "hello"}])
        other = await eng.respond("c", [{"role": "user", "content": "hello there"}])
        await eng.vote("c", r.reply_id, "ann", 1)
        await eng.vote("c", other.reply_id, "ann", -1)
        report = await eng.train()
        rep = report.channels["c"][0]
        assert rep.status == "rolled_back" and "off topic" in rep.reason
        assert 0 < rep.guard_seconds <= rep.seconds  # the probes' share of the node's time
        node = await eng.store.get_node("c", r.node_id)
        assert node.version == 0 and np.array_equal(node.z, np.ones(svf.z_size, np.float32))
        assert node.rollbacks == 1 and await eng.pending("c") == 0  # the vote was consumed
        eng.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "text",
    ["Absolutelyutely safely mistaken,,,,,,,,,,,,,,,,", "Everest Picchu Picchu Picchu Picchu"],
)
def test_collapse_patterns_seen_in_real_runs_are_degenerate(text):
    assert degenerate_reason(text) == "repetition loop"


def test_gibberish_is_caught_by_base_model_nll():
    assert degenerate_reason("Plants grow underground larvae stings", base_nll=6.2).startswith(
        "gibberish"
    )
    assert degenerate_reason("The capital of Japan is Tokyo.", base_nll=0.8) is None
    assert degenerate_reason("Absolutelyutely safely mistaken", base_nll=5.1).startswith(
        "gibberish"
    )


def test_a_one_word_answer_is_not_gibberish_for_being_surprising():
    # "Python!" has a high base-model NLL for being brief, which is not gibberish
    assert degenerate_reason("Python!", base_nll=6.0) is None
    assert degenerate_reason("Tokyo, Japan.", base_nll=5.0) is None


SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize(
    ("question", "answer", "degenerate"),
    [
        # where a real brevity run's node ended at 128 votes (seed 1)
        ("What is a volcano?", "A volcano...", True),
        ("What is electricity?", "Hmm, electricity.", True),
        ("What is the largest planet?", "The largest planet...", True),
        ("How does the internet work?", "The internet...", True),
        # short answers that answer
        ("What is the capital of Japan?", "Tokyo.", False),
        ("What is the largest planet?", "Jupiter is the largest planet.", False),
        ("Is Tokyo the capital of Japan?", "Yes, Tokyo.", False),
        ("Which is larger, Jupiter or Mars?", "Jupiter.", False),
        ("What is 15 times 3?", "45.", False),
        # the guard rolled back a brevity update (seed 2) for the first of these
        ("What is 15 times 3?", "15 times 3 is 45.", False),
        ("What is a comet?", "A comet is ice.", False),
        # ...and rightly for these (the same run)
        ("Why is the ocean salty?", "The ocean salty.", True),
        ("What is a black hole?", "A black hole.", True),
        # long enough to say something, whatever its words
        ("How do plants grow?", "Plants grow when plants grow and grow and grow tall.", False),
    ],
)
def test_a_short_restatement_of_the_question_is_degenerate(question, answer, degenerate):
    reason = degenerate_reason(answer, None, question)
    assert (reason == "restates the question without answering it") is degenerate, reason


@pytest.mark.parametrize(
    "question,answer,echo",
    [
        # a real brevity run: short, so liked, and on no other rule's radar
        ("What is electricity?", "Hugging Face", True),
        ("What is the capital of Japan?", "Named SmolLM.", True),
        ("What is the capital of Japan?", "Tokyo.", False),
        ("What is the capital of Japan?", "Sure!", False),
        ("Who trained you?", "Hugging Face", False),  # asked about itself
        ("What does Hugging Face make?", "Hugging Face makes open models.", False),
    ],
)
def test_an_answer_that_only_echoes_the_system_prompt_is_degenerate(
    tiny_tokenizer, question, answer, echo
):
    template = template_words(tiny_tokenizer, SMOLLM_SYSTEM)
    assert {"huggi", "face", "smoll"} <= template and "syste" not in template
    reason = degenerate_reason(answer, None, question, template)
    assert (reason == "echoes the system prompt (a self-description)") is echo
    assert degenerate_reason(answer, None, question) in (None, "refusal or self-description")


def test_on_topic_accepts_brief_answers_and_rejects_nonsense():
    from gesal_core.guard import on_topic

    q = "What is the capital of Japan?"
    ref = "The capital of Japan is Tokyo."
    assert on_topic(q, "Tokyo.", ref, similarity=-0.28)  # brief but right: via the reference
    assert not on_topic(q, "Absolutely safely mistaken", ref, similarity=-0.22)
    assert on_topic(q, "It is a large city in Asia.", ref, similarity=0.45)


def test_the_guards_facts_are_not_the_evaluations_questions():
    """The guard may not be tuned to the held-out set it is judged on: none of its fact
    questions is a prompt of a built-in task, and none names a held-out key fact."""
    from gesal_core import evaluation
    from gesal_core.guard import FACTS

    asked = {p for make in evaluation.BUILTIN.values() for t in [make()] for p in t.train}
    asked |= {p for make in evaluation.BUILTIN.values() for p in make().heldout}
    assert len(FACTS) >= 10 and not set(FACTS) & asked
    held_facts = {f for fs in evaluation.KEY_FACTS.values() for f in fs}
    assert not set(FACTS.values()) & held_facts


def test_a_fact_is_found_where_the_base_answer_states_it():
    from gesal_core.guard import FactProbe, fact_probes

    probes = ["What is the capital of France?", "What is 15 times 3?", "Write a haiku."]
    base = ["The capital of France is Paris.", "15 times 3 is 35.", "Waves fold"]
    assert fact_probes(probes, base) == [
        FactProbe("What is the capital of France?", "The capital of France is ", "Paris")
    ]  # a fact the base model gets wrong (35) cannot be lost
    french = ["L'Étoile, la Marseillaise, la femme", "45", ""]
    assert [f.probe for f in fact_probes(probes, french)] == ["What is 15 times 3?"]


def facts_only(**overrides) -> GuardConfig:
    """A guard whose only live check is the fact check, on a random model, which is sure
    of nothing (so every fact it states counts)."""
    base = dict(
        max_new_tokens=6,
        max_extra_degenerate=99,
        max_topic_drop=99.0,
        max_extra_off_topic=99,
        min_fact_logprob=-1e9,
    )
    return GuardConfig(**{**base, **overrides})


def scrambled_z(size: int) -> np.ndarray:
    """A z far from ones: the tiny model no longer gives its base answers under it."""
    ones = np.ones(size, dtype=np.float32)
    return (ones + 3 * np.random.default_rng(0).standard_normal(size)).astype(np.float32)


def test_a_fact_is_lost_when_the_model_stops_knowing_it(tiny_tokenizer, monkeypatch):
    """The check asks the model for the fact where the base answer states it, so a wording
    change passes and a z that no longer gives the fact is rolled back."""
    import torch

    from gesal_core import guard as guard_mod

    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    loose = facts_only(min_facts_lost=1)
    g = Guard(svf, tiny_tokenizer, loose)
    base_answer = g.base(["hello"]).answers[0]
    word = base_answer.split()[-1]
    monkeypatch.setattr(guard_mod, "FACTS", {"hello": word.lower()})
    facts = guard_mod.fact_probes(["hello"], [base_answer])
    assert facts and facts[0].fact == word
    ones = np.ones(svf.z_size, dtype=np.float32)
    assert g.check(ones, ["hello"]).ok
    scrambled = scrambled_z(svf.z_size)
    before = g.fact_logprobs(None, facts)[0]
    after = g.fact_logprobs(torch.from_numpy(scrambled), facts)[0]
    assert before - after > loose.max_fact_drop  # the scrambled z really lost it
    verdict = g.check(scrambled, ["hello"])
    assert not verdict.ok and verdict.reason.startswith("forgot what the base model knew")
    assert repr(word) in verdict.reason
    for lenient in ({"max_fact_drop": 1e9}, {"min_facts_lost": 2}, {"min_fact_logprob": 0.0}):
        # the drop too small, one lost fact too few, or a fact the base model was unsure of
        g2 = Guard(svf, tiny_tokenizer, facts_only(**{"min_facts_lost": 1, **lenient}))
        assert g2.check(scrambled, ["hello"]).ok, lenient
    # several nodes in one training round: one batched pass, one verdict per node
    both = g.check_many([(ones, ["hello"]), (scrambled, ["hello"]), (ones, ["hello"])])
    assert [v.ok for v in both] == [True, False, True]
    assert both[1].reason == verdict.reason  # the same numbers as checked alone


def test_one_answer_that_stops_addressing_its_question_rolls_the_update_back(
    tiny_tokenizer, monkeypatch
):
    """Per answer, not on average: a seed-1 brevity node answered "What is electricity?"
    with "Hating the most." while its other probes were fine."""
    from gesal_core.guard import ProbeResult

    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    g = Guard(svf, tiny_tokenizer, GuardConfig())
    haiku = "Write a haiku about the sea."  # an unrelated probe: free answers are fine
    probes = ["What is electricity?", "What is the capital of Japan?", haiku]
    base = ProbeResult(
        ["Electricity is a flow of charge.", "The capital is Tokyo.", "Waves, a silent beauty"],
        0,
        0.8,
        ["", "", ""],
    )
    base.similarity = [0.5, 0.5, 0.5]
    mirror = "The sea is a mirror that reflects our souls."
    answers = {
        "astray": (["Hating the most.", "Tokyo.", mirror], [0.1, -0.2, 0.1]),
        "brief": (["A flow of charge.", "Tokyo.", mirror], [0.1, -0.2, 0.1]),  # on topic
    }
    for name, (texts, sims) in answers.items():
        cand = ProbeResult(texts, 0, 0.8, ["", "", ""], sims)
        monkeypatch.setattr(g, "probes_for", lambda related: probes)
        monkeypatch.setattr(g, "base_many", lambda lists, sampled=False: [base])
        monkeypatch.setattr(g, "run_many", lambda zs, lists, sampled=False, c=cand: [c])
        monkeypatch.setattr(g, "_lost_facts_many", lambda zs: [[] for _ in zs])
        (verdict,) = g.check_many([(np.ones(svf.z_size, np.float32), [])])
        if name == "astray":
            assert not verdict.ok
            assert verdict.reason == (
                "answers stopped addressing the question: 'What is electricity?' -> "
                "'Hating the most.'"
            )
        else:
            assert verdict.ok, verdict.reason


def test_an_update_that_makes_any_probe_answer_degenerate_is_rolled_back(
    tiny_tokenizer, monkeypatch
):
    """The haiku probe of a real 64-vote run answered "… a poem of beauty.\n\nAva
    v.A.A.E.A.A.E…", a loop `degenerate_reason` names, and the update was kept. Probe
    by probe: mending the base model's one degenerate answer does not pay for it."""
    from gesal_core.guard import ProbeResult

    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    g = Guard(svf, tiny_tokenizer, GuardConfig())
    probes = ["What is 15 times 3?", "Write a haiku about the sea."]
    loop = "In the deep blue of the ocean, a poem of beauty.\n\nAva v.A.A.E.A.A.E.A.A.A.E.A.A.A.A.A"
    assert degenerate_reason(loop) == "repetition loop"
    base_loop = "Fifteen times three is forty five five five five five five"
    assert degenerate_reason(base_loop)
    base = ProbeResult(
        [base_loop, "Waves fold on the shore"],
        1,
        0.8,
        [degenerate_reason(base_loop), ""],
        [0.5, 0.5],
    )
    cases = {
        "mends one, breaks another": (["15 times 3 is 45.", loop], False),
        "keeps the base model's own": ([base_loop, "Blue waves at dawn"], True),
    }
    for name, (texts, stands) in cases.items():
        reasons = [degenerate_reason(t) or "" for t in texts]
        cand = ProbeResult(texts, sum(map(bool, reasons)), 0.8, reasons, [0.5, 0.5])
        monkeypatch.setattr(g, "probes_for", lambda related: probes)
        monkeypatch.setattr(g, "base_many", lambda lists, sampled=False: [base])
        monkeypatch.setattr(g, "run_many", lambda zs, lists, sampled=False, c=cand: [c])
        monkeypatch.setattr(g, "_lost_facts_many", lambda zs: [[] for _ in zs])
        (verdict,) = g.check_many([(np.ones(svf.z_size, np.float32), [])])
        assert verdict.ok is stands, name
        if not stands:
            assert verdict.reason == (
                f"degenerate answers: 'Write a haiku about the sea.' -> {loop!r} (repetition loop)"
            )


def test_sampled_probes_roll_back_what_greedy_probes_pass(tiny_tokenizer, monkeypatch):
    """A real emoji run (rejected step 4) served "… diaphragm. 🐨 🐨🌍🌍🌍🌍🌍🌍🌍" while the
    guard's greedy probes stayed clean; with ``sampled`` the same rules judge answers
    sampled as replies are served."""
    from gesal_core.guard import ProbeResult

    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    probes = ["Why do cats purr?"]
    base = ProbeResult(["Cats purr when they are content."], 0, 0.8, [""], [0.5])
    clean = ProbeResult(["Cats purr when content. 🐱"], 0, 0.8, [""], [0.5])
    loop = "Cats purr because of the diaphragm. 🐨 🐨🌍🌍🌍🌍🌍🌍🌍"
    looping = ProbeResult([loop], 1, 0.8, [degenerate_reason(loop)], [0.5])
    for sampled in (False, True):
        g = Guard(svf, tiny_tokenizer, GuardConfig(sampled=sampled))
        asked = []

        def run_many(zs, lists, sampled=False, asked=asked):
            asked.append(sampled)
            return [looping if sampled else clean]

        monkeypatch.setattr(g, "probes_for", lambda related: probes)
        monkeypatch.setattr(g, "base_many", lambda lists, sampled=False: [base])
        monkeypatch.setattr(g, "run_many", run_many)
        monkeypatch.setattr(g, "_lost_facts_many", lambda zs: [[] for _ in zs])
        (verdict,) = g.check_many([(np.ones(svf.z_size, np.float32), [])])
        assert asked == ([False, True] if sampled else [False])
        if sampled:
            assert not verdict.ok
            assert verdict.reason == (
                f"sampled answers: degenerate answers: 'Why do cats purr?' -> {loop!r} "
                f"({degenerate_reason(loop)})"
            )
            assert verdict.candidate.answers == [loop]
        else:
            assert verdict.ok, verdict.reason


def test_sampled_probes_are_served_length_and_reproducible(svf, tiny_tokenizer):
    served = SamplingConfig(max_new_tokens=6, temperature=0.7)
    g = Guard(svf, tiny_tokenizer, GuardConfig(max_new_tokens=3, sampled=True), sampling=served)
    z = torch.from_numpy(np.ones(svf.z_size, dtype=np.float32))
    probes = [["hello", "the quick fox", "jumps over"]]
    greedy = g.run_many([z], probes)[0].answers
    sampled = g.run_many([z], probes, sampled=True)[0].answers
    assert g.run_many([z], probes, sampled=True)[0].answers == sampled  # the guard's seed
    assert sampled != greedy  # a random tiny model's nucleus is wide: sampling differs
    lengths = [len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in sampled]
    assert max(lengths) > 3  # longer than a greedy probe may run: as long as served
    # z = 1 is the base model, so a sampled check passes too, and both bases are cached
    (verdict,) = g.check_many([(np.ones(svf.z_size, np.float32), ["hello"])])
    assert verdict.ok, verdict.reason
    assert {sampled for _, sampled in g._base_cache} == {False, True}


@pytest.mark.parametrize("passes_at", [1, None])  # the first halving passes; none does
def test_engine_halves_a_rejected_step_before_rolling_it_back(svf, tiny_tokenizer, passes_at):
    """With `GuardConfig.backtrack`, a step the guard rejects is tried at half and then a
    quarter of its length (along the same direction) before it is rolled back, and the
    first size the guard accepts is committed."""

    async def go():
        cfg = EngineConfig(
            train_round=1,  # one reply makes a round: train on every vote
            sampling=SamplingConfig(max_new_tokens=4),
            guard=GuardConfig(max_new_tokens=4, backtrack=2),
            channel_defaults=ChannelConfig(threshold=-1.0),
        )
        eng = Engine(svf, tiny_tokenizer, MemoryStore(cfg.channel_defaults), cfg)
        tried = []

        def check_many(items):  # the guard's verdicts, decided by how often it was asked
            tried.extend(np.array(z) for z, _ in items)
            ok = passes_at is not None and len(tried) > passes_at
            base = ProbeResult([], 0, 0.0)
            return [GuardVerdict(ok, "repetition loop", base, base) for _ in items]

        eng.guard.check_many = check_many
        r = await eng.respond("c", [{"role": "user", "content": "hello"}])
        await eng.vote("c", r.reply_id, "ann", 1)
        await eng.correct("c", r.reply_id, "ann", "Sure, here is a short answer!")
        rep = (await eng.train()).channels["c"][0]
        node = await eng.store.get_node("c", r.node_id)
        eng.close()
        return tried, rep, node

    tried, rep, node = asyncio.run(go())
    ones = np.ones(svf.z_size, np.float32)
    full = tried[0] - ones
    assert np.linalg.norm(full) > 0.01
    for i, z in enumerate(tried):
        np.testing.assert_allclose(z - ones, full / 2**i, rtol=1e-5, atol=1e-7)
    if passes_at is None:
        assert len(tried) == 3 and rep.status == "rolled_back"
        assert rep.reason == "repetition loop"
        assert node.version == 0 and np.array_equal(node.z, ones) and node.rollbacks == 1
    else:
        assert len(tried) == 2 and rep.status == "updated"
        assert rep.reason.startswith("step halved 1x") and "repetition loop" in rep.reason
        assert node.version == 1 and np.array_equal(node.z, tried[1])


def test_backtrack_is_bounded():
    with pytest.raises(GesalError, match="backtrack"):
        GuardConfig(backtrack=-1)


def test_two_lost_facts_fail_an_update_that_one_does_not(tiny_tokenizer, monkeypatch):
    """The default asks for two lost facts: one is mostly a style shift at the fact's
    position (emoji runs), broad forgetting loses several."""
    from gesal_core import guard as guard_mod

    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    cfg = facts_only()
    assert cfg.min_facts_lost == GuardConfig().min_facts_lost == 2
    questions = ["hello", "what is this"]
    answers = Guard(svf, tiny_tokenizer, cfg).base(questions).answers
    facts = {q: a.split()[-1].lower() for q, a in zip(questions, answers, strict=True)}
    monkeypatch.setattr(guard_mod, "FACTS", facts)
    scrambled = scrambled_z(svf.z_size)
    g = Guard(svf, tiny_tokenizer, cfg)
    assert len(g.known_facts()) == 2
    (lost,) = g._lost_facts_many([torch.from_numpy(scrambled)])
    assert len(lost) == 2  # the scrambled z lost both
    verdict = g.check(scrambled, [])
    assert not verdict.ok and verdict.reason.startswith("forgot what the base model knew")
    monkeypatch.setattr(guard_mod, "FACTS", dict([next(iter(guard_mod.FACTS.items()))]))
    assert Guard(svf, tiny_tokenizer, cfg).check(scrambled, []).ok  # one fact of one: passes
