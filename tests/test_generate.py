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
    runs = [generate(tiny_llama, tiny_tokenizer, [p], cfg, seed=s)[0].response_ids for s in (1, 1)]
    assert runs[0] == runs[1]


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
