"""The collapse guard: is the model still itself after an update?

Reward compliance alone happily buys collapse ("A: A: A:" loops, refusals, "I am
SmolLM" self-descriptions), and reference NLL barely moves when it happens. So after
each update the node's z answers a few probe prompts greedily, and the update is rolled
back if, compared with the base model on the same probes:

* a probe answer is degenerate (`judges.degenerate_reason`: empty, repetition loops,
  refusals, self-descriptions, echoes of the system prompt) where the base model's
  answer to the same probe is not, or
* answers stop addressing the question: more answers than the base model's share no
  content word with their question or the base answer and sit far from the question in
  the centred embedding (`judges.on_topic`), or the mean question/answer similarity
  drops by more than ``max_topic_drop``, or
* facts the base model states are no longer known (``FACTS``, a dozen short questions
  scored in one teacher-forced pass; ``min_facts_lost`` of those the base model is sure
  of): the probability of the fact ("Paris") right where the base model's own answer
  states it ("The capital of France is") falls by more than ``max_fact_drop`` nats.
  Knowledge, not wording, is checked: the base model's two likeliest first tokens for
  the France probe are nearly tied, "The capital …" and "L'Étoile, la …" (French, no
  Paris), so a check on the greedy string would roll back harmless updates, while this
  one counts "The capital of France is Lyon" as a lost fact. One lost fact alone
  passes: docs/learning.md, "Fact probes".

This module runs the probes and decides; the text rules themselves are `judges`, which
the evaluation shares, and are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .config import GuardConfig
from .embedding import PromptEmbedder
from .generate import SamplingConfig, build_prompt, embed, generate
from .judges import (
    FactProbe,
    base_nll,
    content_words,
    degenerate_reason,
    judge_answers,
    on_topic,
    stated_fact,
    template_words,
)
from .learning import Sample, sequence_logprobs
from .svf import SVFModel

__all__ = [
    "FACTS",
    "UNRELATED_PROBES",
    "FactProbe",
    "Guard",
    "GuardConfig",
    "GuardVerdict",
    "ProbeResult",
    "content_words",
    "degenerate_reason",
    "fact_probes",
    "judge_answers",
    "on_topic",
    "template_words",
]

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


def fact_probes(probes: list[str], base_answers: list[str]) -> list[FactProbe]:
    """The `FACTS` the base model states in its answers (only those can be lost)."""
    found = (
        stated_fact(p, answer, FACTS.get(p)) for p, answer in zip(probes, base_answers, strict=True)
    )
    return [f for f in found if f is not None]


@dataclass
class ProbeResult:
    """A z's answers to a list of probes, as the guard judged them."""

    answers: list[str]
    degenerate: int
    topic: float  # mean cosine(question, answer) under the base embedding
    reasons: list[str] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)  # centred, per answer (`on_topic`)


@dataclass
class GuardVerdict:
    """Whether a candidate z's update stands, why not, and the answers it rests on."""

    ok: bool
    reason: str
    base: ProbeResult
    candidate: ProbeResult


class Guard:
    """Probes a candidate z against the base model and decides whether its update stands.

    Base answers are computed once per probe list and cached; every candidate of a
    training round is answered in one batched pass with a z per row.
    """

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
        """The node's ``related_probes`` most recent prompts, then `UNRELATED_PROBES`,
        each once."""
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
        questions = [p for _, p in rows]
        ones = self.svf.ones()
        z_rows = torch.stack([ones if zs[i] is None else zs[i].float() for i, _ in rows])
        answers = self._answer(z_rows, questions, sampled)
        replies = [x or "." for x in answers]
        with self.svf.factored(ones):
            q = embed(self.svf.model, self.tokenizer, questions)
            a = embed(self.svf.model, self.tokenizer, replies)
        sims = (q * a).sum(-1).numpy()
        centred = (self.embedder(questions) * self.embedder(replies)).sum(-1)
        nll = base_nll(self.svf, self.tokenizer, questions, answers, self.system)
        judged = [
            degenerate_reason(answer, n, question, self.template)
            for question, answer, n in zip(questions, answers, nll, strict=True)
        ]
        results = []
        for i in range(len(probe_lists)):
            idx = [k for k, (j, _) in enumerate(rows) if j == i]
            reasons = [judged[k] for k in idx]
            results.append(
                ProbeResult(
                    [answers[k] for k in idx],
                    sum(r is not None for r in reasons),
                    float(np.mean(sims[idx])),
                    [r or "" for r in reasons],
                    [float(centred[k]) for k in idx],
                )
            )
        return results

    def _answer(self, z_rows: torch.Tensor, questions: list[str], sampled: bool) -> list[str]:
        """Each question answered under its row of ``z_rows``, greedily or as served."""
        prompts = [
            build_prompt(self.tokenizer, [{"role": "user", "content": p}], self.system)
            for p in questions
        ]
        # sampled answers are served ones, length included: an emoji loop in served
        # answers can begin after the 32 tokens a greedy probe reads
        sampling = (
            self.sampling
            if sampled
            else SamplingConfig(max_new_tokens=self.config.max_new_tokens, temperature=0)
        )
        seed = self.config.sample_seed if sampled else None
        with self.svf.factored(z_rows):
            generations = generate(self.svf.model, self.tokenizer, prompts, sampling, seed=seed)
        return [g.text for g in generations]

    def run(self, z: torch.Tensor | None, probes: list[str]) -> ProbeResult:
        """`run_many` for one z (None: the base model)."""
        return self.run_many([z], [probes])[0]

    def base(self, probes: list[str]) -> ProbeResult:
        """The base model's answers to ``probes``, judged (cached)."""
        return self.base_many([probes])[0]

    def base_many(self, probe_lists: list[list[str]], sampled: bool = False) -> list[ProbeResult]:
        """The base model's answers to each probe list; lists not seen before are answered
        in one batched pass and cached."""
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
        """The probe rules in order: degenerate answers, off-topic answers, the topic drop."""
        cfg = self.config
        # probe by probe, not by count: an update that mends one of the base model's
        # degenerate answers must not buy the right to break another
        bad = [
            f"{p!r} -> {a!r} ({r})"
            for p, a, r, was in zip(probes, cand.answers, cand.reasons, base.reasons, strict=True)
            if r and not was
        ]
        if len(bad) > cfg.max_extra_degenerate:
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
        """`_verdict` of each candidate against the base model on its probes."""
        bases = self.base_many(probe_lists, sampled)
        cands = self.run_many(zs, probe_lists, sampled)
        return [
            self._verdict(probes, base, cand)
            for probes, base, cand in zip(probe_lists, bases, cands, strict=True)
        ]

    def check(self, z: np.ndarray, related: list[str]) -> GuardVerdict:
        """`check_many` for one candidate z."""
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
