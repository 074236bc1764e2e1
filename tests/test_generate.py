import pytest
import torch

from gesal_core.generate import SamplingConfig, build_prompt, embed, generate
from gesal_core.svf import SVFConfig, SVFModel

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0)


def test_prompt_uses_chat_template(tiny_tokenizer):
    p = build_prompt(
        tiny_tokenizer, [{"role": "user", "content": "hello world"}], system="be brief"
    )
    text = tiny_tokenizer.decode(p.input_ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert not p.truncated


def test_context_window_drops_oldest_turns_first(tiny_tokenizer):
    turns = [{"role": "user", "content": f"turn number {i} the quick brown fox"} for i in range(10)]
    full = build_prompt(tiny_tokenizer, turns, system="sys")
    limit = len(full.input_ids) // 2
    p = build_prompt(tiny_tokenizer, turns, system="sys", max_prompt_tokens=limit)
    assert len(p.input_ids) <= limit
    assert p.dropped_turns > 0 and p.truncated
    assert p.messages[0] == {"role": "system", "content": "sys"}
    assert p.messages[-1] == turns[-1]  # the newest turn survives
    kept = p.messages[1:]
    assert kept == turns[len(turns) - len(kept) :]  # contiguous, newest-first survival


def test_oversized_last_message_is_cut_to_fit(tiny_tokenizer):
    huge = "the quick brown fox jumps over the lazy dog " * 200
    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": huge}], max_prompt_tokens=64)
    assert len(p.input_ids) <= 64
    assert p.truncated_chars > 0
    assert huge.rstrip().endswith(p.messages[-1]["content"].strip()[-20:])


def test_empty_conversation_is_rejected(tiny_tokenizer):
    with pytest.raises(ValueError):
        build_prompt(tiny_tokenizer, [])


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0)])
def test_sampling_config_validates(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_greedy_is_deterministic_and_respects_max_tokens(tiny_llama, tiny_tokenizer):
    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    a = generate(tiny_llama, tiny_tokenizer, [p], GREEDY)[0]
    b = generate(tiny_llama, tiny_tokenizer, [p], GREEDY)[0]
    assert a.response_ids == b.response_ids
    assert 0 < len(a.response_ids) <= 8
    assert a.prompt_ids == p.input_ids


def test_finished_answer_keeps_its_stop_token_for_learning(tiny_llama, tiny_tokenizer):
    """The policy gradient must see the decision to stop, or brevity cannot be learned."""
    eos = tiny_tokenizer.eos_token_id
    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    free = generate(tiny_llama, tiny_tokenizer, [p], GREEDY)[0]
    assert eos not in free.response_ids and not free.finished  # runs to max_new_tokens

    boost = torch.zeros(tiny_llama.config.vocab_size)
    boost[eos] = 1e4  # after two tokens, stop
    calls = []

    def stop_third(_module, _inputs, logits):
        calls.append(1)
        return logits + boost if len(calls) >= 3 else logits

    handle = tiny_llama.lm_head.register_forward_hook(stop_third)
    try:
        out = generate(tiny_llama, tiny_tokenizer, [p], GREEDY)[0]
    finally:
        handle.remove()
    assert out.finished and len(out.response_ids) == 3 and out.response_ids[-1] == eos
    assert out.text == tiny_tokenizer.decode(out.response_ids[:2], skip_special_tokens=True).strip()


def test_sampling_with_seed_is_reproducible(tiny_llama, tiny_tokenizer):
    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [generate(tiny_llama, tiny_tokenizer, [p], cfg, seed=s)[0].response_ids for s in (1, 1)]
    assert runs[0] == runs[1]
    # a seeded call leaves everyone else's stream alone (the guard's seeded probes once
    # reset it after every training round, so every round served the same draws)
    assert torch.equal(torch.get_rng_state(), before)
    unseeded = [generate(tiny_llama, tiny_tokenizer, [p], cfg)[0].response_ids for _ in (1, 2)]
    assert unseeded[0] != unseeded[1]


def test_generate_with_per_row_z_matches_separate_runs(tiny_llama, tiny_tokenizer):
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    prompts = [
        build_prompt(tiny_tokenizer, [{"role": "user", "content": t}])
        for t in ("hello world", "what is the capital of France?", "fox")
    ]
    g = torch.Generator().manual_seed(0)
    zs = 1 + 0.8 * torch.randn(3, svf.z_size, generator=g)
    with svf.factored(zs):
        batched = generate(svf.model, tiny_tokenizer, prompts, GREEDY)
    separate = []
    for row, p in enumerate(prompts):
        svf.set_merged(zs[row])
        separate.append(generate(svf.model, tiny_tokenizer, [p], GREEDY)[0])
    assert [b.response_ids for b in batched] == [s.response_ids for s in separate]
    svf.set_merged(None)
    base = generate(svf.model, tiny_tokenizer, prompts, GREEDY)
    assert [b.response_ids for b in base] != [b.response_ids for b in batched]


def test_embed_is_unit_norm_and_discriminates(tiny_llama, tiny_tokenizer):
    e = embed(tiny_llama, tiny_tokenizer, ["hello world", "hello world", "0123456789 fox"])
    assert e.shape == (3, tiny_llama.config.hidden_size)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e[0], e[1], atol=1e-5)
    assert (e[0] @ e[2]) < 0.9999


def _scored(model, g) -> float:
    """log π of ``g``'s response, from one plain forward pass over prompt + response."""
    ids = torch.tensor([g.prompt_ids + g.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(picked[len(g.prompt_ids) - 1 :].sum())


def test_generation_records_each_answers_logprob_under_its_own_z(tiny_llama, tiny_tokenizer):
    """Sampled (temperature, top-p, repetition penalty), left-padded prompts of different
    lengths, a z per row: each recorded log π is the raw model's score of that answer."""
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    prompts = [
        build_prompt(tiny_tokenizer, [{"role": "user", "content": t}])
        for t in ("hi", "what is the capital of France? tell me more", "the quick fox")
    ]
    assert len({len(p.input_ids) for p in prompts}) == 3
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.7, top_p=0.8, repetition_penalty=1.3)
    g = torch.Generator().manual_seed(3)
    zs = 1 + 0.6 * torch.randn(3, svf.z_size, generator=g)
    with svf.factored(zs):
        outs = generate(svf.model, tiny_tokenizer, prompts, cfg, seed=5)
    for row, out in enumerate(outs):
        svf.set_merged(zs[row])
        ref = _scored(svf.model, out)
        assert out.response_ids and ref < -1.0  # a real score, not a default
        assert abs(out.logprob - ref) < 1e-3 * max(1.0, abs(ref))


def test_a_finished_answer_is_scored_up_to_its_stop_token(tiny_llama, tiny_tokenizer):
    """Rows that stop early are padded in the output; padding is not in their score."""
    eos = tiny_tokenizer.eos_token_id
    prompts = [
        build_prompt(tiny_tokenizer, [{"role": "user", "content": t}]) for t in ("hello", "fox")
    ]
    calls = []

    def stop_row_zero(_module, _inputs, logits):
        calls.append(1)
        if len(calls) == 2:  # the second token of row 0 is its stop token
            logits = logits.clone()
            logits[0, -1, eos] = 1e4
        return logits

    handle = tiny_llama.lm_head.register_forward_hook(stop_row_zero)
    try:
        outs = generate(tiny_llama, tiny_tokenizer, prompts, GREEDY)
    finally:
        handle.remove()
    assert outs[0].finished and len(outs[0].response_ids) == 2
    assert not outs[1].finished and len(outs[1].response_ids) == 8
    assert abs(outs[1].logprob - _scored(tiny_llama, outs[1])) < 1e-3
    # row 0's stop token was forced (log π ≈ 0 there under the boost); its first token is not
    first = outs[0].__class__(**{**outs[0].__dict__, "response_ids": outs[0].response_ids[:1]})
    assert abs(outs[0].logprob - _scored(tiny_llama, first)) < 1e-3


def test_a_peft_model_generates_and_records_its_logprob(tiny_llama, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    p = build_prompt(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    out = generate(model, tiny_tokenizer, [p], GREEDY)[0]
    assert abs(out.logprob - _scored(model, out)) < 1e-3
