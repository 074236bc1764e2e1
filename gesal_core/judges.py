"""Judging an answer's text: is it degenerate, does it address its question, does it
state a fact?

The rules here read text (and, for gibberish, the base model's NLL of it); running probes
on a candidate z and deciding whether its update stands is the guard's work
(`gesal_core.guard`). One set of rules serves the guard, the evaluation and the
re-judging of stored answers (`judge_answers`), so all three judge alike. Each rule
answers a collapse that a simulated community liked; the examples in the comments are
such answers (docs/learning.md, "Collapse guard").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .generate import build_prompt
from .learning import Sample, sequence_logprobs
from .svf import SVFModel

_REFUSAL = re.compile(
    r"\b(I can(?:'|no)t (?:help|assist|answer|provide)|I(?:'m| am) unable to|I'm sorry, but|"
    r"as an AI|I am an AI|"
    r"I'm an AI|my name is SmolLM|I am SmolLM|I'm SmolLM|trained by Hugging Face)\b",
    re.IGNORECASE,
)
# A repetition loop, any of:
# * one punctuation character six times running, or one word four times in a row; a word
#   starts with a letter, so "300,000,000,000,000 meters" (a real answer) is not a loop;
# * one letter or digit 16 times running: "The largest planet is approximately
#   9.9222222222222222222222222222222";
# * eight or more symbols in a row that are not ASCII punctuation, mixed or not: "Cats purr
#   because they need to relax. 🐖🐖🌱🌍🌈🌌🌊🌌🌌🌈🌊🌌" (three flags in a row, six characters,
#   pass);
# * one symbol, or a short group ("❤️" is two code points), six times over with spaces
#   between: "…helps them reproduce. 😊 😊 😊 😊 😊 😊 😊 😊", which the rules without spaces
#   miss.
_RUN = re.compile(
    r"([^\w\s])\1{5,}|(\w)\2{15,}|\b([^\W\d]\w*)(?:\W+\3\b){3,}|[^\w\s!-/:-@\[-`{-~]{8,}"
    r"|([^\w\s]{1,4}?)(?:\s+\4){5,}",
    re.IGNORECASE,
)
# A letter or digit of any script. An emoji run has none, and the base-model NLL rule
# does not see it: an emoji is several byte tokens of which all but the first are nearly
# certain, so "🏨🏨🔏⚕🐦❀ ✌🌬" (an answer to "How does the internet work?") averages below
# the gibberish bar.
_WORD_CHAR = re.compile(r"[^\W_]")
# An answer that is one question and nothing else asks instead of answering: "What is the
# capital of Japan?" -> "What is the capital of France?" (short, so a brevity community
# liked it; on topic by every measure).
_ONLY_QUESTION = re.compile(r"[^.!?\n]*\?+[\s\"')]*")
# ...but a statement that ends in a follow-up question has answered: "The largest planet
# in the universe is Neptune, but what about our solar system?" (the base model's answer
# too) is one sentence ending in "?", yet it opens with a clause that is not a question.
_WH = "what|how|why|who|whom|whose|where|when|which"
_AUX = "is|are|was|were|do|does|did|can|could|would|will|should|shall|may|might|have|has|had"
_STATEMENT_FIRST = re.compile(rf"\s*(?!(?:{_WH}|{_AUX})\b)[^,?]+,", re.IGNORECASE)
# Content words: 5-letter stems of words of 4+ letters, minus question boilerplate.
_STOP = frozenset(
    """what which when where does the this that these those with from into about your have
    there their they them than then also very just some more most such many much make made
    write tell describe explain give short poem story""".split()  # noqa: SIM905
)
_ROLES = frozenset({"syste", "user", "assis", "start"})  # chat-template markup, not content
_ABOUT_YOU = re.compile(r"\b(you|your|yourself)\b", re.IGNORECASE)  # "Who made you?"
# A question that asks for something new: "What is a volcano?", not "Is it Tokyo?" (where
# "Yes, Tokyo." restates it and answers) nor "Jupiter or Mars?" (where a word of the
# question is the answer).
_OPEN_QUESTION = re.compile(rf"\s*(?:{_WH})\b", re.IGNORECASE)
_CHOICE = re.compile(r"\bor\b", re.IGNORECASE)
RESTATE_MAX_WORDS = 5
# Words that add nothing to a restatement ("A volcano...", "Hmm, electricity.").
_FILLER = frozenset(
    """a an the is are was were be it its this that of in on at to by for and but so as with
    hmm hm oh ah um uh well""".split()  # noqa: SIM905
)
ON_TOPIC_MIN = 0.3  # centred cosine(question, answer); good answers measure 0.4-0.66
GIBBERISH_NLL = 4.0  # nats/token of an answer under the base model; fluent text is ~0.5-2
GIBBERISH_MIN_WORDS = 3


def content_words(text: str) -> set[str]:
    """The words that carry what a text is about, stemmed to five letters, so "Tokyo."
    and "Tokyo is" meet and "capital"/"capitals" match."""
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP}


def new_words(answer: str, question: str) -> set[str]:
    """Words of the answer that are neither in the question nor filler, numbers and short
    words included: "45" answers "What is 15 times 3?" in "15 times 3 is 45.", "ice"
    answers "What is a comet?" in "A comet is ice.", though neither is a `content_words`
    word."""
    asked = set(re.findall(r"\w+", question.lower()))
    stems = content_words(question)
    return {
        w
        for w in re.findall(r"\w+", answer.lower())
        if w not in asked and w not in _FILLER and w[:5] not in stems
    }


def template_words(tokenizer, system: str | None) -> frozenset[str]:
    """Content words the prompt template puts before every question: the system prompt,
    SmolLM2's default one ("You are a helpful AI assistant named SmolLM, trained by
    Hugging Face") when none is set. An answer made of these alone echoes the template."""
    ids = build_prompt(tokenizer, [{"role": "user", "content": "."}], system).input_ids
    return frozenset(content_words(tokenizer.decode(ids)) - _ROLES)


def on_topic(prompt: str, answer: str, reference: str, similarity: float) -> bool:
    """Does the answer address the question? Either it is close to it in the (centred)
    embedding, or it shares a content word with the question or with the base model's own
    answer ("Tokyo." answers "What is the capital of Japan?" through the reference)."""
    words = content_words(answer)
    return similarity >= ON_TOPIC_MIN or bool(
        words & (content_words(prompt) | content_words(reference))
    )


def _repeats(text: str, words: list[str]) -> bool:
    """A repetition loop: few distinct word trigrams, few distinct characters, or a run
    (`_RUN`)."""
    if len(words) >= 8:
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(set(trigrams)) / len(trigrams) < 0.5:
            return True
    if len(text) >= 12 and len(set(text.replace(" ", ""))) <= 3:
        return True
    return bool(_RUN.search(text))


def _echoes_template(said: set[str], question: str, template: frozenset[str]) -> bool:
    """The answer's content words are all the template's and none the question's, and the
    question did not ask about the bot (which may then describe itself)."""
    return bool(
        template
        and said
        and said <= template
        and not said & content_words(question)
        and not _ABOUT_YOU.search(question)
    )


def _restates(text: str, words: list[str], said: set[str], question: str) -> bool:
    """A few words, all the open question's own: "What is a volcano?" -> "A volcano..."."""
    return bool(
        said
        and len(words) <= RESTATE_MAX_WORDS
        and said <= content_words(question)
        and not new_words(text, question)
        and _OPEN_QUESTION.match(question)
        and not _CHOICE.search(question)
    )


def degenerate_reason(
    text: str,
    base_nll: float | None = None,
    question: str = "",
    template: frozenset[str] = frozenset(),
) -> str | None:
    """Why an answer is degenerate, or None. Conservative: flags only clear failures.

    ``base_nll`` (mean per-token NLL of the answer under the base model, see `base_nll`)
    catches fluent-looking gibberish such as "Absolutelyutely safely mistaken" that no
    string rule sees; a collapsed adapter produces text its own base model finds absurd.

    A short answer made only of the question's own words restates it: "What is a
    volcano?" answered "A volcano...", or "What is electricity?" answered "Hmm,
    electricity.", is short enough for a brevity community to like, and on topic by
    every measure that compares words or embeddings with the question.

    ``template`` (see `template_words`) catches an answer that only repeats the system
    prompt: "What is electricity?" answered "Hugging Face", two words a brevity community
    likes for being short, which no other rule sees.
    """
    words = text.split()
    if not words:
        return "empty"
    if _repeats(text, words):
        return "repetition loop"
    if not _WORD_CHAR.search(text):
        return "no words"
    if _REFUSAL.search(text):
        return "refusal or self-description"
    if _ONLY_QUESTION.fullmatch(text.strip()) and not _STATEMENT_FIRST.match(text):
        return "a question instead of an answer"
    said = content_words(text)
    if _echoes_template(said, question, template):
        return "echoes the system prompt (a self-description)"
    if _restates(text, words, said, question):
        return "restates the question without answering it"
    # Over one or two words the mean NLL measures how unusual it is to answer that briefly
    # ("Python!"), not whether the words make sense; a brevity community asks for exactly
    # that, so the rule needs a few words to judge.
    if base_nll is not None and base_nll > GIBBERISH_NLL and len(words) >= GIBBERISH_MIN_WORDS:
        return f"gibberish (base-model NLL {base_nll:.1f} nats/token)"
    return None


@torch.inference_mode()
def base_nll(
    svf: SVFModel, tokenizer, prompts: list[str], answers: list[str], system: str | None = None
) -> list[float]:
    """Mean per-token NLL of each answer under the base model (z = 1), given its prompt."""
    samples = []
    for p, a in zip(prompts, answers, strict=True):
        ids = build_prompt(tokenizer, [{"role": "user", "content": p}], system).input_ids
        resp = tokenizer(a, add_special_tokens=False)["input_ids"] if a.strip() else []
        samples.append(Sample(ids, resp or [tokenizer.eos_token_id or 0]))
    lp, n = sequence_logprobs(svf, svf.ones(), samples, pad_id=tokenizer.pad_token_id or 0)
    return [float(-x / max(int(k), 1)) for x, k in zip(lp, n, strict=True)]


def judge_answers(
    svf: SVFModel, tokenizer, prompts: list[str], answers: list[str], system: str | None = None
) -> list[str | None]:
    """`degenerate_reason` of each answer to its prompt, with every rule on: the base
    model's NLL and the words of the system prompt the answers ran under. One place for
    the evaluation and for re-judging stored answers, so both judge alike."""
    nll = base_nll(svf, tokenizer, prompts, answers, system)
    template = template_words(tokenizer, system)
    return [
        degenerate_reason(a, n, q, template) for q, a, n in zip(prompts, answers, nll, strict=True)
    ]


@dataclass(frozen=True)
class FactProbe:
    """Where the base model's answer to a probe states its fact: the answer up to it
    (``prefix``) and the fact as written there (``fact``)."""

    probe: str
    prefix: str
    fact: str


def stated_fact(probe: str, answer: str, fact: str | None) -> FactProbe | None:
    """Where ``answer`` states ``fact`` (case aside), or None where it does not: only a
    fact the base model states can be lost."""
    at = answer.lower().find(fact) if fact else -1
    if at < 0:
        return None
    return FactProbe(probe, answer[:at], answer[at : at + len(fact)])
