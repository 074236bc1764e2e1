"""One interface over the compared methods: the engine (``gesal``, ``svf-single``,
``none``) and the LoRA baseline, driven by the same loop."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..engine import Engine, EngineConfig
from ..generate import build_prompt, generate, rng_kept
from ..learning import (
    Batch,
    LearningConfig,
    Sample,
    correction_sample,
    feedback_loss,
    plan_batch,
    prior_baseline,
    response_logprobs,
    settle_scale,
)
from ..records import ChannelConfig
from ..store import MemoryStore
from ..svf import SVFModel
from ..svf.precision import ComputePrecision

LORA_LR = 1e-3  # Adam on LoRA A/B, persistent across updates (the usual LoRA set-up)


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
            reply = await self.engine.get_reply(OTHER_CHANNEL, out.reply_id)
            ids = reply.prompt_ids + reply.response_ids
            node = await self.engine.get_node(OTHER_CHANNEL, out.node_id)
            logits = await self.engine.worker.run(self._logits, node.z, ids)
            self._other = (ids, node.node_id, node.z.copy(), node.version, logits)
            return 0.0
        ids, node_id, z0, version, before = self._other
        node = await self.engine.get_node(OTHER_CHANNEL, node_id)
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
        counts["guard_seconds"] = sum(
            r.guard_seconds for rs in report.channels.values() for r in rs
        )
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
        # samples peaks at 8.8 GB RSS, too much for LoRA runs side by side)
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
