"""Simulated communities: the prompts a task asks, the vote its members give, and
the judges of answer quality (key facts, the sound rate) that every method is scored by."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..guard import content_words


@dataclass
class Task:
    """A simulated community. ``complies(prompt, answer)`` is what a member wants."""

    name: str
    description: str
    train: list[str]
    heldout: list[str]
    complies: Callable[[str, str], bool]
    # the best score of one constant answer on the given held-out prompts (counting: a
    # method that collapses to one number scores this, and it is no learning); a function
    # of the prompts, so that `--heldout N` cutting the list gets the level of what is left
    constant_answer: Callable[[list[str]], float] | None = None
    predict: Callable[[str], str] | None = None  # what the answer "says", for distributions
    correct: Callable[[str, str], str] | None = None  # a member's better answer, if any
    # key facts per held-out prompt: words of which a right answer names at least one
    facts: dict[str, tuple[str, ...]] | None = None
    # a member's vote other than "+1 if it complies, else -1" (a user task's own `vote`)
    voter: Callable[[str, str], int] | None = None

    def vote(self, prompt: str, answer: str) -> int:
        if self.voter is not None:
            return self.voter(prompt, answer)
        return 1 if self.complies(prompt, answer) else -1

    @property
    def constant_answer_level(self) -> float | None:
        return self.constant_answer(self.heldout) if self.constant_answer else None


QUESTIONS = [
    "What is the capital of Canada?",
    "Explain photosynthesis.",
    "How do vaccines work?",
    "What is a black hole?",
    "Why is the sky blue?",
    "How do I make tea?",
    "What is Python used for?",
    "What causes earthquakes?",
    "How does a rainbow form?",
    "What is the tallest mountain on Earth?",
    "Why do leaves change color in autumn?",
    "What is machine learning?",
    "How do airplanes fly?",
    "What is the water cycle?",
    "Why do we need sleep?",
    "What is inflation in economics?",
    "How do bees make honey?",
    "What is the speed of light?",
    "What is DNA?",
    "How does the heart pump blood?",
    "Why is the ocean salty?",
    "What are clouds made of?",
    "How do magnets work?",
    "What is gravity?",
]
HELDOUT_QUESTIONS = [
    "What is the capital of Japan?",
    "How do plants grow?",
    "What is a volcano?",
    "Why do cats purr?",
    "How does the internet work?",
    "What is electricity?",
    "What is the largest planet?",
    "How do fish breathe?",
    "What is climate change?",
    "Why is exercise healthy?",
    "What is a comet?",
    "How are mountains formed?",
]
# What a right answer to each held-out question names (one of them, as a word or a word's
# start, any case). Why: an answer can be short, fluent, on topic and empty or wrong
# ("Electricity is like magic in the moon's magic.", "The largest planet is Neptune.",
# "The plant grows."), and neither the on-topic nor the degenerate rate sees that. It is
# a floor on content, not a truth check: "Jupiter? No, Saturn." would pass. Written from
# what the questions ask, not from runs' answers, but for one word ("food") of a right
# answer the rest miss ("Plants grow by making their own food.").
_FACT_WORDS = {
    "What is the capital of Japan?": "tokyo",
    "How do plants grow?": (
        "photosynth, sunlight, light, water, nutrient, soil, root, seed, carbon dioxide, food"
    ),
    "What is a volcano?": "magma, lava, erupt, molten, vent, opening, crust, ash, mountain, ruptur",
    "Why do cats purr?": (
        "content, happ, relax, calm, vibrat, laryn, vocal, diaphragm, communicat, "
        "comfort, stress, pain"
    ),
    "How does the internet work?": (
        "network, computer, server, data, packet, protocol, connect, router, cable"
    ),
    "What is electricity?": "electron, charge, current, flow, energy, voltage, particle",
    "What is the largest planet?": "jupiter",
    "How do fish breathe?": "gill, oxygen",
    "What is climate change?": (
        "temperature, warming, greenhouse, carbon, emission, weather, fossil, heat"
    ),
    "Why is exercise healthy?": (
        "heart, muscle, weight, strength, strong, mood, stress, disease, blood, bone, "
        "energy, fitness, immun"
    ),
    "What is a comet?": "ice, icy, dust, tail, orbit, sun, rock, frozen, nucleus",
    "How are mountains formed?": (
        "tectonic, plate, crust, collid, collision, volcan, erosion, fold, uplift, magma"
    ),
}
KEY_FACTS: dict[str, tuple[str, ...]] = {q: tuple(w.split(", ")) for q, w in _FACT_WORDS.items()}


def states_fact(answer: str, facts: tuple[str, ...]) -> bool:
    """Does the answer name one of the facts (as a word or the start of one)?"""
    return any(re.search(rf"\b{re.escape(f)}", answer, re.IGNORECASE) for f in facts)


def sound_rate(
    task: Task, prompts: list[str], answers: list[str], topical: list[bool], bad: list[bool]
) -> float:
    """Share of answers that do what the community asks and are still answers: compliant,
    on-topic and not degenerate. A method that reaches its compliance by collapsing (one
    emoji repeated for every question) scores its compliance here minus the collapse."""
    good = [
        task.complies(p, a) and t and not b
        for p, a, t, b in zip(prompts, answers, topical, bad, strict=True)
    ]
    return float(np.mean(good))


def fact_rate(task: Task, prompts: list[str], answers: list[str]) -> float | None:
    """Share of answers that name a key fact of their question, over the prompts the task
    has facts for; None when it has none (creative prompts, counting, most own tasks)."""
    facts = getattr(task, "facts", None) or {}
    hits = [states_fact(a, facts[p]) for p, a in zip(prompts, answers, strict=True) if p in facts]
    return float(np.mean(hits)) if hits else None


CREATIVE = [
    "Write a short poem about autumn.",
    "Tell me a story about a dragon.",
    "Describe the ocean.",
    "Write a poem about the moon.",
    "Tell me a story about a robot.",
    "Describe a forest at night.",
    "Write a poem about rain.",
    "Tell me a story about a king.",
    "Describe a busy city street.",
    "Write a poem about friendship.",
    "Tell me a story about a lost cat.",
    "Describe a summer morning.",
]
CREATIVE_HELDOUT = [
    "Write a poem about the stars.",
    "Tell me a story about a pirate.",
    "Describe a snowy mountain.",
    "Write a poem about the sea.",
    "Tell me a story about a wizard.",
    "Describe a quiet library.",
]
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
WORDS = [
    "strawberry",
    "carrot",
    "mirror",
    "barrier",
    "error",
    "river",
    "current",
    "parrot",
    "territory",
    "arrow",
    "corridor",
    "horror",
    "drawer",
    "ferry",
    "orbit",
    "tractor",
    "rare",
    "bread",
    "cherry",
    "garden",
    "sorry",
    "terror",
    "word",
    "narrow",
]


def _words(text: str) -> int:
    return len(text.split())


def _first_int(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else "-"


_CLAUSE_END = re.compile(r",|;|:| - | which\b| but\b| and\b")


def _clip(sentence: str) -> str:
    """A sentence cut to at most 15 words, at its last clause boundary that leaves five
    or more ("Plants grow by using a process called photosynthesis."), else to 12 words."""
    words = sentence.split()
    if len(words) <= 15:
        return sentence
    head = " ".join(words[:15])
    cuts = [m.start() for m in _CLAUSE_END.finditer(head) if len(head[: m.start()].split()) >= 5]
    if cuts:
        return head[: cuts[-1]].rstrip(",;: ") + "."
    return " ".join(words[:12]).rstrip(",;:") + "."


def _add_emoji(question: str, answer: str) -> str:
    """What a member who wants an emoji writes instead: the same answer with a smiley
    after its first sentence.

    Why not at the end: most base answers run into the token limit, so an emoji after
    the last word sits where no answer of that length reaches, and the bot is taught a
    habit it cannot show. A cut-off single sentence gets it at the end.
    """
    text = answer.strip()
    end = re.search(r"[.!?][\"')]*(?=\s)", text)
    if end is None:
        return f"{text} 😊"
    return f"{text[: end.end()]} 😊{text[end.end() :]}"


def _shorten(question: str, answer: str) -> str:
    """What a member who wants brevity writes instead: the answer's sentence that says the
    most (content words beyond the question's; the first of equals), clipped to 15 words.

    Why not simply the first sentence: the base model's first sentences are often empty
    ("Cats purr due to a natural instinct."): on the base answers stored by four 3-seed
    runs (88% of them name a key fact), first sentences keep 50-54% and this member 58-75%
    (`scripts/rejudge_eval.py` prints it per run). A community that cuts content teaches
    the bot to drop it. A sentence cut off by the token limit counts only when it is the
    only one.
    """
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    if len(sentences) > 1 and not re.search(r"[.!?][\"')]*$", sentences[-1]):
        sentences = sentences[:-1]
    if not sentences:
        return answer
    asked = content_words(question)
    clipped = [_clip(s) for s in sentences]
    return max(clipped, key=lambda s: len(content_words(s) - asked))  # max keeps the first


def brevity() -> Task:
    return Task(
        "brevity",
        "members want answers of at most 15 words",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        lambda p, a: 0 < _words(a) <= 15,
        predict=lambda a: f"{min(_words(a) // 10 * 10, 50)}+ words",
        correct=_shorten,
        facts=KEY_FACTS,
    )


def emoji() -> Task:
    return Task(
        "emoji",
        "members want an emoji in every answer",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        lambda p, a: bool(_EMOJI.search(a)),
        predict=lambda a: "emoji" if _EMOJI.search(a) else "none",
        correct=_add_emoji,
        facts=KEY_FACTS,
    )


def opener() -> Task:
    return Task(
        "opener",
        "members want answers that start with 'Sure'",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        lambda p, a: a.strip().lower().startswith("sure"),
        predict=lambda a: (a.split() or ["-"])[0][:12],
        correct=lambda p, a: f"Sure! {a.strip()}",
        facts=KEY_FACTS,
    )


_MARKUP = re.compile(r"(\*\*|^#|^\s*(\d+\.|[-*•])\s)", re.M)


def _unformat(question: str, answer: str) -> str:
    """What a member who wants plain prose writes instead: the same words with bold,
    headings and list markers gone, the lines joined into sentences."""
    lines = []
    for line in answer.replace("**", "").splitlines():
        line = re.sub(r"^\s*(#+|\d+\.|[-*•])\s*", "", line).strip()
        if line:
            lines.append(line if re.search(r"[.!?:]$", line) else line + ".")
    return " ".join(lines) or answer


def no_markdown() -> Task:
    def plain(p: str, a: str) -> bool:
        return bool(a.strip()) and not _MARKUP.search(a)

    return Task(
        "plain",
        "members want plain prose: no lists, headings or bold",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        plain,
        predict=lambda a: "plain" if plain("", a) else "md",
        correct=_unformat,
        facts=KEY_FACTS,
    )


def counting() -> Task:
    def count_task(words: list[str]) -> list[str]:
        return [f"How many r's are in the word '{w}'?" for w in words]

    def answer(p: str) -> str:
        return str(re.search(r"'(\w+)'", p).group(1).count("r"))

    def correct(p: str, a: str) -> bool:
        return _first_int(a) == answer(p)

    def constant(prompts: list[str]) -> float:
        counts = Counter(answer(p) for p in prompts)
        return max(counts.values()) / len(prompts) if prompts else 0.0

    return Task(
        "counting",
        "the GESAL paper's task: count the r's in a word",
        count_task(WORDS[:16]),
        count_task(WORDS[16:]),
        correct,
        constant_answer=constant,
        predict=_first_int,
    )


def two_cluster() -> Task:
    """One channel, two prompt clusters wanting opposite things: routing must separate them."""
    creative = set(CREATIVE + CREATIVE_HELDOUT)

    def wants(p: str, a: str) -> bool:
        return _words(a) >= 30 if p in creative else 0 < _words(a) <= 15

    return Task(
        "two-cluster",
        "facts: <= 15 words; creative requests: >= 30 words",
        QUESTIONS[:12] + CREATIVE,
        # alternating, so that `--heldout N` keeps both clusters in equal parts
        [p for pair in zip(HELDOUT_QUESTIONS[:6], CREATIVE_HELDOUT, strict=True) for p in pair],
        wants,
        facts=KEY_FACTS,
    )
