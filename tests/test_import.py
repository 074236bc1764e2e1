"""Import is validate-then-swap, on the in-memory store and on a real Redis.

The whole file is checked first, into the records the store writes; a refused one says
in one sentence what is wrong and where, and leaves the channel byte for byte as it was
(its export, and on Redis every raw key). A valid one replaces the channel in one atomic
step: nothing of the old graph is left, and answers, votes and training racing it see
the old channel or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re

import numpy as np
import pytest

from gesal_core import snapshot
from gesal_core.engine import Engine, EngineConfig
from gesal_core.errors import GesalError
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig, Node, Reply, vec_to_b64
from gesal_core.store import (
    MemoryStore,
    NodeGoneError,
    StoreUnavailableError,
    UnknownReplyError,
    lua,
)
from gesal_core.store.layout import CHANNELS, Keys
from gesal_core.store.redis_store import RedisStore
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama
from .redis_server import run

CH = "discord:5:5"
TOPICS = ["hello world", "0123456789 the lazy dog jumps", "fox 0123", "zebra? zebra! zebra."]


@pytest.fixture(scope="module")
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


def config() -> EngineConfig:
    return EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=4, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=0.9999),  # one node per topic
    )


@pytest.fixture(params=["memory", "redis"])
def store(request, make_redis_store):
    defaults = config().channel_defaults
    return MemoryStore(defaults) if request.param == "memory" else make_redis_store(defaults)


def engine(svf, tok, store, **kw) -> Engine:
    return Engine(svf, tok, store, config(), model_name="tiny", **kw)


def ask(text):
    return [{"role": "user", "content": text}]


async def seed(eng: Engine, channel: str, topics=TOPICS[:2]) -> list:
    """A trained channel: a node per topic, a linked, liked reply and a corrected one."""
    outs = [await eng.respond(channel, ask(t)) for t in topics]
    await eng.link_message(channel, outs[0].reply_id, f"m-{outs[0].reply_id}")
    await eng.vote(channel, outs[0].reply_id, "ann", 1)
    await eng.vote(channel, outs[1].reply_id, "bob", -1)
    await eng.correct(channel, outs[1].reply_id, "cy", "A better answer.")
    await eng.train()
    return outs


def raw_state(store, redis_client) -> dict | None:
    """Every key of the Redis server with its serialised value (None on memory)."""
    if not isinstance(store, RedisStore):
        return None
    return {key: redis_client.dump(key) for key in sorted(redis_client.keys("*"))}


# -- what a refused import says ----------------------------------------------------------


def _with(data: dict, edit) -> dict:
    data = json.loads(json.dumps(data))
    edit(data)
    return data


def _z(data: dict, i: int, z: np.ndarray) -> None:
    data["nodes"][i]["z"] = vec_to_b64(z.astype(np.float32))


def _nested(depth: int) -> list:
    inner: list = []
    for _ in range(depth - 1):
        inner = [inner]
    return inner


def _hundred_nodes(d: dict) -> None:
    d["config"]["max_nodes"] = 1
    d["nodes"] = [dict(d["nodes"][0], node_id=f"n{i}", neighbors=[]) for i in range(100)]


def _x_and_x_corr(d: dict) -> None:
    d["replies"] += [dict(d["replies"][0], reply_id=rid) for rid in ("X", "X:corr")]


def harmful(data: dict, z_size: int) -> list[tuple[str, object, str]]:
    """(what, the document as sent, the refusal expected): each does harm if accepted."""
    ones = np.ones(z_size, np.float32)
    huge = ones.copy()
    huge[17] = 1e30
    text = Engine.dumps(data).encode()
    nan_text = Engine.dumps(_with(data, lambda d: d["nodes"][0].update(baseline=math.nan)))
    inf_text = Engine.dumps(_with(data, lambda d: d["replies"][0].update(counted=-math.inf)))
    deep = b'{"format": "gesal-graph", "nodes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    oversize = text + b" " * (snapshot.MAX_BYTES + 1 - len(text))  # valid JSON, too large
    return [
        (
            "created_at yesterday",
            _with(data, lambda d: d["nodes"][1].update(created_at="yesterday")),
            r"nodes\[1\]\.created_at: must be a time in seconds since 1970, not 'yesterday'",
        ),
        (
            "z 1e30",
            _with(data, lambda d: _z(d, 0, huge)),
            r"nodes\[0\]\.z: component 17 is 1e\+30, outside \[-10, 10\]",
        ),
        (
            "z 50 everywhere",
            _with(data, lambda d: _z(d, 1, ones * 50)),
            r"nodes\[1\]\.z: component 0 is 50, outside \[-10, 10\]",
        ),
        ("NaN in the file", nan_text.encode(), r"the file holds NaN, which is not a JSON number"),
        (
            "-Infinity in the file",
            inf_text.encode(),
            r"the file holds -Infinity, which is not a JSON number",
        ),
        (
            "NaN baseline",
            _with(data, lambda d: d["nodes"][0].update(baseline=math.nan)),
            r"nodes\[0\]\.baseline: nan is not a finite number",
        ),
        (
            "-inf reward",
            _with(data, lambda d: d["nodes"][0].update(recent=[1.0, -math.inf])),
            r"nodes\[0\]\.recent\[1\]: -inf is not a finite number",
        ),
        (
            "-inf verdict",
            _with(data, lambda d: d["replies"][0].update(counted=-math.inf)),
            r"replies\[0\]\.counted: -inf is not a finite number",
        ),
        (
            "reward beyond the bounds",
            _with(data, lambda d: d["nodes"][0].update(baseline=11.0)),
            r"nodes\[0\]\.baseline: 11 is outside \[-10, 10\]",
        ),
        (
            "ids X and X:corr",
            _with(data, _x_and_x_corr),
            r"replies\[3\]\.reply_id: 'X:corr' is not an id "
            r"\(1 to 64 letters, digits, '_' or '-'\)",
        ),
        (
            "100 nodes into max_nodes 1",
            _with(data, _hundred_nodes),
            r"nodes: 100 nodes, more than its max_nodes \(1\)",
        ),
        (
            "deep nesting in the file",
            deep,
            r"the file nests lists and objects 100001 deep, more than the 8 an export may "
            r"\(an export nests 6\)",
        ),
        (
            "deep nesting in parsed JSON",
            _with(data, lambda d: None) | {"merged": {"a": _nested(10_000)}},
            r"merged\.a(\[0\])+: nests more than the 8 levels an export may",
        ),
        (
            "reply text a number",
            _with(data, lambda d: d["replies"][0].update(text=42)),
            r"replies\[0\]\.text: must be text, not the number 42",
        ),
        (
            "wrong z length",
            _with(data, lambda d: _z(d, 0, np.ones(3))),
            rf"nodes\[0\]\.z: has 3 components; this model's z has {z_size}",
        ),
        (
            "prompt too long",
            _with(data, lambda d: d["replies"][1].update(prompt_text="x" * 32_001)),
            r"replies\[1\]\.prompt_text: is 32001 characters long, more than the 32000 allowed",
        ),
        (
            "unknown field",
            _with(data, lambda d: d["nodes"][0].update(evil=1)),
            r"nodes\[0\]\.evil: is not a field of an export",
        ),
        (
            "count not a whole number",
            _with(data, lambda d: d["nodes"][1].update(count=True)),
            r"nodes\[1\]\.count: must be a whole number, not the value true",
        ),
        (
            "embedding longer than a mean of unit vectors",
            _with(data, lambda d: d["nodes"][0].update(embedding=vec_to_b64(np.ones(32)))),
            r"nodes\[0\]\.embedding: has length 5.65685; a routing embedding",
        ),
        (
            "oversize document",
            oversize,
            r"the file is 2\.0 MB, over the 2\.0 MB an export may have",
        ),
    ]


def test_every_harmful_import_is_refused_in_one_sentence_and_changes_nothing(
    svf, tiny_tokenizer, store, redis_client, monkeypatch
):
    monkeypatch.setattr(snapshot, "MAX_BYTES", 2 * 2**20)  # (the real one is 128 MB)

    async def go():
        eng = engine(svf, tiny_tokenizer, store)
        await seed(eng, CH)
        data = await eng.export(CH)
        assert len(data["nodes"]) == 2 and len(data["replies"]) == 2
        text, raw = Engine.dumps(data), raw_state(store, redis_client)
        seen = []
        for what, doc, message in harmful(data, svf.z_size):
            with pytest.raises(GesalError) as refused:
                await eng.import_graph(CH, doc)
            assert isinstance(refused.value, snapshot.SnapshotError), what
            said = str(refused.value)
            assert "\n" not in said and said.count(". ") == 0, (what, said)  # one sentence
            assert re.fullmatch(message + r".*", said), (what, said)
            assert Engine.dumps(await eng.export(CH)) == text, what  # byte for byte
            assert raw_state(store, redis_client) == raw, what  # and every raw key
            seen.append(what)
        # the same file, whole, is accepted: each refusal was the one field's doing
        assert await eng.import_graph(CH, text.encode()) == {"nodes": 2, "replies": 2}
        assert Engine.dumps(await eng.export(CH)) == text
        eng.close()
        return seen

    assert len(run(go())) == 20


def test_the_nesting_is_read_without_recursion_and_strings_do_not_count():
    """Brackets and escaped quotes inside strings are text; the depth is the parser's."""
    tricky = ["[[[{{{", 'a "quoted" \\[', "\\", "}}}]]]"]
    for value in tricky:
        text = json.dumps({"a": [{"b": [value]}]})
        assert snapshot._nesting(text) == 4 and snapshot.loads(text) == {"a": [{"b": [value]}]}
    for depth in (1, 7, 8):
        assert snapshot._nesting(json.dumps(_nested(depth))) == depth
        assert snapshot.loads(json.dumps(_nested(depth))) == _nested(depth)
    with pytest.raises(snapshot.SnapshotError, match="^the file nests lists and objects 9 deep"):
        snapshot.loads(json.dumps(_nested(9)))
    # unterminated strings and stray backslashes read in one pass, then fail as JSON
    for bad in ('"\\' * 200_000, '{"a": "' + "[" * 100_000, "[" + '"\\"' * 100_000):
        with pytest.raises(snapshot.SnapshotError, match="^the file is not valid JSON"):
            snapshot.loads(bad)


def test_the_reply_count_is_bounded_by_what_the_store_keeps(
    svf, tiny_tokenizer, make_redis_store, redis_client
):
    async def go():
        eng = engine(svf, tiny_tokenizer, make_redis_store(max_replies=3))
        await seed(eng, CH)
        data = await eng.export(CH)
        data["replies"] += [dict(data["replies"][0], reply_id=f"r{i}") for i in range(2)]
        raw = raw_state(eng.store, redis_client)
        with pytest.raises(snapshot.SnapshotError, match=r"^replies: 4 replies, more than the 3"):
            await eng.import_graph(CH, data)
        assert raw_state(eng.store, redis_client) == raw
        eng.close()

    run(go())


def test_the_z_bound_holds_what_training_produces(svf, tiny_tokenizer):
    """Trained nodes sit far inside the bound: forty rounds of mostly rejected answers
    (the largest steps, `rejected_step`) move no component a fifth of the way to it,
    and the channel's export imports."""
    rng = random.Random(3)

    async def go():
        eng = engine(svf, tiny_tokenizer, MemoryStore(config().channel_defaults))
        for i in range(40):
            out = await eng.respond(CH, ask("hello world"))
            await eng.vote(CH, out.reply_id, f"u{i}", 1 if rng.random() < 0.3 else -1)
            await eng.train()
        (node,) = await eng.store.load_nodes(CH)
        await eng.import_graph("copy", Engine.dumps(await eng.export(CH)))
        eng.close()
        return node

    node = run(go())
    drift = float(np.abs(node.z - 1).max())
    print(f"z bound: {node.updates} updates, largest |z_i - 1| {drift:.3f}")
    assert node.updates >= 20
    assert drift < (snapshot.Z_RANGE[1] - 1) / 5


# -- what a valid import does --------------------------------------------------------------


def test_a_valid_import_replaces_the_channel_whole(svf, tiny_tokenizer, store, redis_client):
    """Nothing of the old graph is left (on Redis: the raw key set is exactly the new
    graph's, no key keeps a staging TTL and no stage is left), pending feedback goes, the
    trainer lock stays, and the channel answers and trains on the new graph."""

    async def go():
        eng = engine(svf, tiny_tokenizer, store)
        await seed(eng, "other", TOPICS[2:])
        other = await eng.export("other")
        old = await seed(eng, CH)
        await eng.configure(CH, max_nodes=5)
        late = await eng.respond(CH, ask("what is the capital of France?"))
        await eng.vote(CH, late.reply_id, "ann", 1)
        assert await eng.pending(CH) == 1 and len(await store.load_nodes(CH)) == 3
        async with store.trainer_lock(CH, ttl=30) as held:
            counts = await eng.import_graph(CH, Engine.dumps(other).encode())
            keys = _raw_keys(redis_client, CH) if isinstance(store, RedisStore) else None
        assert held and counts == {"nodes": 2, "replies": 2}
        mine = await eng.export(CH)
        assert Engine.dumps(mine | {"channel": "other"}) == Engine.dumps(other)
        assert await eng.pending(CH) == 0 and (await store.get_config(CH)).max_nodes == 64
        for out in [*old, late]:
            assert await store.get_node(CH, out.node_id) is None
            assert await store.get_reply(CH, out.reply_id) is None
        assert CH in await store.channels()
        if keys is not None:
            k = Keys(CH)
            expected = {k.nodes, k.seq, k.replies, k.messages, k.config, k.trainlock}
            expected |= {k.node(n["node_id"]) for n in other["nodes"]}
            expected |= {k.reply(r["reply_id"]) for r in other["replies"]}
            expected |= {k.corrections(r["reply_id"]) for r in other["replies"] if r["corrections"]}
            assert keys == expected
            assert all(redis_client.ttl(key) == -1 for key in expected - {k.trainlock})
            assert list(redis_client.scan_iter(match="gesal:import:*")) == []
        # and it simply works on, on the imported nodes
        again = await eng.respond(CH, ask(TOPICS[2]))
        assert again.node_id in {n["node_id"] for n in other["nodes"]}
        await eng.vote(CH, again.reply_id, "ann", 1)
        report = await eng.train()
        assert report.channels[CH] and not report.failed and await eng.pending(CH) == 0
        eng.close()

    run(go())


def _raw_keys(redis_client, channel: str) -> set[str]:
    match = Keys(channel).pattern()
    return {key.decode() for key in redis_client.scan_iter(match=match, count=1000)}


def test_a_stage_cut_short_changes_nothing(
    svf, tiny_tokenizer, make_redis_store, redis_client, monkeypatch
):
    """A staged key that is gone by the swap (its TTL ran out) makes the swap refuse
    whole: the channel stays as it was and the rest of the stage is deleted."""

    async def go():
        eng = engine(svf, tiny_tokenizer, make_redis_store(config().channel_defaults))
        await seed(eng, "other", TOPICS[2:])
        other = await eng.export("other")
        await seed(eng, CH)
        text, raw = Engine.dumps(await eng.export(CH)), raw_state(eng.store, redis_client)
        stage_it = RedisStore._stage

        async def cut_short(self, stage, *args):
            await stage_it(self, stage, *args)
            redis_client.delete(stage.node(other["nodes"][1]["node_id"]))

        monkeypatch.setattr(RedisStore, "_stage", cut_short)
        with pytest.raises(StoreUnavailableError, match="nothing was changed"):
            await eng.import_graph(CH, other)
        assert Engine.dumps(await eng.export(CH)) == text
        assert raw_state(eng.store, redis_client) == raw  # no stage left either
        eng.close()

    run(go())


def test_a_retried_swap_is_a_success(make_redis_store):
    """The swap script run twice (its reply lost, the client retries) replaces once and
    then answers as done, instead of refusing a stage that is already in place."""
    s = make_redis_store()

    async def go():
        emb, z = np.full(2, 0.5, np.float32), np.ones(3, np.float32)
        await s.save_node(CH, Node("old", emb, z))
        stage, k = Keys(CH, "t1"), Keys(CH)
        nodes = [Node("new", emb, z)]
        replies = [Reply("r", "new", [1], [2], "p", "t", 0)]
        await s._stage(stage, ChannelConfig(), nodes, replies, {})
        keys = [*s._fixed(k), *s._fixed(stage), f"{stage.base}:done"]
        args = [k.base, stage.base, 1, 1]
        first = await s._eval(lua.REPLACE, keys, args)
        second = await s._eval(lua.REPLACE, keys, args)
        return first, second, [n.node_id for n in await s.load_nodes(CH)], await s.list_replies(CH)

    first, second, nodes, replies = run(go())
    assert first > 0 and second == 0 and nodes == ["new"] and [r.reply_id for r in replies] == ["r"]


# -- an import racing the channel's traffic --------------------------------------------------


def _whole(redis_client, channel: str, z_size: int) -> dict:
    """The raw layout of a channel obeys every invariant of a whole channel: each key is
    known to an index, each index entry has its record, replies point at nodes (or at
    folded ones), messages at replies, pending votes at replies, nothing keeps a TTL."""
    k = Keys(channel)
    keys = _raw_keys(redis_client, channel)
    node_ids = {i.decode() for i in redis_client.zrange(k.nodes, 0, -1)}
    reply_ids = {i.decode() for i in redis_client.zrange(k.replies, 0, -1)}
    indexed = {k.nodes, k.seq, k.replies, k.messages, k.feedback, k.config, k.meta, k.trainlock}
    indexed |= {k.node(i) for i in node_ids} | {k.reply(i) for i in reply_ids}
    indexed |= {k.corrections(i) for i in reply_ids}
    assert keys <= indexed, f"keys no index knows: {sorted(keys - indexed)}"
    merged = json.loads(redis_client.hget(k.meta, "merged") or b"{}")
    for rid in reply_ids:
        raw = redis_client.hget(k.reply(rid), "data")
        assert raw is not None, f"reply {rid} is indexed but has no record"
        node_id = json.loads(raw)["node_id"]
        assert node_id in node_ids or node_id in merged, f"reply {rid}: node {node_id} is gone"
    for nid in node_ids:
        h = redis_client.hgetall(k.node(nid))
        assert h and len(h[b"z"]) == 4 * z_size, f"node {nid} is indexed but not whole"
    for mid, rid in redis_client.hgetall(k.messages).items():
        assert rid.decode() in reply_ids, f"message {mid} maps to a deleted reply"
    events = redis_client.xrange(k.feedback) if redis_client.exists(k.feedback) else []
    for _, fields in events:
        assert fields[b"reply"].decode() in reply_ids, "a pending vote for a deleted reply"
    assert all(redis_client.ttl(key) == -1 for key in keys - {k.trainlock})
    if node_ids:
        assert redis_client.exists(k.config) and redis_client.sismember(CHANNELS, channel)
    return {"nodes": len(node_ids), "replies": len(reply_ids), "events": len(events)}


def test_an_import_racing_answers_votes_and_training_leaves_a_whole_channel(
    tiny_tokenizer, make_redis_store, redis_client
):
    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    rng = random.Random(11)
    tally = {"answers": 0, "refused answers": 0, "votes": 0, "refused votes": 0, "imports": 0}

    async def go():
        eng = engine(svf, tiny_tokenizer, make_redis_store(config().channel_defaults))
        await seed(eng, "other", TOPICS[2:])
        other = Engine.dumps(await eng.export("other")).encode()
        live = [o.reply_id for o in await seed(eng, CH)]
        own = Engine.dumps(await eng.export(CH)).encode()  # the live channel's own ids
        live += [json.loads(other)["replies"][0]["reply_id"]]
        # the admin imports through another connection, as the CLI in another process
        admin = engine(svf, tiny_tokenizer, make_redis_store(), worker=eng.worker)

        async def member(i: int) -> None:
            for j in range(3):
                try:
                    out = await eng.respond(CH, ask(TOPICS[(i + j) % 4]))
                    live.append(out.reply_id)
                    tally["answers"] += 1
                except NodeGoneError:
                    tally["refused answers"] += 1
                for reply_id in rng.sample(live, 2):
                    try:
                        await eng.vote(CH, reply_id, f"u{i}", rng.choice([1, -1]))
                        tally["votes"] += 1
                    except UnknownReplyError:
                        tally["refused votes"] += 1

        async def importer() -> None:
            for doc in (other, own, other, own):
                await asyncio.sleep(rng.uniform(0.01, 0.08))
                await admin.import_graph(CH, doc)
                tally["imports"] += 1

        async def trainer() -> None:
            for _ in range(3):
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                await eng.train(CH)

        rounds = []
        for _ in range(2):
            await asyncio.gather(importer(), trainer(), *(member(i) for i in range(6)))
            rounds.append(_whole(redis_client, CH, svf.z_size))
        assert list(redis_client.scan_iter(match="gesal:import:*")) == []
        # and the channel simply works on: answer, vote, train everything pending
        out = await eng.respond(CH, ask("after the storm"))
        await eng.vote(CH, out.reply_id, "ann", 1)
        report = await eng.train(CH, force=True)
        after = _whole(redis_client, CH, svf.z_size)
        eng.close()
        return rounds, report, after

    rounds, report, after = run(go())
    print("import race:", tally, "states after each round:", rounds)
    assert tally["imports"] == 8 and tally["answers"] >= 1 and tally["votes"] >= 1
    assert tally["refused answers"] + tally["refused votes"] >= 1  # the races happened
    assert not report.failed and report.count("orphaned") == 0
    assert after["events"] == 0  # everything pending was trained
