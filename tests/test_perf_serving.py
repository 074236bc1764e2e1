"""Serving performance machinery on the tiny model: merged-weight LRU, dynamic batching,
idle-time pre-merging, and the engine answering many channels in one batched forward."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig, build_prompt, generate
from gesal_core.guard import GuardConfig
from gesal_core.learning import Sample, sequence_logprobs, target_logprobs
from gesal_core.records import ChannelConfig
from gesal_core.serving import BatchedGenerator, GenRequest, ServingConfig
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.svf.cache import MergedCache
from gesal_core.worker import BatchConfig, ModelWorker

from .conftest import make_tiny_llama

GREEDY = SamplingConfig(max_new_tokens=5, temperature=0)


def _svf(tok, **cfg):
    return SVFModel(make_tiny_llama(len(tok)), "tiny", SVFConfig(progress=False, **cfg))


def _z(svf, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    return (1 + scale * torch.randn(svf.z_size, generator=g)).numpy().astype(np.float32)


# -- the LRU ---------------------------------------------------------------------------------
def test_merged_cache_is_lru_and_bounded_in_bytes():
    one = {"w": torch.zeros(256)}  # 1 KiB
    cache = MergedCache(max_bytes=2048 + 100)
    assert cache.put("a", dict(one)) and cache.put("b", dict(one))
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("c", dict(one))  # evicts b, the least recently used
    assert cache.keys() == ["a", "c"] and "b" not in cache
    assert cache.bytes == 2048 and cache.evictions == 1
    assert not cache.put("huge", {"w": torch.zeros(10_000)})  # larger than the bound
    assert "huge" not in cache and cache.bytes == 2048
    assert cache.get("b") is None and cache.misses == 1 and cache.hits == 1
    with pytest.raises(ValueError):
        MergedCache(-1)


def test_switching_back_to_a_hot_node_is_a_pointer_swap(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    ids = torch.tensor([[5, 9, 17, 3]])
    za, zb = torch.from_numpy(_z(svf, 1)), torch.from_numpy(_z(svf, 2))
    svf.set_merged(za, key="A")
    logits_a = svf.model(ids).logits.clone()
    weight_a = next(iter(svf.layers.values())).merged_weight
    svf.set_merged(zb, key="B")
    assert not torch.equal(svf.model(ids).logits, logits_a)
    svf.set_merged(za, key="A")
    assert next(iter(svf.layers.values())).merged_weight is weight_a  # reused, not recomputed
    assert torch.equal(svf.model(ids).logits, logits_a)
    assert svf.has_merged("A") and svf.has_merged("B")
    svf.set_merged(zb)  # anonymous merges are never cached
    assert len(svf.merged_cache) == 2


def test_lru_memory_bound_evicts_cold_nodes(tiny_tokenizer):
    probe = _svf(tiny_tokenizer)
    set_mb = sum(lay.merged_weight.numel() * 4 for lay in probe.layers.values()) / 2**20
    svf = _svf(tiny_tokenizer, merged_cache_mb=2.5 * set_mb)  # room for two sets
    ids = torch.tensor([[4, 8, 15, 16]])
    fresh = {}
    for i, key in enumerate("ABC"):
        z = torch.from_numpy(_z(svf, 10 + i))
        svf.set_merged(z, key=key)
        fresh[key] = (z, svf.model(ids).logits.clone())
    assert svf.merged_cache.keys() == ["B", "C"] and not svf.has_merged("A")
    assert svf.merged_cache.bytes <= svf.merged_cache.max_bytes
    z, logits = fresh["A"]
    svf.set_merged(z, key="A")  # evicted: merged again, still correct
    assert torch.allclose(svf.model(ids).logits, logits, atol=1e-6)


def test_merge_steps_fill_the_cache_without_touching_current_weights(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    base = svf.model(ids).logits.clone()
    z = torch.from_numpy(_z(svf, 3))
    steps = svf.merge_steps(z, "N", layers_per_step=2)
    next(steps)
    assert not svf.has_merged("N")  # half-built sets are never visible
    assert torch.equal(svf.model(ids).logits, base)
    for _ in steps:
        pass
    assert svf.has_merged("N")
    assert torch.equal(svf.model(ids).logits, base)  # still the base model until switched
    with svf.factored(z):
        expected = svf.model(ids).logits.clone()
    svf.set_merged(z, key="N")
    assert (svf.model(ids).logits - expected).abs().max() < 1e-4
    with pytest.raises(ValueError):
        next(svf.merge_steps(z, ("anon", 1)))


# -- the worker -------------------------------------------------------------------------------
def test_worker_batches_concurrent_items_up_to_max_batch():
    worker = ModelWorker(batching=BatchConfig(max_batch=4, max_wait_s=0.05))
    seen: list[list[int]] = []

    def square_all(items):
        seen.append(list(items))
        return [i * i for i in items]

    async def go():
        return await asyncio.gather(*(worker.batch(square_all, i) for i in range(6)))

    try:
        assert asyncio.run(go()) == [i * i for i in range(6)]
    finally:
        worker.close()
    assert sorted(len(b) for b in seen) == [2, 4]
    assert sorted(x for b in seen for x in b) == list(range(6))
    assert worker.batch_sizes == [len(b) for b in seen]


def test_worker_batch_groups_and_errors_are_separate():
    worker = ModelWorker(batching=BatchConfig(max_batch=8, max_wait_s=0.02))

    def tag(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return [f"{len(items)}:{x}" for x in items]

    async def go():
        return await asyncio.gather(
            worker.batch(tag, "a", group=1),
            worker.batch(tag, "b", group=1),
            worker.batch(tag, "c", group=2),
            worker.batch(tag, "bad", group=3),
            return_exceptions=True,
        )

    try:
        a, b, c, bad = asyncio.run(go())
    finally:
        worker.close()
    assert (a, b, c) == ("2:a", "2:b", "1:c")  # different groups never share a batch
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)


def test_training_and_serving_share_the_worker_fairly():
    """A training job queued behind a stream of chat runs before the later chat batches,
    and chat queued behind a training job runs right after it: neither starves."""
    worker = ModelWorker(batching=BatchConfig(max_batch=2, max_wait_s=0))
    order: list[str] = []
    gate = threading.Event()

    def serve(items):
        order.append(f"serve{len(items)}")
        return items

    def train():
        order.append("train")
        return "trained"

    async def go():
        blocker = asyncio.ensure_future(worker.run(gate.wait))  # thread busy
        await asyncio.sleep(0.02)
        chats = [asyncio.ensure_future(worker.batch(serve, i)) for i in range(6)]
        await asyncio.sleep(0.02)
        training = asyncio.ensure_future(worker.run(train))
        await asyncio.sleep(0.02)
        gate.set()
        await blocker
        return await asyncio.gather(*chats), await training

    try:
        chats, trained = asyncio.run(go())
    finally:
        worker.close()
    assert chats == list(range(6)) and trained == "trained"
    # first drain takes 2 and re-queues the rest *behind* the training job
    assert order[0] == "serve2" and order[1] == "train"
    assert order[2:] == ["serve2", "serve2"]


def test_answers_run_between_the_steps_of_a_training_update():
    """A stepwise job (a training update) lets an answer that arrives during step 1 run
    before step 2, instead of after the whole update; the update still finishes."""
    worker = ModelWorker(batching=BatchConfig(max_batch=8, max_wait_s=0))
    order: list[str] = []
    started = threading.Event()

    def update(n):
        for i in range(n):
            order.append(f"step{i}")
            started.set()
            time.sleep(0.05)  # a forward/backward pass
            yield
        return "trained"

    def serve(items):
        order.append("answer")
        return items

    async def go():
        training = asyncio.ensure_future(worker.steps(update, 3))
        await asyncio.to_thread(started.wait)
        answer = await worker.batch(serve, "hi")  # arrives while step0 runs
        return answer, await training

    try:
        answer, trained = asyncio.run(go())
    finally:
        worker.close()
    assert (answer, trained) == ("hi", "trained")
    assert order.index("answer") < order.index("step2")  # not held up by the whole update
    assert [o for o in order if o != "answer"] == ["step0", "step1", "step2"]


def test_a_cancelled_stepwise_job_is_closed_and_the_worker_goes_on():
    worker = ModelWorker()
    closed = threading.Event()

    def update():
        try:
            while True:
                time.sleep(0.01)
                yield
        finally:
            closed.set()

    async def go():
        job = asyncio.ensure_future(worker.steps(update))
        await asyncio.sleep(0.05)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await asyncio.to_thread(closed.wait, 5)
        return await worker.run(lambda: "still serving")

    try:
        assert asyncio.run(go()) == "still serving"
    finally:
        worker.close()
    assert closed.is_set()


def test_idle_jobs_only_run_when_nothing_is_queued():
    worker = ModelWorker()
    log: list[str] = []
    gate = threading.Event()

    def idle_job():
        for i in range(3):
            log.append(f"idle{i}")
            yield

    async def go():
        blocker = asyncio.ensure_future(worker.run(gate.wait))
        await asyncio.sleep(0.02)
        worker.when_idle(idle_job())
        work = asyncio.ensure_future(worker.run(log.append, "work"))
        await asyncio.sleep(0.02)
        assert log == []  # the thread is busy: nothing idle runs
        gate.set()
        await blocker
        await work
        for _ in range(100):
            if worker.idle_jobs() == 0:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(go())
    finally:
        worker.close()
    assert log == ["work", "idle0", "idle1", "idle2"]


def test_closed_worker_fails_pending_batches_instead_of_hanging():
    worker = ModelWorker(batching=BatchConfig(max_batch=8, max_wait_s=0.05))

    async def go():
        task = asyncio.ensure_future(worker.batch(lambda items: items, 1))
        await asyncio.sleep(0)
        worker.close()
        return await asyncio.wait_for(task, 2)

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(go())


# -- batched generation ----------------------------------------------------------------------
def test_batched_per_row_z_generation_matches_one_by_one(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    gen = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    texts = ["hello world", "what is the capital of France?", "the quick brown fox"]
    prompts = [build_prompt(tiny_tokenizer, [{"role": "user", "content": t}]) for t in texts]
    zs = [_z(svf, 20 + i, scale=0.6) for i in range(3)]
    reqs = [
        GenRequest(p, z, ("c", i, 0), GREEDY)
        for i, (p, z) in enumerate(zip(prompts, zs, strict=True))
    ]
    batched = gen(reqs)
    assert gen.stats.factored_batches == 1 and gen.stats.merged_batches == 0
    outs = []
    for p, z in zip(prompts, zs, strict=True):
        svf.set_merged(torch.from_numpy(z))
        outs.append(generate(svf.model, tiny_tokenizer, [p], GREEDY)[0].response_ids)
    assert [o.response_ids for o, _ in batched] == outs
    assert len({tuple(o) for o in outs}) > 1  # the adapters really differ
    for (o, lp), z in zip(batched, zs, strict=True):  # logprob scored under the row's own z
        ref, _ = sequence_logprobs(svf, torch.from_numpy(z), [Sample(o.prompt_ids, o.response_ids)])
        assert abs(float(ref[0]) - lp) < 1e-3
    gen.worker.close()


def test_serving_scores_answers_itself_when_generation_could_not(tiny_tokenizer, monkeypatch):
    """The recorded log π feeds the importance weights of stale samples; if `generate`
    cannot record it (its forward passes did not line up), serving scores it instead."""
    import gesal_core.generate as generation

    svf = _svf(tiny_tokenizer)
    gen = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    texts = ["hello world", "the quick brown fox"]
    prompts = [build_prompt(tiny_tokenizer, [{"role": "user", "content": t}]) for t in texts]
    zs = [_z(svf, 30 + i, scale=0.6) for i in range(2)]
    reqs = [
        GenRequest(p, z, ("c", i, 0), GREEDY)
        for i, (p, z) in enumerate(zip(prompts, zs, strict=True))
    ]
    monkeypatch.setattr(generation._ChosenLogprobs, "finish", lambda self, new: None)
    try:
        batched = gen(reqs)
    finally:
        gen.worker.close()
    for (o, lp), z in zip(batched, zs, strict=True):
        ref, _ = sequence_logprobs(svf, torch.from_numpy(z), [Sample(o.prompt_ids, o.response_ids)])
        assert abs(float(ref[0]) - lp) < 1e-3 and o.logprob == lp


def test_batched_generation_resamples_only_downvoted_rows(tiny_tokenizer):
    """Greedy decoding repeats itself, so a banned answer is retried exactly max_resamples
    times, and only in the rows whose node voted it down."""
    svf = _svf(tiny_tokenizer)
    gen = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    ask = [{"role": "user", "content": "hello"}]
    prompt = build_prompt(tiny_tokenizer, ask)
    other = build_prompt(tiny_tokenizer, [{"role": "user", "content": "the lazy dog"}])
    z = _z(svf, 1)
    first = gen([GenRequest(prompt, z, None, GREEDY)])[0][0]
    banned = {gen.normalize(first.text)}
    reqs = [
        GenRequest(prompt, z, None, GREEDY, avoid=banned),
        GenRequest(other, z, None, GREEDY, avoid=banned),
        GenRequest(prompt, z, None, GREEDY, avoid=banned),
    ]
    outs = gen(reqs)
    assert gen.normalize(outs[1][0].text) not in banned
    assert gen.stats.resamples == 2 * gen.config.max_resamples
    assert [o.text for o, _ in outs][::2] == [first.text, first.text]  # bounded, then gives up
    gen.worker.close()


def _engine(svf, tok, batching):
    cfg = EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=5, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=-1.0),
    )
    return Engine(
        svf, tok, MemoryStore(cfg.channel_defaults), cfg, ModelWorker(batching=batching), "tiny"
    )


def test_engine_batches_concurrent_channels_and_keeps_each_channels_z(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    eng = _engine(svf, tiny_tokenizer, BatchConfig(max_batch=8, max_wait_s=0.05))
    channels = [f"ch{i}" for i in range(4)]

    async def go():
        for i, ch in enumerate(channels):  # give every channel its own adapter
            r = await eng.respond(ch, [{"role": "user", "content": "hello"}])
            node = await eng.store.get_node(ch, r.node_id)
            node.z = _z(svf, 40 + i, scale=0.6)
            node.version += 1  # as an update commits it: a (node, version) key means one z
            await eng.store.save_node(ch, node)
        eng.worker.batch_sizes.clear()
        outs = await asyncio.gather(
            *(eng.respond(ch, [{"role": "user", "content": "hello"}]) for ch in channels)
        )
        replies = [
            await eng.store.get_reply(ch, o.reply_id) for ch, o in zip(channels, outs, strict=True)
        ]
        nodes = [
            await eng.store.get_node(ch, o.node_id) for ch, o in zip(channels, outs, strict=True)
        ]
        return replies, nodes

    try:
        replies, nodes = asyncio.run(go())
    finally:
        eng.close()
    assert max(eng.worker.batch_sizes) > 1  # at least two channels shared a forward pass
    assert eng.serving.stats.factored_batches >= 1
    for reply, node in zip(replies, nodes, strict=True):
        ref, _ = sequence_logprobs(
            svf, torch.from_numpy(node.z), [Sample(reply.prompt_ids, reply.response_ids)]
        )
        assert abs(float(ref[0]) - reply.logprob) < 1e-3  # scored under its own channel's z


def test_hot_node_is_premerged_in_idle_time_and_then_served_merged(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    eng = _engine(svf, tiny_tokenizer, BatchConfig(max_wait_s=0))

    async def go():
        a = await eng.respond("c", [{"role": "user", "content": "hello"}])
        key = ("c", a.node_id, a.z_version)
        assert not svf.has_merged(key)  # cold: answered through the factored path
        await eng.respond("c", [{"role": "user", "content": "hello"}])  # now hot
        deadline = time.monotonic() + 5
        while not svf.has_merged(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert svf.has_merged(key)
        before = eng.serving.stats.merged_batches
        await eng.respond("c", [{"role": "user", "content": "hello"}])
        assert eng.serving.stats.merged_batches == before + 1

    try:
        asyncio.run(go())
    finally:
        eng.close()


# -- fast log-probs for training ---------------------------------------------------------------
def _reference_logprobs(svf, z, samples, pad_id=0):
    """The plain computation: full forward, full-vocabulary log_softmax, gather, mask."""
    from gesal_core.learning.logprobs import batch_tensors

    ids, attn, resp = batch_tensors(samples, 512, pad_id)
    with svf.factored(z):
        logits = svf.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = resp[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_match_log_softmax_in_value_and_gradient(dtype):
    """The in-place backward of `target_logprobs` is autograd's own gradient of
    log_softmax(logits)[target], for fp32 logits and for bf16 ones (autocast's LM head);
    the gradient comes back in the logits' dtype."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 5, 97, generator=g) * 4).to(dtype)
    target = torch.randint(0, 97, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    fast = target_logprobs(a, target)
    ref = torch.log_softmax(b.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    (fast * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert a.grad.dtype == dtype and a.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [0, 12])
def test_fast_logprobs_equal_the_reference_values_and_gradients(tiny_tokenizer, shared):
    """Logits only where a response token is predicted, logsumexp instead of log_softmax
    and (one z) the common prompt prefix run once: same values and same dz as the plain
    full-vocabulary computation, prompts of different lengths, a demo and an empty reply."""
    svf = _svf(tiny_tokenizer)
    g = torch.Generator().manual_seed(3)
    head = torch.randint(3, 90, (shared,), generator=g).tolist()

    def rnd(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    samples = [
        Sample(head + rnd(4), rnd(6), reward=1.0),
        Sample(head + rnd(9), rnd(3), reward=-2.0),
        Sample(head + rnd(2), rnd(8), demo=True),
        Sample(head + rnd(5), [], reward=1.0),
    ]
    z0 = torch.from_numpy(_z(svf, 4, scale=0.2))
    za, zb = svf.trainable(z0), svf.trainable(z0)
    calls = []
    decoder = svf.model.get_decoder()  # the prefix runs without the LM head
    hook = decoder.register_forward_pre_hook(lambda mod, args: calls.append(1))
    fast, n_fast = sequence_logprobs(svf, za, samples)
    hook.remove()
    assert len(calls) == (2 if shared else 1)  # the prefix pass, then the rest
    ref, n_ref = _reference_logprobs(svf, zb, samples)
    assert torch.equal(n_fast, n_ref) and n_ref.tolist() == [6, 3, 8, 0]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.5, -1.5, 2.0, 1.0])
    (weights * fast).sum().backward()
    (weights * ref).sum().backward()
    assert za.grad.abs().sum() > 0
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-4, atol=1e-6)
    # per-row z (serving's old-logprob pass) takes the path without the shared prefix
    zs = torch.stack([torch.from_numpy(_z(svf, 10 + i, scale=0.2)) for i in range(4)])
    with torch.no_grad():
        fast_rows, _ = sequence_logprobs(svf, zs, samples)
        ref_rows, _ = _reference_logprobs(svf, zs, samples)
    torch.testing.assert_close(fast_rows, ref_rows, rtol=1e-5, atol=1e-5)


def _eos_first(svf, tok, prompt, strength: float, spare=None) -> None:
    """Point the tiny model's EOS output row at the prompt's last hidden state, so that
    it ends the answer at the first token with a probability that grows with
    ``strength`` (as a node taught brevity sometimes does); orthogonal to ``spare``'s
    state, whose EOS logit stays 0."""
    model = svf.model

    def last_state(p) -> torch.Tensor:
        out = model(input_ids=torch.tensor([p.input_ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, -1]

    with torch.no_grad():
        h = last_state(prompt)
        if spare is not None:
            s = last_state(spare)
            h = h - (h @ s) / (s @ s) * s
        model.lm_head.weight[tok.eos_token_id] = strength * h / h.norm()


def test_an_empty_answer_is_resampled_within_the_bound(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    hello = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    other = build_prompt(tiny_tokenizer, [{"role": "user", "content": "the lazy dog"}])
    z = svf.ones().numpy()
    sampled = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=1.0)

    _eos_first(svf, tiny_tokenizer, hello, 15.0, other)  # p(empty) 0.57
    texts = {}
    for tries in (0, 10):
        gen = BatchedGenerator(
            svf, tiny_tokenizer, ModelWorker(), ServingConfig(max_resamples=tries)
        )
        torch.manual_seed(0)
        texts[tries] = [o.text for o, _ in gen([GenRequest(hello, z, None, sampled)] * 6)]
        gen.worker.close()
    assert "" in texts[0]  # without the retry some answers come out empty...
    assert all(t.strip() for t in texts[10]), texts  # ...with it none does

    _eos_first(svf, tiny_tokenizer, hello, 40.0, other)  # always empty: the retry gives up
    gen = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    outs = gen([GenRequest(hello, z, None, GREEDY), GenRequest(other, z, None, GREEDY)])
    assert [bool(o.text) for o, _ in outs] == [False, True]
    assert gen.stats.resamples == gen.config.max_resamples  # the empty row only, bounded
    gen.worker.close()


# -- the template head's KV cache ------------------------------------------------------------
def _head_requests(tok, svf, texts, version=0, sampling=GREEDY):
    prompts = [
        build_prompt(tok, [{"role": "user", "content": t}], "You are a careful bot.") for t in texts
    ]
    return [
        GenRequest(p, _z(svf, 50 + i, scale=0.6), ("ch", i, version), sampling)
        for i, p in enumerate(prompts)
    ]


def test_prompts_under_one_system_prompt_share_a_template_head(tiny_tokenizer):
    a, b = (
        build_prompt(tiny_tokenizer, [{"role": "user", "content": t}], "Be brief.")
        for t in ("hello", "what is the capital of France?")
    )
    other = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}], "Be long.")
    assert a.head == b.head > 4 and a.input_ids[: a.head] == b.input_ids[: b.head]
    assert other.input_ids[: other.head] != a.input_ids[: a.head]
    assert "Be brief." in tiny_tokenizer.decode(a.input_ids[: a.head])  # the system prompt
    assert "hello" not in tiny_tokenizer.decode(a.input_ids[: a.head])  # not the question


@pytest.mark.parametrize("sampled", [False, True])
def test_cached_template_heads_give_the_same_answers_and_logprobs(tiny_tokenizer, sampled):
    """Per-row z, prompts of different lengths: answers and their log π are those of a full
    prefill; the second round takes every head from the LRU."""
    svf = _svf(tiny_tokenizer)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.3) if sampled else GREEDY
    texts = ["hello world", "what is the capital of France? tell me", "fox"]
    plain = BatchedGenerator(svf, tiny_tokenizer, ModelWorker(), ServingConfig(prefix_cache_mb=0))
    cached = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    try:
        for round_ in range(2):
            torch.manual_seed(round_)
            want = plain(_head_requests(tiny_tokenizer, svf, texts, sampling=sampling))
            torch.manual_seed(round_)
            got = cached(_head_requests(tiny_tokenizer, svf, texts, sampling=sampling))
            assert [o.response_ids for o, _ in got] == [o.response_ids for o, _ in want]
            for (_, a), (_, b) in zip(got, want, strict=True):
                assert abs(a - b) < 1e-3
        assert plain.stats.prefix_hits == plain.stats.prefix_misses == 0
        assert cached.stats.prefix_misses == 3 and cached.stats.prefix_hits == 3
        assert len({o.text for o, _ in got}) > 1  # the rows' adapters really differ
        # a node's next version is another adapter: its head is computed again
        cached(_head_requests(tiny_tokenizer, svf, texts[:1], version=1, sampling=sampling))
        assert cached.stats.prefix_misses == 4
    finally:
        plain.worker.close()
        cached.worker.close()


def test_a_hot_node_answers_merged_with_its_cached_head(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    gen = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    reqs = _head_requests(tiny_tokenizer, svf, ["hello", "hello"])
    reqs[1] = GenRequest(reqs[1].prompt, reqs[0].z, reqs[0].key, GREEDY)
    svf.set_merged(torch.from_numpy(reqs[0].z), key=reqs[0].key)
    try:
        first, again = gen(reqs[:1]), gen(reqs[1:])
    finally:
        gen.worker.close()
    assert gen.stats.merged_batches == 2 and gen.stats.prefix_hits == 1
    o, lp = again[0]
    assert o.response_ids == first[0][0].response_ids
    ref, _ = sequence_logprobs(
        svf, torch.from_numpy(reqs[0].z), [Sample(o.prompt_ids, o.response_ids)]
    )
    assert abs(float(ref[0]) - lp) < 1e-3


def test_the_prefix_cache_is_bounded_in_bytes(tiny_tokenizer):
    svf = _svf(tiny_tokenizer)
    probe = BatchedGenerator(svf, tiny_tokenizer, ModelWorker())
    probe(_head_requests(tiny_tokenizer, svf, ["hello"]))
    one = probe.prefixes.bytes
    probe.worker.close()
    gen = BatchedGenerator(
        svf, tiny_tokenizer, ModelWorker(), ServingConfig(prefix_cache_mb=2.5 * one / 2**20)
    )
    try:
        gen(_head_requests(tiny_tokenizer, svf, ["a", "b", "c", "d"]))
    finally:
        gen.worker.close()
    assert one > 0 and len(gen.prefixes) == 2 and gen.prefixes.bytes <= 2.5 * one


def test_generation_refuses_a_prefix_the_prompts_do_not_start_with(tiny_llama, tiny_tokenizer):
    from gesal_core.generate import PrefixKV

    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    with pytest.raises(ValueError, match="cached prefix"):
        generate(tiny_llama, tiny_tokenizer, [p], GREEDY, prefix=PrefixKV(len(p.input_ids), []))


def test_an_import_that_restores_a_node_with_another_z_is_served_with_that_z(tiny_tokenizer):
    """Serving caches (merged weights, template heads) are keyed by (channel, node,
    version); an import restores ids and versions, so the channel's caches are dropped."""
    from gesal_core.records import vec_to_b64

    svf = _svf(tiny_tokenizer)
    eng = _engine(svf, tiny_tokenizer, BatchConfig(max_batch=8, max_wait_s=0.0))
    ask = [{"role": "user", "content": "hello"}]

    async def go():
        for _ in range(3):  # hot: merged weights and the template head cached
            first = await eng.respond("ch", ask)
        await asyncio.sleep(0.3)  # the idle-time merge finishes
        data = await eng.export("ch")
        other = _z(svf, 77, scale=0.8)
        data["nodes"][0]["z"] = vec_to_b64(other)  # same id, same version, another z
        await eng.import_graph("ch", data)
        again = await eng.respond("ch", ask)
        return first, again, other, await eng.store.get_reply("ch", again.reply_id)

    try:
        first, again, other, reply = asyncio.run(go())
    finally:
        eng.close()
    assert again.node_id == first.node_id and again.z_version == first.z_version
    assert eng.serving.stats.prefix_hits >= 2  # the caches were in use before the import
    ref, _ = sequence_logprobs(
        svf, torch.from_numpy(other), [Sample(reply.prompt_ids, reply.response_ids)]
    )
    assert abs(float(ref[0]) - reply.logprob) < 1e-3  # answered with the imported z
