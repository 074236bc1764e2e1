"""The loop: ask, vote, train, and measure at each checkpoint."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..embedding import PromptEmbedder
from ..engine import EngineConfig
from ..generate import SamplingConfig, build_prompt, generate, rng_kept
from ..guard import UNRELATED_PROBES, judge_answers, on_topic
from ..learning import Sample, response_logprobs, sequence_logprobs
from ..svf import SVFModel
from .learners import EngineLearner, Learner, LoraLearner
from .tasks import Task, fact_rate, sound_rate

METHODS = ("none", "gesal", "svf-single", "lora")

print_progress = functools.partial(print, flush=True)  # progress lines reach a log file at once

SAMPLE_SEP = " -> "  # between the prompt and the answer in a checkpoint's samples


def split_samples(samples: list[str]) -> tuple[list[str], list[str]] | None:
    """(prompts, answers) of a checkpoint's stored samples; None when any lacks the
    separator (results whose samples hold no whole answers)."""
    pairs = [s.split(SAMPLE_SEP, 1) for s in samples]
    if not all(len(x) == 2 for x in pairs):
        return None
    return [q for q, _ in pairs], [a for _, a in pairs]


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
    # None for lora and for results that lack it)
    drift: float | None = None
    # share of answers naming a key fact of their question (`fact_rate`; None: no facts)
    facts: float | None = None
    # nodes of the channel's graph (gesal and svf-single; None for lora and results that
    # lack it): how far routing splits the community's votes
    nodes: int | None = None
    # share of answers that comply *and* are on-topic *and* not degenerate (`sound_rate`):
    # compliance bought with collapse counts as a miss, so this is the rate to compare
    # methods by. None: not judged yet (results that lack it; `merge` judges them)
    sound: float | None = None
    # the guard's fixed unrelated probes ("prompt -> answer"), answered as a member asking
    # them would be: forgetting shows here first (None: results that lack them)
    probes: list[str] | None = None
    # two-channel isolation: how far another channel's logits, z or version moved since the
    # run began (`EngineLearner.isolation`; 0.0 = exact; None for lora and results that
    # lack it)
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
    # where the run's time went (`TIME_PARTS`), in seconds: what an evaluation's speed
    # work starts from (docs/results.md, "Reproducing the figures")
    seconds: dict[str, float] = field(default_factory=dict)


# answering the training questions; the updates themselves; the guard's probes after them;
# the held-out checkpoints (answers, judges, reference NLL, unrelated probes)
TIME_PARTS = ("answering", "updates", "guard", "checkpoints")


def _time_split(seconds: dict[str, float]) -> str:
    total = seconds["total"]
    return f"{total:.0f} s, " + ", ".join(f"{k} {seconds[k] / total:.0%}" for k in TIME_PARTS)


def _count_training(result: RunResult, counts: dict) -> None:
    """Add one training run's outcome (`Learner.train`) to the run's totals."""
    result.trains += 1
    result.updates += counts["updated"]
    result.skipped += counts["skipped"]
    result.settled += counts.get("settled", 0)
    result.halved += counts.get("halved", 0)
    result.rolled_back += counts["rolled_back"]


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
        from .. import graph

        refs = self.reference(prompts)
        if isinstance(learner, LoraLearner):
            lp, n = response_logprobs(learner.model, refs, 512, self.tokenizer.pad_token_id or 0)
            return float(-lp.sum() / n.sum()), None
        engine = learner.engine  # type: ignore[attr-defined]
        index = graph.GraphIndex.build(nodes or [])
        by_id = {n.node_id: n for n in nodes or []}
        total, count, drifts = 0.0, 0, []
        for p, ref in zip(prompts, refs, strict=True):
            emb = engine.embed(p)
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
            nodes = await learner.engine.nodes(learner.channel)
            threshold = (await learner.engine.get_config(learner.channel)).threshold
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

    async def _members_vote(
        self,
        task: Task,
        learner: Learner,
        prompts: list[str],
        rng: random.Random,
        ec: EvalConfig,
        result: RunResult,
        votes: int,
    ) -> None:
        """Ask ``prompts``; a member votes on every answer and corrects the first
        ``ec.corrections`` they vote down. ``votes``: the votes cast before these."""
        answers = await learner.ask(prompts)
        for i, ((handle, answer), prompt) in enumerate(zip(answers, prompts, strict=True)):
            v = task.vote(prompt, answer)
            if v > 0 and result.first_upvote is None:
                result.first_upvote = votes + i + 1
            user = f"member{rng.randrange(ec.members)}"
            await learner.vote(handle, user, v)
            fix = task.correct
            if v < 0 and fix and result.corrections < ec.corrections:
                # a member with nothing better to offer (a brevity member given an empty
                # answer) just votes: the engine refuses an empty correction
                better = fix(prompt, answer)
                if better.strip():
                    result.corrections += int(await learner.correct(handle, user, better))

    async def run(
        self,
        task: Task,
        method: str,
        seed: int,
        ec: EvalConfig,
        progress: Callable[[str], None] = print_progress,
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
        vote_time = update_time = guard_time = 0.0
        started = time.perf_counter()
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
                await self._members_vote(task, learner, prompts, rng, ec, result, votes)
                votes += len(prompts)
                vote_time += time.perf_counter() - t0
                t1 = time.perf_counter()
                counts = await learner.train()
                update_time += time.perf_counter() - t1
                guard_time += counts.get("guard_seconds", 0.0)
                _count_training(result, counts)
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
        total = time.perf_counter() - started
        result.seconds = {
            "answering": vote_time,
            "updates": update_time - guard_time,
            "guard": guard_time,
            "checkpoints": total - vote_time - update_time,
            "total": total,
        }
        progress(f"  {task.name}/{method}/seed {seed}: {_time_split(result.seconds)}")
        result.seconds_per_vote = vote_time / max(votes, 1)
        result.seconds_per_update = update_time / max(
            result.updates + result.skipped + result.rolled_back, 1
        )
        return result
