"""REINFORCE on one node's z, from its community's feedback: the maths of an update.

One round of N samples (A = advantage, w = truncated importance weight, b = baseline),
as in docs/learning.md, "The update":

    A_i  = r_i − b                                           `advantages`, `prior_baseline`
    w_i  = min(π_z(y_i|x_i) / π_then(y_i|x_i), is_clip)      `importance_weight`
    L(z) = −(1/N) Σ_rated w_i · A_i · log π_z(y_i | x_i)      votes      `feedback_loss`
           −(β/N) Σ_demos log π_z(y_d | x_d) / |y_d|          corrections
           + (λ/2) ‖z − 1‖²                                   `pull`
    inner_steps × { g = ∇L clipped to max_grad_norm; z ← optimiser(z, g);
                    keep ‖z − z₀‖ ≤ max_step (and ‖z − 1‖ ≤ max_drift) }   `bound_step`

log π is the *sum* over the response tokens, scored on exactly the token ids that were
sampled (`logprobs`, which also holds every speed choice of that scoring). lr and
max_step are multiplied by `settle_scale`.

Safety rails (`plan_batch` and `reinforce_steps`):
* no step unless some |A| ≥ ``min_advantage`` (Adam turns noise into full-size steps);
* gradient-norm clipping and a bound on ‖Δz‖ per update, plus an optional bound on a
  node's total drift ‖z − 1‖;
* samples from a z more than ``max_staleness`` versions old are dropped, fresher ones
  are re-weighted by w;
* any non-finite loss, gradient or z rolls the update back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..config import LearningConfig
from ..svf import SVFModel
from .logprobs import UpdateScorer
from .samples import Batch, Sample

# -- the round: baseline, advantages, what is learnt ------------------------------------


class RewardScale(Protocol):
    """The two rewards of a channel (a `ChannelConfig`)."""

    reward_up: float
    reward_down: float


def prior_baseline(rewards: list[float], cfg: RewardScale) -> float:
    """The baseline of a node that has no history: the channel's usual verdict.

    The mean reward of this training round across the whole channel, shrunk towards the
    midpoint of the two rewards by one pseudo-vote. Starting at 0 instead makes a first
    round of 👎 (the usual start: a community votes down most of what a base model says)
    a large negative advantage on everything sampled, and pushing down text the model
    itself wrote can turn it to gibberish within two updates.
    Against the usual verdict, 👎 where 👎 is the norm carries little signal and the
    first 👍 carries most of it; a lone first vote still counts, at half strength.
    """
    midpoint = (cfg.reward_up + cfg.reward_down) / 2
    return (float(sum(rewards)) + midpoint) / (len(rewards) + 1)


def advantages(samples: list[Sample], baseline: float, cfg: LearningConfig) -> float:
    """Fill each rated sample's advantage; return the new baseline (EMA over rewards).

    A sample already learnt at reward ``counted`` is learnt again as the change of its
    verdict, r − counted, and does not move the baseline a second time.
    """
    rl = [s for s in samples if not s.demo]
    for s in rl:
        s.advantage = s.reward - (baseline if s.counted is None else s.counted)
    if cfg.normalize_advantage and len(rl) > 1:
        std = float(np.std([s.advantage for s in rl])) or 1.0
        for s in rl:
            s.advantage /= std
    first = [s.reward for s in rl if s.counted is None]
    if first:
        baseline = cfg.baseline_beta * baseline + (1 - cfg.baseline_beta) * float(np.mean(first))
    return baseline


def plan_batch(
    samples: list[Sample],
    baseline: float,
    cfg: LearningConfig,
    replay: Sequence[Sample] = (),
) -> Batch:
    """Advantages, stale-sample dropping, replay and the no-signal rule, for any adapter.

    ``replay`` (earlier liked answers and corrections, as demonstrations) joins an update
    that new feedback calls for: a new correction, or a round whose mean reward is
    negative (what the node says now is not what its community wants, and these examples
    are what it did want). A round that matches expectations with no complaint moves
    nothing, so old feedback is not re-applied to a node its community is content with.
    """
    fresh = [s for s in samples if s.demo or s.staleness <= cfg.max_staleness]
    new_baseline = advantages(fresh, baseline, cfg)
    rl = [s for s in fresh if not s.demo]
    demos = [s for s in fresh if s.demo]
    signal = max((abs(s.advantage) for s in rl), default=0.0)
    unhappy = bool(rl) and float(np.mean([s.reward for s in rl])) < 0
    replay = [s for s in replay if s.demo][: max(0, cfg.replay)] if demos or unhappy else []
    skip = ""
    if math.isfinite(signal) and signal < cfg.min_advantage and not demos and not replay:
        skip = f"no signal (max |advantage| {signal:.2f} < {cfg.min_advantage})"
    # a sample whose advantage is below the signal bar is noise in the gradient too: its
    # summed log-prob over a long answer outweighs a length-normalised correction of
    # that very answer ("Sure! <answer>"), which then teaches nothing
    rl = [s for s in rl if not math.isfinite(s.advantage) or abs(s.advantage) >= cfg.min_advantage]
    return Batch(rl, demos + replay, new_baseline, len(samples) - len(fresh), skip)


def settle_scale(
    before: list[float], now: list[float], corrected: bool, cfg: LearningConfig
) -> float:
    """How much of a full step a node takes: ``min(1, 2 × share of 👎)`` among its rewards
    ``before`` this round (its recent window) and ``now``, times the rejected node's
    larger step (``cfg.rejected_step``) once more than half of them are 👎.

    A community that likes most of what a node says has little left to teach it, and
    every further step on its own sampled text (pushing up what is liked, down the odd
    miss) is drift that votes did not ask for. A new correction (``corrected``) is a
    member asking for something else, so it gets a full step whatever the votes say, and
    so does a node with fewer than ``settle_min_votes`` rated replies before this round:
    contentment needs evidence, and a young node's first 👍 are what it learns most from.
    The other way round, a node whose answers keep being rejected (young or not) steps
    up to ``rejected_step`` times further: what it says now is what members do not want.
    """
    window = before + now
    negative = sum(r < 0 for r in window) / len(window) if window else 0.0
    rejected = 1.0 + (cfg.rejected_step - 1.0) * max(0.0, 2.0 * negative - 1.0)
    if not cfg.settle or corrected or len(before) < max(1, cfg.settle_min_votes):
        return rejected  # (at least 1: rejected_step is)
    return min(1.0, 2.0 * negative) * rejected


# -- the loss ----------------------------------------------------------------------------


def importance_weight(logp_now: float, logp_then: float, clip: float) -> float:
    """w = min(π_now / π_then, clip) of a sample answered under an older z (the exponent
    capped at 50 so that the ratio stays finite)."""
    return min(math.exp(min(50.0, logp_now - logp_then)), clip)


def feedback_loss(
    batch: Batch,
    logp: torch.Tensor,
    ntok: torch.Tensor,
    weights: torch.Tensor,
    cfg: LearningConfig,
    total: int | None = None,
) -> torch.Tensor:
    """The votes' policy-gradient term plus the demonstrations' bounded likelihood term.

    ``logp``/``ntok`` are per sample, RL samples first, as `response_logprobs` returns
    them for ``batch.rl + batch.demos``; ``weights`` are the RL samples' importance
    weights. The pull towards the base model is the adapter's own business (`pull`). The
    loss is a mean over ``total`` samples (default: this batch's); a micro-batch passes
    the whole batch's size so that its losses add up to the whole batch's.
    """
    n = total or len(batch.rl) + len(batch.demos)
    n_rl = len(batch.rl)
    loss = logp.new_zeros(())
    if n_rl:
        adv = torch.tensor([s.advantage for s in batch.rl], device=logp.device)
        loss = loss - (weights * adv * logp[:n_rl]).sum() / n
    if batch.demos:
        demo_lp = logp[n_rl:] / ntok[n_rl:].clamp_min(1)
        loss = loss - cfg.demo_weight * demo_lp.sum() / n
    return loss


def pull(z: torch.Tensor, l2: float) -> torch.Tensor:
    """(λ/2) ‖z − 1‖², the pull towards the base model (z = 1)."""
    return (l2 / 2) * ((z - 1) ** 2).sum()


# -- the step ----------------------------------------------------------------------------


def optimiser_step(z: torch.Tensor, name: str, lr: float) -> Callable[[], None]:
    """One optimiser step on z from its gradient: a fresh Adam (``name`` "adam"), or
    normalised gradient descent, which moves z by ``lr`` in L2."""
    if name == "adam":
        return torch.optim.Adam([z], lr=lr).step

    def ngd() -> None:
        with torch.no_grad():
            z.sub_(lr * z.grad / z.grad.norm().clamp_min(1e-12))

    return ngd


@torch.no_grad()
def bound_step(z: torch.Tensor, start: torch.Tensor, max_step: float, max_drift: float) -> None:
    """Project z in place to ‖z − start‖ ≤ ``max_step``, then (``max_drift`` > 0) into
    the ball ‖z − 1‖ ≤ ``max_drift`` around the base model."""
    delta = z - start
    norm = float(delta.norm())
    if norm > max_step:
        z.copy_(start + delta * (max_step / norm))
    if max_drift > 0:
        drift = float((z - 1).norm())
        if drift > max_drift:
            z.copy_(1 + (z - 1) * (max_drift / drift))


# -- the update --------------------------------------------------------------------------


@dataclass
class StepResult:
    """What an update did: its new z, or why it took no step."""

    z: np.ndarray | None  # None: nothing changes
    status: str  # "updated" | "skipped" | "rolled_back"
    reason: str = ""
    baseline: float = 0.0
    loss: float = float("nan")
    grad_norm: float = float("nan")
    step_norm: float = 0.0
    used: int = 0
    dropped_stale: int = 0
    metrics: dict = field(default_factory=dict)


def reinforce_step(*args, **kwargs) -> StepResult:
    """One bounded policy-gradient update of a node's z, all at once: `reinforce_steps`
    (same arguments) run to the end, for callers with nothing to interleave. Never raises
    on bad numbers."""
    steps = reinforce_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def reinforce_steps(
    svf: SVFModel,
    z0: np.ndarray,
    samples: list[Sample],
    baseline: float,
    cfg: LearningConfig | None = None,
    pad_id: int = 0,
    replay: Sequence[Sample] = (),
    scale: float = 1.0,
) -> Generator[None, None, StepResult]:
    """One bounded policy-gradient update of a node's z, as a generator: it yields after
    every forward/backward pass of ``cfg.micro_batch`` samples and returns the
    `StepResult`, so whoever drives it can run other model work (answers) in between.
    Nothing is shared between passes but z, its gradient and the optimiser, so
    interleaving is safe.

    ``baseline`` is the node's reward EMA, or `prior_baseline` for a node with no history;
    ``replay`` joins as `plan_batch` decides; ``scale`` (see `settle_scale`) multiplies
    the step.
    """
    cfg = cfg or LearningConfig()
    plan = plan_batch(samples, baseline, cfg, replay)
    # what every result but an update records: the reward statistics are facts about the
    # community even when no step is taken, unless they are non-finite, which a baseline
    # would carry into every later advantage of the node
    kept = plan.baseline if math.isfinite(plan.baseline) else baseline

    def stopped(status: str, reason: str) -> StepResult:
        return StepResult(None, status, reason, kept, dropped_stale=plan.dropped_stale)

    refusal = _no_step(plan, z0, scale)
    if refusal:
        return stopped(*refusal)
    z = svf.trainable(torch.from_numpy(np.asarray(z0, dtype=np.float32)))
    weights = torch.ones(len(plan.rl), device=svf.device)
    outcome = yield from _descend(svf, z, plan, weights, cfg, scale, pad_id)
    if isinstance(outcome, str):
        return stopped("rolled_back", outcome)
    loss, grad_norm = outcome
    new_z = z.detach().cpu().numpy().astype(np.float32)
    if not np.isfinite(new_z).all():
        return stopped("rolled_back", "non-finite z")
    return StepResult(
        new_z,
        "updated",
        "",
        kept,
        loss=loss,
        grad_norm=grad_norm,
        step_norm=float(np.linalg.norm(new_z - z0)),
        used=len(plan.rl) + len(plan.demos),
        dropped_stale=plan.dropped_stale,
        metrics={"mean_weight": float(weights.mean()) if plan.rl else 1.0, "scale": scale},
    )


def _no_step(plan: Batch, z0: np.ndarray, scale: float) -> tuple[str, str] | None:
    """(status, reason) of an update that takes no step, or None."""
    if plan.skip:
        return "skipped", plan.skip
    if scale <= 0:
        return "skipped", "settled (no 👎 among the node's recent rated replies)"
    if not np.isfinite(z0).all():
        return "rolled_back", "the node's z is non-finite"
    return None


def _descend(
    svf: SVFModel,
    z: torch.Tensor,
    plan: Batch,
    weights: torch.Tensor,
    cfg: LearningConfig,
    scale: float,
    pad_id: int,
) -> Generator[None, None, tuple[float, float] | str]:
    """``cfg.inner_steps`` clipped, bounded optimiser steps on z, in place, yielding after
    every pass; returns the last step's (loss, gradient norm), or why the update must be
    rolled back."""
    start = z.detach().clone()
    lr, max_step = cfg.lr * scale, cfg.max_step * scale
    descend = optimiser_step(z, cfg.optimizer, lr)
    score = UpdateScorer(svf, cfg, pad_id)
    loss, grad_norm = float("nan"), float("nan")
    for step in range(cfg.inner_steps):
        loss = yield from _gradient(z, plan, weights, score, cfg, reweigh=step == 0)
        if loss is None:
            return "non-finite loss"
        grad_norm = float(torch.nn.utils.clip_grad_norm_([z], cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            return "non-finite gradient"
        descend()
        bound_step(z, start, max_step, cfg.max_drift)
    return loss, grad_norm


def _gradient(
    z: torch.Tensor,
    plan: Batch,
    weights: torch.Tensor,
    score: UpdateScorer,
    cfg: LearningConfig,
    reweigh: bool,
) -> Generator[None, None, float | None]:
    """Accumulate ∇L into ``z.grad`` over passes of ``cfg.micro_batch`` samples, yielding
    after each; return L, or None where it is non-finite. ``reweigh``: fill ``weights``
    with the stale samples' importance weights, from this z (the first inner step)."""
    z.grad = None
    n = len(plan.rl) + len(plan.demos)
    total = 0.0
    for lo, part in plan.passes(cfg.micro_batch):
        logp, ntok = score(z, part.rl + part.demos)
        w = weights[lo : lo + len(part.rl)]  # a view: what is written here is kept
        if reweigh:
            stale = [
                i for i, s in enumerate(part.rl) if s.old_logprob is not None and s.staleness > 0
            ]
            now = score.exact(z, part.rl, logp, stale)
            for i, lp in zip(stale, now, strict=True):
                w[i] = importance_weight(lp, part.rl[i].old_logprob, cfg.is_clip)
        # every pass divides by the whole batch's size: the sum of the passes' losses
        # is the whole batch's loss, and so are the accumulated gradients
        loss = feedback_loss(part, logp, ntok, w, cfg, total=n)
        if lo == 0:
            loss = loss + pull(z, cfg.l2)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        total += float(loss.detach())
        yield
    return total
