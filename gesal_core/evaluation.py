"""Simulated communities and learning curves: does the bot really learn from votes?

A `Task` is a community: training prompts it asks, held-out prompts it never asks during
training, and the rule by which a member votes on an answer. A method (``none``,
``gesal``, ``svf-single``, ``lora``) runs the same loop under the same vote budget:

    repeat: ask `batch` training prompts -> one member votes on each answer
            -> train on the buffered votes
    at each checkpoint: answer the held-out prompts (without recording them) and measure
            compliance next to answer quality (on-topic rate, degenerate rate, reference NLL)

Learning typically starts only when the first 👍 arrives, so every figure is reported per
seed and as the median over seeds.

User tasks: ``--task path/to/file.py:Name`` where ``Name`` is a `Task` instance, or a
class / zero-argument function returning one. See the README for the interface.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import logging
import random
import re
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .embedding import PromptEmbedder
from .engine import Engine, EngineConfig
from .generate import SamplingConfig, build_prompt, generate, rng_kept
from .guard import UNRELATED_PROBES, GuardConfig, content_words, judge_answers, on_topic
from .learning import (
    Batch,
    LearningConfig,
    Sample,
    correction_sample,
    feedback_loss,
    plan_batch,
    prior_baseline,
    response_logprobs,
    sequence_logprobs,
    settle_scale,
    warm_up_compiled,
)
from .records import ChannelConfig
from .store import MemoryStore
from .svf import SVFModel
from .svf.precision import COMPUTE_DTYPES, ComputePrecision

log = logging.getLogger(__name__)
METHODS = ("none", "gesal", "svf-single", "lora")


_print_now = functools.partial(print, flush=True)  # progress lines reach a log file at once

LORA_LR = 1e-3  # Adam on LoRA A/B, persistent across updates (the usual LoRA set-up)


# -- tasks -------------------------------------------------------------------------------
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
# what the questions ask before reading runs' answers; one word ("food") came later, from
# a right answer the list missed ("Plants grow by making their own food.").
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

    Why not at the end (the member before 2026-12-02): most base answers run into the
    token limit, so an emoji after the last word sits where no answer of that length
    reaches, and the bot is taught a habit it cannot show. A cut-off single sentence
    gets it at the end.
    """
    text = answer.strip()
    end = re.search(r"[.!?][\"')]*(?=\s)", text)
    if end is None:
        return f"{text} 😊"
    return f"{text[: end.end()]} 😊{text[end.end() :]}"


def _shorten(question: str, answer: str) -> str:
    """What a member who wants brevity writes instead: the answer's sentence that says the
    most (content words beyond the question's; the first of equals), clipped to 15 words.

    Why not simply the first sentence (the member of every run before 2026-12-02): the
    base model's first sentences are often empty ("Cats purr due to a natural
    instinct."): on the base answers stored by four 3-seed runs (88% of them name a key
    fact), first sentences kept 50-54% and this member keeps 58-75%
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


def no_markdown() -> Task:
    def plain(p: str, a: str) -> bool:
        return bool(a.strip()) and not re.search(r"(\*\*|^#|^\s*(\d+\.|[-*•])\s)", a, re.M)

    return Task(
        "plain",
        "members want plain prose: no lists, headings or bold",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        plain,
        predict=lambda a: "plain" if plain("", a) else "md",
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


BUILTIN: dict[str, Callable[[], Task]] = {
    "brevity": brevity,
    "emoji": emoji,
    "opener": opener,
    "plain": no_markdown,
    "counting": counting,
    "two-cluster": two_cluster,
}


def load_task(spec: str) -> Task:
    """A built-in name, or ``path/to/file.py:Name`` (a Task, a class or a factory)."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"unknown task {spec!r}: use one of {sorted(BUILTIN)} or file.py:Name")
    module_path = Path(path)
    if not module_path.is_file():
        raise ValueError(f"task file not found: {module_path}")
    mod_spec = importlib.util.spec_from_file_location(
        f"gesal_user_task_{module_path.stem}", module_path
    )
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    obj = getattr(module, name, None)
    if obj is None:
        raise ValueError(f"{module_path} has no {name!r}")
    task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    return task if isinstance(task, Task) else _as_task(task, spec)


def _as_task(obj, spec: str) -> Task:
    """A user's task object as a `Task`: the four documented attributes are required,
    the optional ones (README, "Your own task") default, and a bad value is named."""
    missing = [a for a in ("name", "train", "heldout", "complies") if not hasattr(obj, a)]
    if missing:
        raise ValueError(
            f"{spec}: a task needs {', '.join(map(repr, missing))} (see README, 'Your own task')"
        )
    train, heldout = list(obj.train), list(obj.heldout)
    for label, prompts in (("train", train), ("heldout", heldout)):
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{spec}: {label!r} must be a non-empty list of non-empty strings")
    for attr in ("complies", "vote", "predict", "correct"):
        if getattr(obj, attr, None) is not None and not callable(getattr(obj, attr)):
            raise ValueError(f"{spec}: {attr!r} must be a function")
    level = getattr(obj, "constant_answer_level", None)
    return Task(
        name=str(obj.name),
        description=str(getattr(obj, "description", None) or f"a user task from {spec}"),
        train=train,
        heldout=heldout,
        complies=obj.complies,
        constant_answer=None if level is None else (lambda _prompts: float(level)),
        predict=getattr(obj, "predict", None),
        correct=getattr(obj, "correct", None),
        facts=getattr(obj, "facts", None),
        voter=getattr(obj, "vote", None),
    )


# -- learners: one interface over the compared methods -----------------------------------
class Learner:
    """What the loop needs from a method: answer, take votes, train."""

    async def ask(self, prompts: list[str], record: bool = True) -> list[tuple[str, str]]:
        """(handle, answer) per prompt; handles of recorded answers can be voted on."""
        raise NotImplementedError

    async def vote(self, handle: str, user: str, value: int) -> None:
        raise NotImplementedError

    async def correct(self, handle: str, user: str, text: str) -> bool:
        """Give a better answer as a demonstration; False if the method cannot use one."""
        return False

    async def train(self) -> dict:
        return {"updated": 0, "skipped": 0, "rolled_back": 0}

    async def isolation(self) -> float | None:
        """How far another channel moved since the run began (None: one shared adapter,
        nothing to isolate); see `EngineLearner.isolation`."""
        return None

    def current_z(self, prompt: str) -> torch.Tensor | None:
        return None

    def close(self) -> None:
        pass


OTHER_CHANNEL = "eval-other"  # the isolation check's second channel
OTHER_QUESTION = "What is the capital of Italy?"


class EngineLearner(Learner):
    """GESAL (graph + SVF) and svf-single (θ = -1: every prompt shares one node)."""

    def __init__(
        self,
        svf: SVFModel,
        tokenizer,
        engine_config: EngineConfig,
        single: bool,
        frozen: bool = False,
    ):
        defaults = engine_config.channel_defaults
        if single:
            defaults = ChannelConfig(
                threshold=-1.0, reward_up=defaults.reward_up, reward_down=defaults.reward_down
            )
        cfg = EngineConfig(**{**engine_config.__dict__, "channel_defaults": defaults})
        self.engine = Engine(svf, tokenizer, MemoryStore(defaults), cfg, model_name="eval")
        self.frozen = frozen
        self.channel = "eval"
        self._other: tuple[list[int], str, np.ndarray, int, torch.Tensor] | None = None

    async def ask(self, prompts, record=True):
        outs = await asyncio.gather(
            *[
                self.engine.respond(self.channel, [{"role": "user", "content": p}], record=record)
                for p in prompts
            ]
        )
        return [(o.reply_id, o.text) for o in outs]

    async def vote(self, handle, user, value):
        await self.engine.vote(self.channel, handle, user, value)

    async def isolation(self) -> float:
        """The two-channel isolation check, run beside every gesal and svf-single run.

        A second channel of the same engine asks one question when the run begins; at
        every checkpoint its node's next-token logits on that exchange are computed again.
        Returns the largest change in them, in its z or in its version: 0.0 when the
        community's votes left the other channel exactly as it was. The first call draws
        from the sampler, so it runs with the random state kept: adding the check changes
        no run's answers.
        """
        if self._other is None:
            with rng_kept(self.engine.svf.device):
                out = await self.engine.respond(
                    OTHER_CHANNEL, [{"role": "user", "content": OTHER_QUESTION}]
                )
            reply = await self.engine.store.get_reply(OTHER_CHANNEL, out.reply_id)
            ids = reply.prompt_ids + reply.response_ids
            node = await self.engine.store.get_node(OTHER_CHANNEL, out.node_id)
            logits = await self.engine.worker.run(self._logits, node.z, ids)
            self._other = (ids, node.node_id, node.z.copy(), node.version, logits)
            return 0.0
        ids, node_id, z0, version, before = self._other
        node = await self.engine.store.get_node(OTHER_CHANNEL, node_id)
        if node is None or node.version != version:
            return float("inf")  # the other channel's node was replaced or retrained
        now = await self.engine.worker.run(self._logits, node.z, ids)
        return max(float((now - before).abs().max()), float(np.abs(node.z - z0).max()))

    def _logits(self, z: np.ndarray, ids: list[int]) -> torch.Tensor:
        svf = self.engine.svf
        with torch.inference_mode(), svf.factored(torch.from_numpy(z)[None]):
            return svf.model(torch.tensor([ids], device=svf.device)).logits[0].float().cpu()

    async def correct(self, handle, user, text):
        await self.engine.correct(self.channel, handle, user, text)
        return True

    async def train(self):
        if self.frozen:
            return {"updated": 0, "skipped": 0, "rolled_back": 0}
        report = await self.engine.train(self.channel)
        counts = {s: report.count(s) for s in ("updated", "skipped", "rolled_back")}
        reasons = [r.reason for rs in report.channels.values() for r in rs]
        counts["settled"] = sum(r.startswith("settled") for r in reasons)
        counts["halved"] = sum(r.startswith("step halved") for r in reasons)
        return counts

    def close(self):
        self.engine.close()


class LoraLearner(Learner):
    """PEFT LoRA r=8 on the same modules, one adapter for the channel, trained by the same
    objective as gesal (`plan_batch` + `feedback_loss`: votes, corrections and replay of
    earlier liked answers and corrections), with a persistent Adam as LoRA usually is."""

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        tokenizer,
        engine_config: EngineConfig,
        target_leaves: list[str],
    ):
        from peft import LoraConfig, get_peft_model

        self.tokenizer = tokenizer
        self.cfg = engine_config
        with warnings.catch_warnings():
            # PEFT asks transformers a deprecated question (is_gradient_checkpointing);
            # the answer is right, the FutureWarning is noise in every LoRA run's output
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.model = get_peft_model(
                model_factory(),
                LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_leaves),
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=LORA_LR)
        # the same products as gesal's update (LearningConfig.compute_dtype), so the two
        # are compared on learning, not on arithmetic speed or rounding
        self.precision = ComputePrecision(self.model)
        self.baseline: float | None = None
        self.replies: dict[str, tuple[list[int], list[int], str]] = {}
        self.votes: dict[str, int] = {}
        self.corrections: list[Sample] = []  # new since the last training run
        self.history: list[Sample] = []  # liked answers and corrections, oldest first
        self.recent: list[float] = []  # the channel's last rewards, as a node's `recent`
        self.n = 0

    async def ask(self, prompts, record=True):
        built = [
            build_prompt(self.tokenizer, [{"role": "user", "content": p}], self.cfg.system)
            for p in prompts
        ]
        self.model.eval()
        outs = generate(self.model, self.tokenizer, built, self.cfg.sampling)
        result = []
        for p, o in zip(prompts, outs, strict=True):
            self.n += 1
            handle = f"lora-{self.n}"
            if record:
                self.replies[handle] = (o.prompt_ids, o.response_ids, p)
            result.append((handle, o.text))
        return result

    async def vote(self, handle, user, value):
        self.votes[handle] = value

    async def correct(self, handle, user, text):
        prompt_ids = self.replies[handle][0]
        ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        stop = [eos] if eos is not None else []  # as Engine.correct
        focus, said = self.cfg.learning.demo_focus, self.replies[handle][1]
        self.corrections.append(correction_sample(prompt_ids, said, list(ids) + stop, focus))
        return True

    async def train(self):
        lc = self.cfg.learning
        defaults = self.cfg.channel_defaults
        samples = []
        for handle, v in self.votes.items():
            prompt_ids, response_ids, _ = self.replies[handle]
            r = defaults.reward_up if v > 0 else defaults.reward_down
            samples.append(Sample(prompt_ids, response_ids, reward=r))
        new_demos = self.corrections
        liked = [Sample(s.prompt_ids, s.response_ids, demo=True) for s in samples if s.reward > 0]
        replay = list(reversed(self.history))[: lc.replay]
        self.votes, self.corrections = {}, []
        self.history += liked + new_demos
        if not samples and not new_demos:
            return {"updated": 0, "skipped": 0, "rolled_back": 0}
        if self.baseline is None:  # the same start as a fresh gesal node
            self.baseline = prior_baseline([s.reward for s in samples], defaults)
        plan = plan_batch(samples + new_demos, self.baseline, lc, replay)
        self.baseline = plan.baseline
        rewards = [s.reward for s in samples]
        scale = settle_scale(self.recent, rewards, bool(new_demos), lc)
        self.recent = (self.recent + rewards)[-self.cfg.recent_rewards :]
        if plan.skip or scale <= 0:
            return {"updated": 0, "skipped": 1, "rolled_back": 0, "settled": int(not plan.skip)}
        for group in self.opt.param_groups:  # the same settling as a gesal node
            # (the usual LoRA lr at most: `rejected_step` is gesal's own setting)
            group["lr"] = LORA_LR * min(scale, 1.0)
        pad = self.tokenizer.pad_token_id or 0
        self.model.train()
        adam_update(
            self.params, self.opt, plan, lc, lora_scorer(self.model, self.precision, lc, pad)
        )
        self.model.eval()
        return {"updated": 1, "skipped": 0, "rolled_back": 0}


def adam_update(
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    plan: Batch,
    lc: LearningConfig,
    score: Callable[[list[Sample]], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """One update of the LoRA baseline on a planned batch: ``lc.inner_steps`` steps of
    ``opt`` (kept across updates), each over every sample in passes of ``lc.micro_batch``
    as gesal's `reinforce_steps` takes them, with the same loss and clipping but no step
    bound, pull or guard. ``score`` gives the samples' summed log-probs and token counts
    under the adapter (`response_logprobs`). `bench.demo_fit` runs it on SVF's z too, to
    tell the update rule from the adapter."""
    n = len(plan.rl) + len(plan.demos)
    for _ in range(lc.inner_steps):
        opt.zero_grad()
        # passes of `micro_batch` samples, as gesal's update: the gradients add up to
        # the whole batch's, and memory stays that of one pass (one pass of all 24+
        # samples peaked at 8.8 GB RSS, which kept LoRA runs from running side by side)
        for _, part in plan.passes(lc.micro_batch):
            logp, ntok = score(part.rl + part.demos)
            weights = torch.ones(len(part.rl))
            feedback_loss(part, logp, ntok, weights, lc, total=n).backward()
        torch.nn.utils.clip_grad_norm_(params, lc.max_grad_norm)
        opt.step()


def lora_scorer(
    model: torch.nn.Module, precision: ComputePrecision, lc: LearningConfig, pad_id: int
) -> Callable[[list[Sample]], tuple[torch.Tensor, torch.Tensor]]:
    """`adam_update`'s ``score`` for a PEFT model: its products as gesal's update's."""

    def score(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        with precision(lc.compute_dtype):
            return response_logprobs(model, samples, lc.max_tokens, pad_id)

    return score


# -- the loop ----------------------------------------------------------------------------
@dataclass
class EvalConfig:
    task: str = "brevity"
    methods: tuple[str, ...] = ("none", "gesal", "lora")
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: int = 64
    checkpoints: tuple[int, ...] = (0, 16, 32, 64)
    batch: int = 8  # votes between training runs
    heldout: int = 12
    max_new_tokens: int = 48
    members: int = 5
    corrections: int = 0  # members correct the first N answers they vote down
    out: str = "eval-results"


@dataclass
class Checkpoint:
    votes: int
    compliance: float
    on_topic: float
    degenerate: float
    ref_nll: float
    predictions: dict
    samples: list[str]
    # median ‖z − 1‖₂ of the adapters that answered the held-out prompts (SVF methods;
    # None for lora and for results written before it was recorded)
    drift: float | None = None
    # share of answers naming a key fact of their question (`fact_rate`; None: no facts)
    facts: float | None = None
    # nodes of the channel's graph (gesal and svf-single; None for lora and older
    # results): how far routing splits the community's votes
    nodes: int | None = None
    # share of answers that comply *and* are on-topic *and* not degenerate (`sound_rate`):
    # issue 3 counts compliance bought with collapse as a miss, so this is the rate to
    # compare methods by. None: not judged yet (older results; `merge` judges them)
    sound: float | None = None
    # the guard's fixed unrelated probes ("prompt -> answer"), answered as a member asking
    # them would be: forgetting shows here first (None: older results)
    probes: list[str] | None = None
    # two-channel isolation: how far another channel's logits, z or version moved since the
    # run began (`EngineLearner.isolation`; 0.0 = exact; None for lora and older runs)
    isolation: float | None = None


@dataclass
class RunResult:
    task: str
    method: str
    seed: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    trains: int = 0  # training runs (each may update several nodes)
    updates: int = 0  # node updates committed
    skipped: int = 0
    settled: int = 0  # of the skipped: no step because the community was content
    rolled_back: int = 0
    halved: int = 0  # of the updates: committed at a fraction of the step (GuardConfig.backtrack)
    first_upvote: int | None = None
    corrections: int = 0
    seconds_per_vote: float = 0.0
    seconds_per_update: float = 0.0


def _checkpoint_line(task: str, method: str, seed: int, cp: Checkpoint) -> str:
    return (
        f"  {task}/{method}/seed {seed}: {cp.votes} votes -> compliance "
        f"{cp.compliance:.0%}, on-topic {cp.on_topic:.0%}, degenerate "
        f"{cp.degenerate:.0%}, ref NLL {cp.ref_nll:.2f}"
        + ("" if cp.facts is None else f", key facts {cp.facts:.0%}")
        + ("" if cp.drift is None else f", |z-1| {cp.drift:.2f}")
        + ("" if cp.nodes is None else f", {cp.nodes} node(s)")
    )


class Harness:
    """Holds the model once and runs every (method, seed) of a task on it."""

    def __init__(
        self,
        svf: SVFModel,
        tokenizer,
        engine_config: EngineConfig,
        model_factory: Callable[[], torch.nn.Module] | None = None,
    ):
        self.svf, self.tokenizer, self.cfg = svf, tokenizer, engine_config
        self.model_factory = model_factory
        self._ref: dict[tuple[str, ...], list[Sample]] = {}
        self._embedder = PromptEmbedder(svf, tokenizer)

    def learner(self, method: str) -> Learner:
        """A fresh learner for ``method``, as every run of it starts."""
        if method in ("none", "gesal"):
            return EngineLearner(
                self.svf, self.tokenizer, self.cfg, single=False, frozen=method == "none"
            )
        if method == "svf-single":
            return EngineLearner(self.svf, self.tokenizer, self.cfg, single=True)
        if method == "lora":
            if self.model_factory is None:
                raise ValueError("the lora method needs a model factory")
            leaves = sorted({n.rsplit(".", 1)[-1] for n in self.svf.layers})
            return LoraLearner(self.model_factory, self.tokenizer, self.cfg, leaves)
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")

    def reference(self, prompts: list[str]) -> list[Sample]:
        """The base model's greedy answers: reference NLL measures drift away from them."""
        key = tuple(prompts)
        if key not in self._ref:
            built = [
                build_prompt(self.tokenizer, [{"role": "user", "content": p}], self.cfg.system)
                for p in prompts
            ]
            with self.svf.factored(self.svf.ones().expand(len(built), -1)):
                outs = generate(
                    self.svf.model,
                    self.tokenizer,
                    built,
                    SamplingConfig(max_new_tokens=self.cfg.sampling.max_new_tokens, temperature=0),
                )
            self._ref[key] = [Sample(o.prompt_ids, o.response_ids) for o in outs]
        return self._ref[key]

    @torch.inference_mode()
    def quality(self, prompts: list[str], answers: list[str]) -> tuple[float, float]:
        """(on-topic rate, degenerate rate) of answers; see `on_topic` and `judge_answers`.

        Both are judged against the base model, never against the method being measured.
        """
        topical, bad = self.verdicts(prompts, answers)
        return float(np.mean(topical)), float(np.mean(bad))

    @torch.inference_mode()
    def verdicts(self, prompts: list[str], answers: list[str]) -> tuple[list[bool], list[bool]]:
        """Per answer: (on-topic, degenerate), the judgments `quality` averages."""
        refs = [
            self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
            for s in self.reference(prompts)
        ]
        q = self._embedder(prompts)
        a = self._embedder([x or "." for x in answers])
        sims = (q * a).sum(-1)
        topical = [
            on_topic(p, x, r, float(s))
            for p, x, r, s in zip(prompts, answers, refs, sims, strict=True)
        ]
        reasons = judge_answers(self.svf, self.tokenizer, prompts, answers, self.cfg.system)
        return topical, [r is not None for r in reasons]

    @torch.inference_mode()
    def _ref_nll(
        self, learner: Learner, prompts: list[str], nodes=None, threshold: float = 0.0
    ) -> tuple[float, float | None]:
        """Mean per-token NLL of the base model's own answers under the learned policy, and
        the median drift ‖z − 1‖ of the adapters that answer them (None for lora)."""
        from . import graph

        refs = self.reference(prompts)
        if isinstance(learner, LoraLearner):
            lp, n = response_logprobs(learner.model, refs, 512, self.tokenizer.pad_token_id or 0)
            return float(-lp.sum() / n.sum()), None
        engine = learner.engine  # type: ignore[attr-defined]
        index = graph.GraphIndex.build(nodes or [])
        by_id = {n.node_id: n for n in nodes or []}
        total, count, drifts = 0.0, 0, []
        for p, ref in zip(prompts, refs, strict=True):
            emb = engine._embed(p)
            route = graph.route(index, emb, threshold)
            z = (
                by_id[route.node_id].z
                if route.node_id
                else graph.initial_z(index, by_id, emb, self.svf.z_size)
            )
            drifts.append(float(np.linalg.norm(z - 1)))
            lp, n = sequence_logprobs(self.svf, torch.from_numpy(z), [ref])
            total += float(-lp[0])
            count += int(n[0])
        return total / max(count, 1), float(np.median(drifts))

    async def checkpoint(self, task: Task, learner: Learner, votes: int, seed: int) -> Checkpoint:
        prompts = task.heldout
        torch.manual_seed(10_000 + seed)
        answers = [a for _, a in await learner.ask(prompts, record=False)]
        compliance = float(
            np.mean([task.complies(p, a) for p, a in zip(prompts, answers, strict=True)])
        )
        nodes, threshold = None, 0.0
        if isinstance(learner, EngineLearner):  # model work stays on the engine's thread
            on_model_thread = learner.engine.worker.run
            nodes = await learner.engine.store.load_nodes(learner.channel)
            threshold = (await learner.engine.store.get_config(learner.channel)).threshold
        else:
            on_model_thread = asyncio.to_thread
        topical, bad = await on_model_thread(self.verdicts, prompts, answers)
        ref_nll, drift = await on_model_thread(self._ref_nll, learner, prompts, nodes, threshold)
        predict = task.predict or (lambda a: a.split()[0] if a else "-")
        preds = Counter(predict(a) for a in answers)
        with rng_kept(self.svf.device):  # the extra answers must not change the run's draws
            probes = [a for _, a in await learner.ask(list(UNRELATED_PROBES), record=False)]
        isolation = await learner.isolation()
        return Checkpoint(
            votes,
            compliance,
            float(np.mean(topical)),
            float(np.mean(bad)),
            ref_nll,
            dict(preds.most_common(6)),
            # every held-out answer, whole, so that the rates can be re-judged later: a
            # collapse shows in the words before it shows in a rate
            [f"{p}{SAMPLE_SEP}{a}" for p, a in zip(prompts, answers, strict=True)],
            drift,
            fact_rate(task, prompts, answers),
            None if nodes is None else len(nodes),
            sound_rate(task, prompts, answers, topical, bad),
            [f"{p}{SAMPLE_SEP}{a}" for p, a in zip(UNRELATED_PROBES, probes, strict=True)],
            isolation,
        )

    async def run(
        self,
        task: Task,
        method: str,
        seed: int,
        ec: EvalConfig,
        progress: Callable[[str], None] = _print_now,
        checkpointed: Callable[[RunResult], None] | None = None,
    ) -> RunResult:
        """One simulated community's run; ``checkpointed`` sees the run so far after every
        checkpoint (`gesal-bot eval` writes it out, so an hour-long run shows its answers
        as it goes and a stopped one keeps them)."""
        random.seed(seed)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        learner = self.learner(method)
        result = RunResult(task.name, method, seed)
        vote_time = update_time = 0.0
        votes = 0
        try:
            await learner.isolation()  # the other channel asks before this one's first vote
            if method == "none":  # the base model does not change: one checkpoint stands
                if ec.checkpoints:
                    base = await self.checkpoint(task, learner, 0, seed)
                    progress(_checkpoint_line(task.name, method, seed, base))
                    for c in sorted(ec.checkpoints):
                        result.checkpoints.append(Checkpoint(**{**asdict(base), "votes": c}))
                return result
            if 0 in ec.checkpoints:
                result.checkpoints.append(await self.checkpoint(task, learner, 0, seed))
                progress(_checkpoint_line(task.name, method, seed, result.checkpoints[-1]))
            while votes < ec.budget:
                prompts = [rng.choice(task.train) for _ in range(min(ec.batch, ec.budget - votes))]
                t0 = time.perf_counter()
                answers = await learner.ask(prompts)
                for (handle, answer), prompt in zip(answers, prompts, strict=True):
                    v = task.vote(prompt, answer)
                    if v > 0 and result.first_upvote is None:
                        result.first_upvote = votes + 1
                    user = f"member{rng.randrange(ec.members)}"
                    await learner.vote(handle, user, v)
                    fix = task.correct
                    if v < 0 and fix and result.corrections < ec.corrections:
                        # a member with nothing better to offer (a brevity member given an
                        # empty answer) just votes: the engine refuses an empty correction
                        better = fix(prompt, answer)
                        if better.strip():
                            result.corrections += int(await learner.correct(handle, user, better))
                    votes += 1
                vote_time += time.perf_counter() - t0
                t1 = time.perf_counter()
                counts = await learner.train()
                result.trains += 1
                update_time += time.perf_counter() - t1
                result.updates += counts["updated"]
                result.skipped += counts["skipped"]
                result.settled += counts.get("settled", 0)
                result.halved += counts.get("halved", 0)
                result.rolled_back += counts["rolled_back"]
                if votes in ec.checkpoints:
                    cp = await self.checkpoint(task, learner, votes, seed)
                    result.checkpoints.append(cp)
                    progress(_checkpoint_line(task.name, method, seed, cp))
                    if checkpointed:
                        checkpointed(result)
                else:  # checkpoints can be 64 votes (half an hour) apart: show the way there
                    progress(
                        f"  {task.name}/{method}/seed {seed}: {votes}/{ec.budget} votes, "
                        f"{result.updates} update(s), {result.skipped} skipped, "
                        f"{result.rolled_back} rolled back"
                    )
        finally:
            learner.close()
        result.seconds_per_vote = vote_time / max(votes, 1)
        result.seconds_per_update = update_time / max(
            result.updates + result.skipped + result.rolled_back, 1
        )
        return result


def summarise(results: list[RunResult], checkpoints: tuple[int, ...]) -> list[dict]:
    """Median over seeds per (method, checkpoint)."""
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        for c in checkpoints:
            cps = [cp for r in runs for cp in r.checkpoints if cp.votes == c]
            if not cps:
                continue
            drifts = [cp.drift for cp in cps if cp.drift is not None]
            facts = [cp.facts for cp in cps if cp.facts is not None]
            nodes = [cp.nodes for cp in cps if cp.nodes is not None]
            sound = [cp.sound for cp in cps if cp.sound is not None]
            rows.append(
                {
                    "method": method,
                    "votes": c,
                    "compliance": statistics.median(cp.compliance for cp in cps),
                    "on_topic": statistics.median(cp.on_topic for cp in cps),
                    "degenerate": statistics.median(cp.degenerate for cp in cps),
                    "ref_nll": statistics.median(cp.ref_nll for cp in cps),
                    "drift": statistics.median(drifts) if drifts else None,
                    "facts": statistics.median(facts) if facts else None,
                    "nodes": statistics.median(nodes) if nodes else None,
                    "sound": statistics.median(sound) if sound else None,
                    "per_seed": [round(cp.compliance, 3) for cp in cps],
                    "per_seed_sound": [
                        None if cp.sound is None else round(cp.sound, 3) for cp in cps
                    ],
                }
            )
    return rows


def markdown(task: Task, rows: list[dict], results: list[RunResult]) -> str:
    lines = [
        f"### Task `{task.name}`: {task.description}",
        "",
        "| method | votes | compliance (median) | per seed | sound (per seed) | on-topic "
        "| degenerate | key facts | ref NLL | ‖z−1‖ | nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{x:.0%}" for x in r["per_seed"])
        sound = "–"
        if r.get("sound") is not None:
            each = ", ".join("–" if x is None else f"{x:.0%}" for x in r["per_seed_sound"])
            sound = f"{r['sound']:.0%} ({each})"
        drift = "–" if r.get("drift") is None else f"{r['drift']:.2f}"
        facts = "–" if r.get("facts") is None else f"{r['facts']:.0%}"
        nodes = "–" if r.get("nodes") is None else f"{r['nodes']:g}"
        lines.append(
            f"| {r['method']} | {r['votes']} | {r['compliance']:.0%} | {seeds} | {sound} | "
            f"{r['on_topic']:.0%} | {r['degenerate']:.0%} | {facts} | {r['ref_nll']:.2f} "
            f"| {drift} | {nodes} |"
        )
    if task.constant_answer_level is not None:
        lines.append(f"\nA constant answer would score {task.constant_answer_level:.0%}.")
    lines.append(
        "\n*sound*: answers that comply **and** stay on-topic **and** are not degenerate, "
        "so compliance bought with collapse does not count."
    )
    lines.append(
        "\n| method | seed | first 👍 at vote | corrections | updates (halved) | "
        "skipped (settled) | rolled back | s/vote | s/update |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.method == "none":
            continue
        lines.append(
            f"| {r.method} | {r.seed} | {r.first_upvote or '-'} | {r.corrections} | "
            f"{r.updates} ({r.halved}) | "
            f"{r.skipped} ({r.settled}) | {r.rolled_back} | {r.seconds_per_vote:.2f} | "
            f"{r.seconds_per_update:.2f} |"
        )
    checked = [cp.isolation for r in results for cp in r.checkpoints if cp.isolation is not None]
    if checked:
        exact = "exact" if max(checked) == 0 else "**NOT exact**"
        lines.append(
            f"\nTwo-channel isolation ({len(checked)} checkpoints of the runs with a graph): "
            f"another channel's logits, z and version moved by at most {max(checked):g}: "
            f"{exact}."
        )
    lines.append("\nHeld-out answers at the last checkpoint (first seed of each method):\n")
    shown = set()
    for r in results:
        if r.method in shown or not r.checkpoints:
            continue
        shown.add(r.method)
        last = r.checkpoints[-1]
        lines.append(f"- **{r.method}** ({last.votes} votes), predictions {last.predictions}:")
        lines.extend(f"  - `{x[:160]}`" for x in last.samples)
        if last.probes:
            lines.append("  - unrelated probes:")
            lines.extend(f"    - `{x[:160]}`" for x in last.probes)
    return "\n".join(lines) + "\n"


def plot(task: Task, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("compliance", "held-out compliance"),
        ("sound", "compliant, on-topic, not degenerate"),
        ("on_topic", "on-topic rate"),
        ("degenerate", "degenerate rate"),
        ("facts", "answers naming a key fact"),
        ("ref_nll", "reference NLL (drift from the base model's answers)"),
    ]
    panels = [(k, t) for k, t in panels if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(r["votes"], r[key]) for r in rs if r.get(key) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("votes")
        if key != "ref_nll":  # rates; NLL is in nats per token
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if task.constant_answer_level is not None:
        axes[0].axhline(task.constant_answer_level, color="grey", linestyle="--", linewidth=1)
        axes[0].annotate("one constant answer", (0, task.constant_answer_level), fontsize=8)
    axes[0].legend()
    fig.suptitle(f"{task.name}: median of seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default="brevity",
        help=f"built-in task ({', '.join(BUILTIN)}) or path/to/file.py:Name",
    )
    p.add_argument(
        "--methods", default="none,gesal,lora", help=f"comma-separated, from {', '.join(METHODS)}"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (median over them)")
    p.add_argument("--budget", type=int, default=64, help="votes per run")
    p.add_argument("--checkpoints", default="0,16,32,64", help="vote counts to evaluate at")
    p.add_argument("--batch", type=int, default=8, help="votes between training runs")
    p.add_argument(
        "--corrections",
        type=int,
        default=0,
        help="members send a better answer for the first N answers they vote down",
    )
    p.add_argument("--heldout", type=int, default=12, help="held-out prompts used")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default="eval-results", help="folder for JSON, markdown and PNG")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        default=None,
        help="run nothing: merge eval-*.json files of one task (e.g. seeds run in parallel "
        "processes) into one table, JSON and plot in --out",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-guard", action="store_true", help="disable the collapse guard")
    p.add_argument(
        "--sampled-guard",
        action="store_true",
        help="the guard also judges sampled answers to its probes (GuardConfig.sampled)",
    )
    p.add_argument(
        "--guard-backtrack",
        type=int,
        default=GuardConfig().backtrack,
        help="halvings of a failed update's step tried before a rollback (GuardConfig.backtrack)",
    )
    learning = LearningConfig()
    p.add_argument("--optimizer", default=learning.optimizer, choices=["adam", "ngd"])
    p.add_argument("--lr", type=float, default=learning.lr, help="Adam lr, or NGD step (L2)")
    p.add_argument("--inner-steps", type=int, default=learning.inner_steps)
    p.add_argument("--max-step", type=float, default=learning.max_step, help="bound on |dz|")
    p.add_argument("--l2", type=float, default=learning.l2, help="pull of z towards ones")
    p.add_argument(
        "--demo-focus",
        type=float,
        default=learning.demo_focus,
        help="share of a correction's weight on the tokens it changed (0-1)",
    )
    p.add_argument(
        "--replay",
        type=int,
        default=learning.replay,
        help="earlier liked answers and corrections re-learnt per update (0: off)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="full-size steps however content the community is (see LearningConfig.settle)",
    )
    p.add_argument(
        "--rejected-step",
        type=float,
        default=learning.rejected_step,
        help="step multiple for a node whose recent votes are all 👎 (1: off; "
        "see LearningConfig.rejected_step)",
    )
    p.add_argument(
        "--max-drift",
        type=float,
        default=learning.max_drift,
        help="bound on a node's |z-1| (0: none)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default=learning.compute_dtype,
        help="dtype of an update's matrix products (auto: bf16 where this machine runs it "
        "faster; answers are always computed in the model's dtype)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run gesal's update passes under torch.compile (LearningConfig.compile; "
        "minutes of compiling first)",
    )
    p.add_argument("--threshold", type=float, default=None, help="routing θ (default: 0.15)")
    p.add_argument(
        "--round",
        type=int,
        default=EngineConfig.train_round,
        help="replies of the channel with new feedback before gesal and svf-single train "
        f"(EngineConfig.train_round, GESAL_TRAIN_ROUND; default {EngineConfig.train_round}; "
        "1: every training run trains all pending feedback; lora trains every run)",
    )
    p.add_argument(
        "--explore-max-temperature",
        type=float,
        default=EngineConfig.explore_max_temperature,
        help="sampling temperature of a node voted down (its base temperature: no exploring)",
    )
    p.add_argument(
        "--targets",
        choices=("mlp", "attention", "all"),
        default="mlp",
        help="weights SVF adapts (and the LoRA baseline with it; default: mlp)",
    )


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


SAMPLE_SEP = " -> "  # between the prompt and the answer in a checkpoint's samples


def split_samples(samples: list[str]) -> tuple[list[str], list[str]] | None:
    """(prompts, answers) of a checkpoint's stored samples; None when any lacks the
    separator (results written before answers were stored whole)."""
    pairs = [s.split(SAMPLE_SEP, 1) for s in samples]
    if not all(len(x) == 2 for x in pairs):
        return None
    return [q for q, _ in pairs], [a for _, a in pairs]


def _run_from_dict(d: dict, task: Task | None = None) -> RunResult:
    """A stored run; checkpoints written before key facts were measured get them judged
    from their stored answers (the same `fact_rate`, so old and new runs compare)."""
    cps = [Checkpoint(**c) for c in d.get("checkpoints", [])]
    for cp in cps:
        split = split_samples(cp.samples) if cp.facts is None and task is not None else None
        if split:
            cp.facts = fact_rate(task, *split)
    return RunResult(**{**d, "checkpoints": cps})


def write_results(out: Path, task: Task, results: list[RunResult], meta: dict) -> str:
    """The markdown table, JSON and PNG of a task's runs; returns the markdown."""
    checkpoints = tuple(sorted({cp.votes for r in results for cp in r.checkpoints}))
    rows = summarise(results, checkpoints)
    md = markdown(task, rows, results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{task.name}"
    (out / f"{stem}.md").write_text(md)
    payload = {
        **meta,
        "constant_answer_level": task.constant_answer_level,
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(task, rows, out / f"{stem}.png")
    return md


def _tasks_of(doc: dict) -> set[str | None]:
    """The task a results file is about: its config's, or (a merged file has no config of
    its own) the one its runs name."""
    task = doc.get("config", {}).get("task")
    return {task} if task else {r.get("task") for r in doc.get("runs", [])} or {None}


def judge_sound(
    results: list[RunResult],
    task: Task,
    harness: Harness,
    progress: Callable[[str], None] = _print_now,
) -> list[str]:
    """Fill in `Checkpoint.sound` where a stored run lacks it, from its stored answers.

    The verdicts are the ones a run makes (`Harness.verdicts`, base model), so old and new
    runs compare. Returns a line for every checkpoint whose re-judged on-topic or
    degenerate rate differs from the one recorded (rules changed since the run): its
    *sound* rate then follows today's rules, not the recorded rates.
    """
    notes = []
    for r in results:
        judged = 0
        for cp in r.checkpoints:
            split = split_samples(cp.samples) if cp.sound is None else None
            if not split:
                continue
            judged += 1
            topical, bad = harness.verdicts(*split)
            cp.sound = sound_rate(task, *split, topical, bad)
            now = (float(np.mean(topical)), float(np.mean(bad)))
            if not np.allclose(now, (cp.on_topic, cp.degenerate)):
                notes.append(
                    f"{r.method} seed {r.seed}, {cp.votes} votes: on-topic/degenerate "
                    f"recorded {cp.on_topic:.0%}/{cp.degenerate:.0%}, judged now "
                    f"{now[0]:.0%}/{now[1]:.0%}"
                )
        if judged:
            progress(f"  judged {r.method} seed {r.seed}: {judged} checkpoint(s)")
    return notes


def _max_new_tokens(docs: list[dict]) -> int:
    """The answer length the merged runs used (the base model's reference answers, which
    on-topic is judged against, are that long)."""
    configs = [d.get("config") for d in docs]
    configs += [m.get("config") for d in docs for m in d.get("merged_from", [])]
    lengths = {c["max_new_tokens"] for c in configs if c and "max_new_tokens" in c}
    if len(lengths) > 1:
        raise ValueError(f"the runs used different answer lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else EvalConfig.max_new_tokens


def merge(paths: list[str], out: str, harness: Callable[[int], Harness] | None = None) -> int:
    """`gesal-bot eval --merge`: one table from runs written by several processes.

    Runs written before the *sound* rate was recorded get it judged from their stored
    answers when ``harness`` (answer length -> a `Harness` on the base model) is given;
    it is only called if some checkpoint needs it, since that loads the model."""
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read eval results {p}: {exc}") from None
    tasks = {t for d in docs for t in _tasks_of(d)}
    if len(tasks) != 1:
        raise ValueError(f"the files are from different tasks: {sorted(map(str, tasks))}")
    task = load_task(tasks.pop())
    results = [_run_from_dict(r, task) for d in docs for r in d.get("runs", [])]
    asked = next(
        (s[0] for r in results for cp in r.checkpoints if (s := split_samples(cp.samples))), None
    )
    if asked:  # the held-out prompts the runs answered (`--heldout` may have cut the list)
        task.heldout = asked
    unjudged = sum(cp.sound is None for r in results for cp in r.checkpoints)
    if unjudged and harness is not None:
        _print_now(f"judging the stored answers of {unjudged} checkpoint(s) for the sound rate ...")
        for note in judge_sound(results, task, harness(_max_new_tokens(docs))):
            _print_now(f"  note: {note}")
    meta = {
        "merged_from": [
            {
                "file": str(p),
                "config": d.get("config"),
                "learning": d.get("learning"),
                "guard": d.get("guard"),
            }
            for p, d in zip(paths, docs, strict=True)
        ],
        "model": docs[0].get("model"),
    }
    md = write_results(Path(out), task, results, meta)
    print(md)
    print(f"written: {Path(out) / f'eval-{task.name}'}.json, .md, .png")
    return 0


def run(args: argparse.Namespace) -> int:
    """`gesal-bot eval`: run the harness and write results; returns an exit code."""
    from .model import load_model
    from .svf import SVFConfig

    def load():
        lm = load_model(args.model, device=args.device)
        return lm, SVFModel(lm.model, lm.name, SVFConfig(targets=args.targets))

    if getattr(args, "merge", None):

        def judge(max_new_tokens: int) -> Harness:
            lm, svf = load()
            sampling = SamplingConfig(max_new_tokens=max_new_tokens)
            return Harness(svf, lm.tokenizer, EngineConfig(sampling=sampling))

        return merge(args.merge, args.out, judge)

    ec = EvalConfig(
        task=args.task,
        methods=tuple(m.strip() for m in args.methods.split(",")),
        seeds=_ints(args.seeds),
        budget=args.budget,
        checkpoints=_ints(args.checkpoints),
        batch=args.batch,
        corrections=args.corrections,
        heldout=args.heldout,
        max_new_tokens=args.max_new_tokens,
        out=args.out,
    )
    bad = [m for m in ec.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use {', '.join(METHODS)}")
    task = load_task(ec.task)
    task.heldout = list(task.heldout)[: ec.heldout]
    channel = ChannelConfig() if args.threshold is None else ChannelConfig(args.threshold)
    cfg = EngineConfig(  # before the model loads: a bad setting fails at once
        sampling=SamplingConfig(max_new_tokens=ec.max_new_tokens),
        explore_max_temperature=args.explore_max_temperature,
        train_round=args.round,
        guard=GuardConfig(
            enabled=not args.no_guard,
            sampled=args.sampled_guard,
            backtrack=args.guard_backtrack,
        ),
        learning=LearningConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            inner_steps=args.inner_steps,
            max_step=args.max_step,
            l2=args.l2,
            demo_focus=args.demo_focus,
            replay=args.replay,
            settle=not args.no_settle,
            rejected_step=args.rejected_step,
            max_drift=args.max_drift,
            compute_dtype=args.compute_dtype,
            compile=args.compile,
        ),
        channel_defaults=channel,
    )
    lm, svf = load()

    def factory():
        return load_model(args.model, device=args.device, progress=False).model

    harness = Harness(svf, lm.tokenizer, cfg, model_factory=factory)
    if cfg.learning.compile and {"gesal", "svf-single"} & set(ec.methods):  # else: a stall
        print("compiling the update passes (minutes on a CPU) ...", flush=True)
        took = warm_up_compiled(svf, cfg.learning, lm.tokenizer.pad_token_id or 0)
        print(f"  {svf.compiled_passes.outcome(took)}", flush=True)
    out = Path(ec.out)
    stem = f"eval-{task.name}"
    meta = {
        "config": asdict(ec),
        "learning": asdict(cfg.learning),
        "guard": asdict(cfg.guard),
        # what "auto" chose on the machine that ran this (None: the model's own dtype)
        "update_products": str(
            svf.compute_precision.resolve(cfg.learning.compute_dtype) or lm.dtype
        ),
        "explore_max_temperature": cfg.explore_max_temperature,
        "train_round": cfg.train_round,
        "targets": args.targets,
        "z_size": svf.z_size,
        "model": lm.name,
    }
    results: list[RunResult] = []
    md = ""
    for method in ec.methods:
        for seed in ec.seeds:
            print(f"{task.name} / {method} / seed {seed} ...", flush=True)

            def so_far(partial: RunResult) -> None:
                write_results(out, task, [*results, partial], meta)

            # written after every checkpoint: a long comparison stopped part-way keeps what
            # it has, and its answers can be read while it runs
            results.append(asyncio.run(harness.run(task, method, seed, ec, checkpointed=so_far)))
            md = write_results(out, task, results, meta)
    print(md)
    print(f"written: {out / stem}.json, .md, .png")
    return 0
