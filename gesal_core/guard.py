"""Forgetting and collapse guard: is the model still itself after an update?

Reward compliance alone happily buys collapse ("A: A: A:" loops, refusals, "I am
SmolLM" self-descriptions), and reference NLL barely moves when it happens. So after
each update the node's z answers a few probe prompts greedily, and the update is rolled
back if, compared with the base model on the same probes:

* more answers are degenerate (empty, repetition loops, refusals, self-descriptions,
  echoes of the system prompt), or
* answers stop addressing the question: more answers than the base model's share no
  content word with their question or the base answer and sit far from the question in
  the centred embedding (`on_topic`), or the mean question/answer similarity drops by
  more than ``max_topic_drop``, or
* facts the base model states are no longer known (``FACTS``, a dozen short questions
  scored in one teacher-forced pass; ``min_facts_lost`` of those the base model is sure
  of): the probability of the fact ("Paris") right where the base model's own answer
  states it ("The capital of France is") falls by more than ``max_fact_drop`` nats.
  Knowledge, not wording, is checked: the base model's two likeliest first tokens for
  the France probe are nearly tied, "The capital …" and "L'Étoile, la …" (French, no
  Paris), so a check on the greedy string would roll back harmless updates, while this
  one counts "The capital of France is Lyon" as a lost fact. One lost fact alone
  passes: docs/learning.md, "Fact probes".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .embedding import PromptEmbedder
from .errors import GesalError
from .generate import SamplingConfig, build_prompt, embed, generate
from .svf import SVFModel

UNRELATED_PROBES = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 15 times 3?",
)
# Facts the base model states, by question: lost only counts where its greedy answer has
# them. Two are unrelated probes, answered in full after every update; the rest are only
# scored (teacher-forced, one pass for all), so each costs a row, not a generation. They
# are short facts the bundled model gets right, from topics the evaluation's held-out
# questions do not ask about. Why more than one: a brevity community's nodes can answer
# "What is the largest planet?" with "Neptune" and "Why do cats purr?" with "because they
# need to eat" while France is still "Paris".
FACTS = {
    "What is the capital of France?": "paris",
    "What is 15 times 3?": "45",
    "What is the chemical symbol for water?": "h2o",
    "What is the largest ocean on Earth?": "pacific",
    "How many days are in a week?": "7",
    "What is the boiling point of water?": "100",
    "Who painted the Mona Lisa?": "leonardo",
    "What language is spoken in Brazil?": "portuguese",
    "What is the currency of the United Kingdom?": "pound",
    "What is the main gas in the air we breathe?": "nitrogen",
    "Who discovered penicillin?": "fleming",
    "What is the opposite of hot?": "cold",
}


@dataclass(frozen=True)
class FactProbe:
    """Where the base model's answer to a probe states its fact: the answer up to it
    (``prefix``) and the fact as written there (``fact``)."""

    probe: str
    prefix: str
    fact: str


def fact_probes(probes: list[str], base_answers: list[str]) -> list[FactProbe]:
    """The `FACTS` the base model states in its answers (only those can be lost)."""
    out = []
    for p, answer in zip(probes, base_answers, strict=True):
        fact = FACTS.get(p)
        at = answer.lower().find(fact) if fact else -1
        if at >= 0:
            out.append(FactProbe(p, answer[:at], answer[at : at + len(fact)]))
    return out


_REFUSAL = re.compile(
    r"\b(I can(?:'|no)t (?:help|assist|answer|provide)|I(?:'m| am) unable to|I'm sorry, but|"
    r"as an AI|I am an AI|"
    r"I'm an AI|my name is SmolLM|I am SmolLM|I'm SmolLM|trained by Hugging Face)\b",
    re.IGNORECASE,
)


# a punctuation run, or one word four times in a row; a word must start with a letter, so
# "300,000,000,000,000 meters" (a real answer a real run rolled back) is not a loop
# ...but one character 16 times running is a loop whatever it is: a LoRA brevity run
# answered "The largest planet is approximately 9.9222222222222222222222222222222".
# ...and so is a run of eight or more symbols that are not ASCII punctuation, mixed or
# not: an emoji run's answers ended "Cats purr because they need to relax. 🐖🐖🌱🌍🌈🌌🌊🌌🌌🌈🌊🌌"
# (its members liked it: it has an emoji). Three flags in a row (six characters) pass.
# ...and so is one symbol (or a short group: "❤️" is two code points) six times over with
# spaces between: an emoji run ended its answers "…helps them reproduce.
# 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊 😊", which the rules without spaces miss.
_RUN = re.compile(
    r"([^\w\s])\1{5,}|(\w)\2{15,}|\b([^\W\d]\w*)(?:\W+\3\b){3,}|[^\w\s!-/:-@\[-`{-~]{8,}"
    r"|([^\w\s]{1,4}?)(?:\s+\4){5,}",
    re.IGNORECASE,
)
# A letter or digit of any script. An emoji run has none, and the base-model NLL rule
# does not see it: an emoji is several byte tokens of which all but the first are nearly
# certain, so "🏨🏨🔏⚕🐦❀ ✌🌬" (the start of an emoji run's held-out answer to "How does
# the internet work?") averages below the gibberish bar.
_WORD_CHAR = re.compile(r"[^\W_]")
# An answer that is one question and nothing else asks instead of answering: "What is the
# capital of Japan?" -> "What is the capital of France?" was where a brevity run's node
# ended up after 128 votes (short, so the community liked it; on topic by every measure).
_ONLY_QUESTION = re.compile(r"[^.!?\n]*\?+[\s\"')]*")
# ...but a statement that ends in a follow-up question has answered: "The largest planet
# in the universe is Neptune, but what about our solar system?" (a real run's answer, and
# the base model's too) is one sentence ending in "?", yet it opens with a clause that is
# not a question.
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


def content_words(text: str) -> set[str]:
    """The words that carry what a text is about, stemmed to five letters, so "Tokyo."
    and "Tokyo is" meet and "capital"/"capitals" match."""
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP}


def new_words(answer: str, question: str) -> set[str]:
    """Words of the answer that are neither in the question nor filler, numbers and short
    words included: "45" answers "What is 15 times 3?" in "15 times 3 is 45.", "ice"
    answers "What is a comet?" in "A comet is ice.", though neither is a `content_words`
    word (a real run's guard rolled back an update for "15 times 3 is 45.")."""
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


ON_TOPIC_MIN = 0.3  # centred cosine(question, answer); good answers measured 0.4-0.66


def on_topic(prompt: str, answer: str, reference: str, similarity: float) -> bool:
    """Does the answer address the question? Either it is close to it in the (centred)
    embedding, or it shares a content word with the question or with the base model's own
    answer ("Tokyo." answers "What is the capital of Japan?" through the reference)."""
    words = content_words(answer)
    return similarity >= ON_TOPIC_MIN or bool(
        words & (content_words(prompt) | content_words(reference))
    )


GIBBERISH_NLL = 4.0  # nats/token of an answer under the base model; fluent text is ~0.5-2
GIBBERISH_MIN_WORDS = 3


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

    A short answer made only of the question's own words restates it: a brevity run's
    node answered "What is a volcano?" with "A volcano..." and "What is electricity?"
    with "Hmm, electricity." after 128 votes, short enough to be liked, and on topic by
    every measure that compares words or embeddings with the question.

    ``template`` (see `template_words`) catches an answer that only repeats the system
    prompt: a brevity run's nodes answered "What is electricity?" with "Hugging Face",
    two words the community liked for being short, and no other rule saw it.
    """
    words = text.split()
    if not words:
        return "empty"
    if len(words) >= 8:
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(set(trigrams)) / len(trigrams) < 0.5:
            return "repetition loop"
    if len(text) >= 12 and len(set(text.replace(" ", ""))) <= 3:
        return "repetition loop"
    if _RUN.search(text):
        return "repetition loop"
    if not _WORD_CHAR.search(text):
        return "no words"
    if _REFUSAL.search(text):
        return "refusal or self-description"
    if _ONLY_QUESTION.fullmatch(text.strip()) and not _STATEMENT_FIRST.match(text):
        return "a question instead of an answer"
    said = content_words(text)
    if (
        template
        and said
        and said <= template
        and not said & content_words(question)
        and not _ABOUT_YOU.search(question)  # asked about itself, it may describe itself
    ):
        return "echoes the system prompt (a self-description)"
    if (
        said
        and len(words) <= RESTATE_MAX_WORDS
        and said <= content_words(question)
        and not new_words(text, question)
        and _OPEN_QUESTION.match(question)
        and not _CHOICE.search(question)
    ):
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
    from .learning import Sample, sequence_logprobs

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


@dataclass
class ProbeResult:
    answers: list[str]
    degenerate: int
    topic: float  # mean cosine(question, answer) under the base embedding
    reasons: list[str] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)  # centred, per answer (`on_topic`)


@dataclass
class GuardVerdict:
    ok: bool
    reason: str
    base: ProbeResult
    candidate: ProbeResult


@dataclass(frozen=True)
class GuardConfig:
    """When an update is rolled back (docs/learning.md, "Collapse guard")."""

    enabled: bool = True
    max_new_tokens: int = 32  # length of a greedy probe answer
    max_extra_degenerate: int = 0  # degenerate answers allowed beyond the base model's
    max_topic_drop: float = 0.15  # allowed drop of the mean question/answer similarity
    # Off-topic answers allowed beyond the base model's: answers that share no content
    # word with their question or the base answer and sit far from the question
    # (`on_topic`, the evaluation's own measure).
    max_extra_off_topic: int = 0
    related_probes: int = 4  # the node's most recent prompts asked as probes
    # A fact is lost when log p(fact | the base answer up to it) falls by more than this
    # (ln 4: the candidate finds it four times less likely than the base model does).
    max_fact_drop: float = 1.386
    # Only facts the base model states with at least this log p count: less certain ones
    # shift with style, not with forgetting (docs/learning.md, "Fact probes").
    min_fact_logprob: float = -0.7
    # Lost facts that fail an update; a single lost fact is mostly a style shift
    # (docs/learning.md, "Fact probes").
    min_facts_lost: int = 2
    # Also answer the probes by sampling, as replies are served (the engine's temperature
    # and top-p, seed `sample_seed`), and judge those answers by the same rules. Off by
    # default: a generation pass of served length per training round (docs/learning.md,
    # "Sampled probes").
    sampled: bool = False
    sample_seed: int = 0
    # Halvings of a failed update's step to try before it is rolled back; 0: roll back at
    # once. For experiments: it learns no sooner (docs/learning.md, "Tried and rejected").
    backtrack: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.backtrack <= 8:
            raise GesalError(f"backtrack must be between 0 and 8 halvings, got {self.backtrack}")
        if self.min_facts_lost < 1:
            raise GesalError(f"min_facts_lost must be at least 1, got {self.min_facts_lost}")


class Guard:
    def __init__(
        self,
        svf: SVFModel,
        tokenizer,
        config: GuardConfig | None = None,
        system: str | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.svf, self.tokenizer = svf, tokenizer
        self.config = config or GuardConfig()
        self.system = system
        self.sampling = sampling or SamplingConfig()  # how replies are served
        self.template = template_words(tokenizer, system)
        self.embedder = PromptEmbedder(svf, tokenizer)
        self._base_cache: dict[tuple[tuple[str, ...], bool], ProbeResult] = {}
        self._facts: list[FactProbe] | None = None  # `known_facts`
        self._fact_base: list[float] = []

    def probes_for(self, related: list[str]) -> list[str]:
        seen, out = set(), []
        for p in list(related)[-self.config.related_probes :] + list(UNRELATED_PROBES):
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    @torch.inference_mode()
    def run_many(
        self, zs: list[torch.Tensor | None], probe_lists: list[list[str]], sampled: bool = False
    ) -> list[ProbeResult]:
        """Answer each probe list under its z, all rows in one batched factored pass:
        greedily, or ``sampled`` as replies are served (with the guard's fixed seed, so a
        verdict can be reproduced)."""
        rows = [(i, p) for i, probes in enumerate(probe_lists) for p in probes]
        if not rows:
            return []
        prompts = [
            build_prompt(self.tokenizer, [{"role": "user", "content": p}], self.system)
            for _, p in rows
        ]
        ones = self.svf.ones()
        z_rows = torch.stack([ones if zs[i] is None else zs[i].float() for i, _ in rows])
        # sampled answers are served ones, length included: an emoji loop that a real run
        # served began after the 32 tokens a greedy probe reads
        sampling = (
            self.sampling
            if sampled
            else SamplingConfig(max_new_tokens=self.config.max_new_tokens, temperature=0)
        )
        seed = self.config.sample_seed if sampled else None
        with self.svf.factored(z_rows):
            generations = generate(self.svf.model, self.tokenizer, prompts, sampling, seed=seed)
        answers = [g.text for g in generations]
        questions, replies = [p for _, p in rows], [x or "." for x in answers]
        with self.svf.factored(ones):
            q = embed(self.svf.model, self.tokenizer, questions)
            a = embed(self.svf.model, self.tokenizer, replies)
        sims = (q * a).sum(-1).numpy()
        centred = (self.embedder(questions) * self.embedder(replies)).sum(-1)
        nll = base_nll(self.svf, self.tokenizer, [p for _, p in rows], answers, self.system)
        results = []
        for i in range(len(probe_lists)):
            idx = [k for k, (j, _) in enumerate(rows) if j == i]
            texts = [answers[k] for k in idx]
            reasons = [
                degenerate_reason(answers[k], nll[k], rows[k][1], self.template) for k in idx
            ]
            results.append(
                ProbeResult(
                    texts,
                    sum(r is not None for r in reasons),
                    float(np.mean(sims[idx])),
                    [r or "" for r in reasons],
                    [float(centred[k]) for k in idx],
                )
            )
        return results

    def run(self, z: torch.Tensor | None, probes: list[str]) -> ProbeResult:
        return self.run_many([z], [probes])[0]

    def base(self, probes: list[str]) -> ProbeResult:
        return self.base_many([probes])[0]

    def base_many(self, probe_lists: list[list[str]], sampled: bool = False) -> list[ProbeResult]:
        missing = [
            list(k)
            for k in dict.fromkeys(map(tuple, probe_lists))
            if (k, sampled) not in self._base_cache
        ]
        runs = self.run_many([None] * len(missing), missing, sampled)
        for key, res in zip(missing, runs, strict=True):
            self._base_cache[tuple(key), sampled] = res
        return [self._base_cache[tuple(p), sampled] for p in probe_lists]

    @torch.inference_mode()
    def fact_logprobs(self, z: torch.Tensor | None, facts: list[FactProbe]) -> list[float]:
        """log p(fact | probe, the base answer up to the fact) under z (None: the base)."""
        return self._fact_logprobs_many([z] * len(facts), facts)

    @torch.inference_mode()
    def _fact_logprobs_many(
        self, zs: list[torch.Tensor | None], facts: list[FactProbe]
    ) -> list[float]:
        """`fact_logprobs` with one z per fact, all in one teacher-forced pass."""
        from .learning import Sample, sequence_logprobs

        if not facts:
            return []
        samples = []
        for f in facts:
            prompt = build_prompt(
                self.tokenizer, [{"role": "user", "content": f.probe}], self.system
            ).input_ids
            head = self.tokenizer(f.prefix, add_special_tokens=False)["input_ids"]
            full = self.tokenizer(f.prefix + f.fact, add_special_tokens=False)["input_ids"]
            keep = next(
                (i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b),
                min(len(head), len(full)),
            )
            samples.append(Sample(prompt + full[:keep], full[keep:]))
        ones = self.svf.ones()
        zt = torch.stack([ones if z is None else z.float() for z in zs])
        if all(z is zs[0] for z in zs):
            zt = zt[0]  # one model for every row: the shared prompt prefix runs once
        lp, _ = sequence_logprobs(self.svf, zt, samples, pad_id=self.tokenizer.pad_token_id or 0)
        return [float(x) for x in lp]

    def known_facts(self) -> list[FactProbe]:
        """The `FACTS` the base model states in its greedy answers, found once per guard
        (one generation of every fact question), with the base model's log-probs."""
        if self._facts is None:
            questions = list(FACTS)
            facts = fact_probes(questions, self.base(questions).answers)
            base = self.fact_logprobs(None, facts)
            keep = [i for i, b in enumerate(base) if b >= self.config.min_fact_logprob]
            self._facts = [facts[i] for i in keep]
            self._fact_base = [base[i] for i in keep]
        return self._facts

    def _lost_facts_many(self, zs: list[torch.Tensor]) -> list[list[str]]:
        """For each candidate z, the facts the base model states that it no longer knows,
        every candidate's facts scored in one pass with a z per row."""
        facts = self.known_facts()
        if not zs or not facts:
            return [[] for _ in zs]
        after = self._fact_logprobs_many([z for z in zs for _ in facts], facts * len(zs))
        out = []
        for i in range(len(zs)):
            now = after[i * len(facts) : (i + 1) * len(facts)]
            out.append(
                [
                    f"{f.probe!r}: log p({f.fact!r} after {f.prefix!r}) {b:.2f} -> {a:.2f}"
                    for f, b, a in zip(facts, self._fact_base, now, strict=True)
                    if b - a > self.config.max_fact_drop
                ]
            )
        return out

    def _verdict(self, probes: list[str], base: ProbeResult, cand: ProbeResult) -> GuardVerdict:
        cfg = self.config
        if cand.degenerate > base.degenerate + cfg.max_extra_degenerate:
            bad = [
                f"{p!r} -> {a!r} ({r})"
                for p, a, r in zip(probes, cand.answers, cand.reasons, strict=True)
                if r
            ]
            return GuardVerdict(False, "degenerate answers: " + "; ".join(bad), base, cand)
        # The node's own prompts only: answers to "Write a haiku about the sea." vary too
        # freely ("The sea is a mirror …" shares no 4-letter word with it) for this rule.
        rows = [
            (p, a, b, sim, base_sim)
            for p, a, b, sim, base_sim in zip(
                probes, cand.answers, base.answers, cand.similarity, base.similarity, strict=True
            )
            if p not in UNRELATED_PROBES
        ]
        astray = [f"{p!r} -> {a!r}" for p, a, b, sim, _ in rows if not on_topic(p, a, b, sim)]
        base_astray = sum(not on_topic(p, b, b, s) for p, _, b, _, s in rows)
        if len(astray) > base_astray + cfg.max_extra_off_topic:
            reason = "answers stopped addressing the question: " + "; ".join(astray)
            return GuardVerdict(False, reason, base, cand)
        if base.topic - cand.topic > cfg.max_topic_drop:
            return GuardVerdict(
                False,
                f"answers drifted off topic (similarity {base.topic:.2f} -> {cand.topic:.2f})",
                base,
                cand,
            )
        return GuardVerdict(True, "", base, cand)

    def _verdicts(
        self, zs: list[torch.Tensor], probe_lists: list[list[str]], sampled: bool
    ) -> list[GuardVerdict]:
        bases = self.base_many(probe_lists, sampled)
        cands = self.run_many(zs, probe_lists, sampled)
        return [
            self._verdict(probes, base, cand)
            for probes, base, cand in zip(probe_lists, bases, cands, strict=True)
        ]

    def check(self, z: np.ndarray, related: list[str]) -> GuardVerdict:
        return self.check_many([(z, related)])[0]

    def check_many(self, items: list[tuple[np.ndarray, list[str]]]) -> list[GuardVerdict]:
        """Verdicts for several candidate z (one per node), in one batched probe run."""
        probe_lists = [self.probes_for(related) for _, related in items]
        zs = [torch.from_numpy(np.asarray(z, dtype=np.float32)) for z, _ in items]
        verdicts = self._verdicts(zs, probe_lists, sampled=False)
        ok = [i for i, v in enumerate(verdicts) if v.ok]
        if self.config.sampled and ok:  # the same rules on answers as they would be served
            again = self._verdicts([zs[i] for i in ok], [probe_lists[i] for i in ok], sampled=True)
            for i, v in zip(ok, again, strict=True):
                if not v.ok:
                    verdicts[i] = replace(v, reason="sampled answers: " + v.reason)
        ok = [i for i, v in enumerate(verdicts) if v.ok]  # facts only where nothing else failed
        lost = self._lost_facts_many([zs[i] for i in ok])
        for i, forgotten in zip(ok, lost, strict=True):
            if len(forgotten) >= self.config.min_facts_lost:
                reason = "forgot what the base model knew: " + "; ".join(forgotten)
                verdicts[i] = replace(verdicts[i], ok=False, reason=reason)
        return verdicts
