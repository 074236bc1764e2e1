"""Chat prompts, sampling and embeddings on a (possibly SVF-adapted) causal LM.

The token ids of each prompt and response are kept, not just their text: learning later
scores exactly the tokens that were sampled, so re-tokenising the text can never shift
the prompt/response boundary.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .config import SamplingConfig

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Prompt:
    """A chat rendered through the model's template, ready to generate from."""

    input_ids: list[int]
    messages: list[Message]
    dropped_turns: int = 0
    truncated_chars: int = 0
    # leading ids every chat under the same system prompt starts with (the template's
    # head): their KV cache depends only on the adapter, so serving can keep it per node
    head: int = 0

    @property
    def truncated(self) -> bool:
        return self.dropped_turns > 0 or self.truncated_chars > 0


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    response_ids: list[int]  # ends with the stop token when finished
    seconds: float = 0.0
    finished: bool = True  # False when max_new_tokens cut the answer short
    extra: dict = field(default_factory=dict)
    # log π(response | prompt) under the model that generated it: the sum over the
    # response ids of the raw logits' log-softmax (before temperature and top-p), i.e.
    # what `learning.sequence_logprobs` would score, without a second forward pass;
    # NaN when it could not be recorded
    logprob: float = math.nan


def _render(tokenizer, messages: list[Message]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def build_prompt(
    tokenizer,
    messages: Sequence[Message],
    system: str | None = None,
    max_prompt_tokens: int = 1024,
) -> Prompt:
    """Render a chat, dropping the oldest turns first until it fits the context window.

    The system message and the newest message are always kept; if the newest message
    alone is too long, its beginning is cut (the end of a message is usually the question).
    """
    if not messages:
        raise ValueError("a prompt needs at least one message")
    turns = [dict(m) for m in messages]
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    ids = _render(tokenizer, head + turns)
    while len(ids) > max_prompt_tokens and len(turns) > 1:
        turns.pop(0)
        dropped += 1
        ids = _render(tokenizer, head + turns)
    cut = 0
    if len(ids) > max_prompt_tokens:
        content = turns[-1]["content"]
        overflow = len(ids) - max_prompt_tokens
        content_ids = tokenizer(content, add_special_tokens=False)["input_ids"]
        keep = max(1, len(content_ids) - overflow - 1)
        new_content = tokenizer.decode(content_ids[-keep:])
        cut = len(content) - len(new_content)
        turns[-1] = {**turns[-1], "content": new_content}
        ids = _render(tokenizer, head + turns)
        while len(ids) > max_prompt_tokens and keep > 1:  # tokenisation is not additive
            keep = max(1, keep - max(1, len(ids) - max_prompt_tokens))
            turns[-1]["content"] = tokenizer.decode(content_ids[-keep:])
            cut = len(content) - len(turns[-1]["content"])
            ids = _render(tokenizer, head + turns)
    shared = _head_ids(tokenizer, system)
    return Prompt(
        input_ids=ids,
        messages=head + turns,
        dropped_turns=dropped,
        truncated_chars=cut,
        head=len(shared) if tuple(ids[: len(shared)]) == shared else 0,
    )


@functools.lru_cache(maxsize=64)
def _head_ids(tokenizer, system: str | None) -> tuple[int, ...]:
    """The ids two different one-message chats under ``system`` share from the start."""
    head = [{"role": "system", "content": system}] if system else []
    a = _render(tokenizer, [*head, {"role": "user", "content": "a"}])
    b = _render(tokenizer, [*head, {"role": "user", "content": "Zq 9"}])
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return tuple(a[:n])


@dataclass
class PrefixKV:
    """The KV cache of the first ``length`` ids every prompt of a batch shares, one row per
    prompt (each row computed under that row's adapter), per layer (keys, values).

    Why: a chat's template head (the system prompt; 24 of a short question's 42 ids for
    SmolLM2, as `bench.serving_batch` prints) is the same for every answer, so its KV
    cache depends only on the adapter. Serving keeps it per node, and a prompt's prefill
    shrinks to its own words. The batch is laid out as [head][left padding][rest]:
    padding sits after the shared head, and positions follow the attention mask, so every
    row sees the positions it would alone.
    """

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def rows(self, index: list[int]) -> PrefixKV:
        return PrefixKV(self.length, [(k[index], v[index]) for k, v in self.layers])

    def cache(self):
        """A fresh HF cache holding these keys and values (generation appends to it)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.layers):
            cache.update(k, v, i)
        return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of an HF cache, across transformers versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack without the LM head (None if the model does not say): a prefix's
    KV cache needs no logits, and the head's product over a 49k vocabulary is wasted."""
    get_decoder = getattr(model, "get_decoder", None)
    return get_decoder() if callable(get_decoder) else None


@functools.cache
def _cache_argument(model_type: type) -> str:
    """What this transformers calls a cache passed in: ``cache`` (5.x, which warns on the
    old name and drops it in 5.40) or ``past_key_values`` (looked up once per model class)."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for a forward or ``generate`` call, under the name this
    transformers takes. A PEFT wrapper's forward only has ``**kwargs``, so the name is
    looked up on the model it wraps."""
    get_base = getattr(model, "get_base_model", None)
    return {_cache_argument(type(get_base() if callable(get_base) else model)): cache}


def cache_of(output):
    """The KV cache a forward returned: ``output.cache`` in transformers 5.x, where
    ``past_key_values`` is a deprecated alias, else ``output.past_key_values``."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


class _ChosenLogprobs:
    """Records log π of every token `model.generate` picks, from the model's own logits.

    Why: the engine keeps each answer's log π for the importance weights of stale
    samples. Scoring it afterwards would be a second forward pass over prompt and answer,
    which makes answering 1.26–1.49x as long on a CPU (`bench.serving_logprob`). A
    forward hook sees the logits of each step; the token picked from them arrives as the
    next step's input (the last one is read from the output), so the log-softmax is
    gathered then. Raw logits, so temperature, top-p and repetition penalty do not change
    the score.
    """

    def __init__(self, model) -> None:
        get_base = getattr(model, "get_base_model", None)  # a PEFT model generates through it
        self.module = get_base() if callable(get_base) else model
        self.steps: list[torch.Tensor] = []
        self._logits: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> _ChosenLogprobs:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _take(self, chosen: torch.Tensor) -> None:
        logits, self._logits = self._logits, None
        if logits is not None:
            picked = logits.gather(-1, chosen.view(-1, 1).to(logits.device)).squeeze(-1)
            self.steps.append((picked - torch.logsumexp(logits, -1)).cpu())

    def _hook(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._take(ids[:, -1])
        self._logits = output.logits[:, -1, :].float()

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor | None:
        """(rows, new tokens) log-probs aligned with ``new_tokens``, the generated part of
        the output; None when the steps seen do not line up with it (a `generate` that
        runs its forward passes differently), and the caller must score another way."""
        if new_tokens.shape[1]:
            self._take(new_tokens[:, -1])
        if len(self.steps) != new_tokens.shape[1]:
            return None
        if not self.steps:
            return torch.zeros(new_tokens.shape[0], 0)
        return torch.stack(self.steps, dim=1)


def _stop_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return sorted(ids)


def rng_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Random draws inside leave the global generators (the CPU's and ``device``'s) as
    they were: extra samples, such as an evaluation's extra answers, change no one
    else's draws."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sample from ``seed`` without touching anyone else's random stream: the guard's
    seeded probes once reset the global generator after every training round, so every
    round's served answers drew the same random numbers."""
    if seed is None:
        yield
        return
    with rng_kept(device):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig | None = None,
    seed: int | None = None,
    prefix: PrefixKV | None = None,
) -> list[Generation]:
    """Generate one answer per prompt in a single left-padded batch.

    Which adapter is used is decided by the SVF state around this call (merged z, or a
    z per batch row through `SVFModel.factored`), so the same function serves both.
    ``prefix``: the KV cache of the ids all prompts start with, computed under the same
    adapters (see `PrefixKV`); only the rest of each prompt is prefilled.
    """
    sampling = sampling or SamplingConfig()
    if not prompts:
        return []
    device = next(model.parameters(), None)
    device = device.device if device is not None else next(model.buffers()).device
    shared = prefix.length if prefix is not None else 0
    if prefix is not None and any(
        len(p.input_ids) <= shared or p.input_ids[:shared] != prompts[0].input_ids[:shared]
        for p in prompts
    ):
        raise ValueError("every prompt must start with the cached prefix and go beyond it")
    width = max(len(p.input_ids) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        # [shared prefix][padding][rest of the prompt]: with no prefix, plain left padding
        input_ids[row, :shared] = torch.tensor(p.input_ids[:shared], dtype=torch.long)
        attention[row, :shared] = 1
        input_ids[row, width - len(p.input_ids) + shared :] = torch.tensor(p.input_ids[shared:])
        attention[row, width - len(p.input_ids) + shared :] = 1
    stops = _stop_ids(model, tokenizer)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stops or None,
        repetition_penalty=sampling.repetition_penalty,
    )
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
        )
    if prefix is not None:
        kwargs.update(cache_kwargs(model, prefix.cache()))
    start = time.perf_counter()
    with _seeded(seed, device), _ChosenLogprobs(model) as scores:
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
        )
    seconds = time.perf_counter() - start
    logprobs = scores.finish(out[:, width:].cpu())
    results = []
    for row, p in enumerate(prompts):
        new = out[row, width:].tolist()
        finished = False
        for i, tok in enumerate(new):
            if tok in stops:
                # the stop token stays in the ids: learning to *end* an answer (brevity,
                # a closing emoji) needs its log-prob in the policy gradient
                new, finished = new[: i + 1], True
                break
        while new and new[-1] == pad and pad not in stops:
            new.pop()
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        logprob = float(logprobs[row, : len(new)].sum()) if logprobs is not None else math.nan
        results.append(Generation(text, list(p.input_ids), new, seconds, finished, logprob=logprob))
    return results


@torch.inference_mode()
def embed(model, tokenizer, texts: Sequence[str], max_tokens: int = 256) -> torch.Tensor:
    """Unit-norm mean of the last hidden state over each text's tokens, shape (N, H).

    It runs the model as it currently stands; callers embed under the base z so that
    routing does not drift as adapters learn.
    """
    if not texts:
        raise ValueError("nothing to embed")
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    )
    device = next(model.buffers()).device
    out = model(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        output_hidden_states=True,
    )
    hidden = out.hidden_states[-1].float()
    mask = enc["attention_mask"].to(device).unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(mean, dim=-1).cpu()
