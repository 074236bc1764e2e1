"""Shared fixtures: a tiny random Llama and a tiny tokenizer, built in-process.

Unit tests must run in seconds with no downloads, so the model and tokenizer are
constructed here from scratch. The tokenizer carries a ChatML template like SmolLM2's.
"""

from __future__ import annotations

import logging

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world how are you today",
    "what is the capital of France? Paris is the capital.",
    "Please answer briefly. Sure, here is a short answer!",
    "the quick brown fox jumps over the lazy dog 0123456789",
] * 4


@pytest.fixture(autouse=True)
def _restore_logging():
    """Tests that run the CLI or `configure_logging` install a stderr handler on the root
    logger; pytest closes that captured stream after the test, and later log calls then
    print "--- Logging error ---" tracebacks. Put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests get a private cache dir, so SVD caching is tested, never inherited.

    Slow tests share the user's cache (GESAL_CACHE_DIR or XDG): converting the bundled
    model takes ~30 s and its result is deterministic, so doing it once is enough.
    """
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("GESAL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_tokenizer():
    """Deterministic: subprocesses (crash tests) rebuild the very same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gesal_core.model import prepare_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    prepare_tokenizer(fast)
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
        initializer_range=0.3,  # sharp enough that greedy outputs differ per prompt and z
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


from .redis_server import make_redis_store, redis_client, redis_server, redis_url  # noqa: E402, F401


def assert_same_update_gradient(a, b, z0, ids) -> None:
    """Two SVF models that compute the same layers give an update the same gradient of z."""
    grads = []
    for s in (a, b):
        z = s.trainable(z0)
        with s.factored(z):
            s.model(ids).logits.logsumexp(-1).mean().backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
