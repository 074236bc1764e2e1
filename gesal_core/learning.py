"""REINFORCE on one node's z, from its community's buffered feedback.

Loss per batch (N samples; A = advantage, w = truncated importance weight):

    L = -(1/N) Σ_rl  w_i · A_i · log π_z(y_i | x_i)          votes
        -(β/N) Σ_demo       log π_z(y_d | x_d) / |y_d|         corrections (bounded)
        + (λ/2) ‖z − 1‖²                                      pull towards the base model

log π is the *sum* over the response tokens, scored on exactly the token ids that were
sampled (prompt and response are concatenated ids, never re-tokenised text).

Safety rails:
* no step unless some |A| ≥ ``min_advantage`` (Adam turns noise into full-size steps);
* gradient-norm clipping and a bound on ‖Δz‖ per update, plus an optional bound on a
  node's total drift ‖z − 1‖;
* the step shrinks as a node's votes turn positive (`settle_scale`): updates that keep
  coming after the community is content wear its answers down;
* samples from a z more than ``max_staleness`` versions old are dropped, fresher ones
  are re-weighted by a truncated importance ratio π_now/π_then;
* any non-finite loss, gradient or z rolls the update back.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import GesalError
from .generate import cache_kwargs, cache_of, decoder_of
from .svf import SVFModel
from .svf.precision import SAFE_ROWS


@dataclass(frozen=True)
class LearningConfig:
    """How a node's z is updated; docs/learning.md, "The update", gives the reasoning."""

    # "adam": a fresh Adam per update (its first steps move every component by about lr).
    # "ngd": normalised gradient descent (each inner step moves z by lr in L2).
    optimizer: str = "adam"
    # Step size: 4 Adam steps of 3e-3 move z by about 2.7 in L2 on the bundled model
    # (51,840 components). GESAL_LEARNING_RATE sets it.
    lr: float = 3e-3
    inner_steps: int = 4
    # λ of the pull (λ/2)‖z−1‖² towards the base model; 0: off. A pull strong enough to
    # matter stalls learning (`bench.demo_fit`); the collapse guard, settling and
    # ``max_drift`` keep z near the base instead.
    l2: float = 0.0
    max_grad_norm: float = 1.0
    max_step: float = 3.0  # bound on ‖Δz‖₂ of one update
    min_advantage: float = 0.2  # no step unless some |advantage| reaches this
    baseline_beta: float = 0.8  # EMA weight of the old baseline
    normalize_advantage: bool = False
    is_clip: float = 2.0  # upper bound of a stale sample's importance weight
    max_staleness: int = 8  # samples from a z more versions old than this are dropped
    demo_weight: float = 1.0  # β, the weight of the corrections' likelihood term
    # Share of a correction's weight on the tokens the member changed
    # (`correction_weights`); 0: every token alike. Off (docs/learning.md, "Tried and
    # rejected").
    demo_focus: float = 0.0
    # Up to this many of the node's earlier liked answers and corrections, newest first,
    # are re-learnt (as demonstrations) with each update; 0: off (docs/learning.md,
    # "Replay").
    replay: int = 16
    # True: a corrected reply teaches through its correction only, not also through its
    # 👎 (docs/learning.md, "Corrections").
    correction_replaces_vote: bool = False
    # Tokens per sample, prompt + response: the engine's longest prompt (1024) and a long
    # answer. Past it the response is cut first (the prompt keeps at least half), then the
    # prompt's oldest tokens.
    max_tokens: int = 1280
    # Samples per forward/backward pass. Gradients accumulate exactly over passes, and the
    # model worker serves waiting chat between them (`ModelWorker.steps`).
    micro_batch: int = 4
    # Settling: the step shrinks to min(1, 2 × the share of 👎 among the node's recent
    # rated replies); a new correction always gets a full step (`settle_scale`;
    # docs/learning.md, "Settling").
    settle: bool = True
    settle_min_votes: int = 8  # rated replies before a round that can show contentment
    # The step's multiple (lr and max_step) for a node whose recent votes are all 👎,
    # rising linearly from 1 where half of them are; 1: off (`settle_scale`;
    # docs/learning.md, "Rejected nodes step further").
    rejected_step: float = 2.0
    # Bound on a node's total drift ‖z − 1‖₂ over all its updates; 0: none.
    max_drift: float = 0.0
    # Dtype of an update's matrix products: "auto" (bf16 where it runs faster on this
    # machine, else fp32), "float32" or "bfloat16". z, its gradient, the optimiser and
    # log-probs stay fp32 (docs/learning.md, "Precision of updates").
    compute_dtype: str = "auto"
    # Run an update's passes under torch.compile (`gesal_core.svf.compiled`): faster
    # updates (`bench.update_step`) for minutes of compiling once per process, at
    # start-up. Compiled passes run every row whole, whatever `shares_prefix` says.
    compile: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.demo_focus <= 1.0:
            raise GesalError(f"demo_focus must be between 0 and 1, got {self.demo_focus}")
        if not self.rejected_step >= 1.0:  # (also catches NaN)
            raise GesalError(
                f"rejected_step must be at least 1 (1 turns it off), got {self.rejected_step}"
            )


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


@dataclass
class Sample:
    """One thing to learn from: a rated response, or a demonstration (a correction)."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float = 0.0
    demo: bool = False
    old_logprob: float | None = None
    staleness: int = 0  # versions of z between sampling and now
    advantage: float = 0.0
    # per response token, for a correction (`correction_weights`); None: all 1
    weights: list[float] | None = None
    # the reward an earlier update already learnt this response with (`Reply.counted`):
    # its votes changed since, and only the change is learnt (advantage reward − counted;
    # the baseline, applied the first time, is not applied again and does not move)
    counted: float | None = None


@dataclass
class StepResult:
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


def correction_weights(
    original: list[int], corrected: list[int], focus: float
) -> list[float] | None:
    """Per-token weights of a correction that put ``focus`` of its likelihood term on the
    tokens the member changed, the tokens that do not line up with the bot's own answer.

    A correction mostly repeats what the bot said ("Plants grow by ... 😊 ..."); what it
    teaches is the few tokens that differ (the emoji, an opener) and the token that follows
    a cut (the end of text after a shortened sentence). Under the plain per-token mean
    those few share the gradient with every sampled word the bot happened to say, and the
    update learns the copy as much as the change. The weights average to 1, so the term
    stays a bounded mean per sample. Alignment is on token ids (`difflib`): kept words
    next to a change may tokenise differently and count as changed. None (all 1) when
    focus is 0 or nothing, or everything, changed.
    """
    if focus <= 0 or not corrected:
        return None
    matcher = difflib.SequenceMatcher(a=list(original), b=list(corrected), autojunk=False)
    changed = [True] * len(corrected)
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    kept_to = 0  # the bot's tokens aligned so far
    for block in blocks:
        changed[block.b : block.b + block.size] = [False] * block.size
        if block.a > kept_to:  # the member cut words: the token after the cut is the change
            changed[block.b] = True
        kept_to = block.a + block.size
    if blocks and blocks[-1].a + blocks[-1].size == len(original) and original[-1] != corrected[-1]:
        # the bot's answer was cut off (no end of text) and the correction keeps all of
        # it: its end of text says where the member stopped writing, not a change
        changed[-1] = False
    n_changed = sum(changed)
    if n_changed in (0, len(corrected)):
        return None
    extra = focus * len(corrected) / n_changed
    return [(1.0 - focus) + (extra if c else 0.0) for c in changed]


def correction_sample(
    prompt_ids: list[int], said_ids: list[int], ids: list[int], focus: float
) -> Sample:
    """A member's correction ``ids`` of the answer ``said_ids`` as a demonstration, its
    tokens weighted by `correction_weights` (all alike at ``focus`` 0)."""
    weights = correction_weights(said_ids, ids, focus)
    return Sample(prompt_ids, ids, demo=True, weights=weights)


def _batch(samples: list[Sample], max_tokens: int, pad_id: int):
    """(ids, attention mask, response weights): right-padded rows of prompt + response;
    a response token's weight is 1, or its sample's `Sample.weights`, prompt and padding 0."""
    rows, row_weights = [], []
    for s in samples:
        prompt = list(s.prompt_ids)
        # a long correction must not push its question out: it would be learnt as text
        # that follows no question at all
        response = list(s.response_ids)[: max_tokens - min(len(prompt), max_tokens // 2)]
        weights = list(s.weights)[: len(response)] if s.weights else [1.0] * len(response)
        prompt = prompt[-max(1, max_tokens - len(response)) :]
        rows.append(prompt + response)
        row_weights.append([0.0] * len(prompt) + weights)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    weight = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (r, w) in enumerate(zip(rows, row_weights, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        weight[i, : len(r)] = torch.tensor(w, dtype=torch.float32)
    return ids, attn, weight


def _shared_prefix(ids: torch.Tensor, attn: torch.Tensor, limit: int) -> int:
    """Length of the token prefix every row shares (at most ``limit``)."""
    same = (ids == ids[:1]).all(0) & (attn == 1).all(0)
    differ = (~same[:limit]).nonzero()
    return int(differ[0]) if len(differ) else min(limit, ids.shape[1])


def _prefix_cache(model: torch.nn.Module, ids: torch.Tensor):
    """The KV cache of a prefix, from the decoder alone: the prefix's logits are never
    used, and under bf16 products the LM head's one-position product costs a transposed
    copy of the whole 49k x 576 head."""
    decoder = decoder_of(model)
    if decoder is None:
        return cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    return cache_of(decoder(input_ids=ids, use_cache=True))


class _TargetLogprob(torch.autograd.Function):
    """log softmax(logits)[target] with one vocabulary-sized buffer in the backward pass.

    Autograd's own graph for ``gather − logsumexp`` allocates five (positions × vocabulary)
    tensors per pass (the difference, its exp, the scaled gradient, gather's zeros, their
    sum). Here the gradient ``g · (onehot − softmax)`` is built in place in one buffer.
    Exact maths: same values, same gradient; a k=4 update runs 1.04× faster on one thread
    (`bench.logprob_tail`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        ctx.save_for_backward(x, lse, target)
        ctx.in_dtype = logits.dtype
        return (x.gather(-1, target.unsqueeze(-1)) - lse).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, lse, target = ctx.saved_tensors
        g = grad.unsqueeze(-1).float()
        out = torch.sub(x, lse).exp_().mul_(-g)  # −g · softmax
        out.scatter_add_(-1, target.unsqueeze(-1), g)
        return out.to(ctx.in_dtype), None


def target_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log π(target) at each position (fp32), from (..., vocabulary) logits of any dtype."""
    return _TargetLogprob.apply(logits, target)


# the fewest positions (rows × tokens) a compiled pass runs (`_pad_for_compiled`)
COMPILED_MIN_TOKENS = 64


def _pad_for_compiled(ids, attn, weight, first: int, pad_id: int):
    """Right-pad a pass for the compiled forward so that every pass falls on the side of
    each size test that the warm-up compiled. A compiled graph guards on such tests, and
    failing one recompiles: minutes on a CPU, in the middle of an update. The tests:
    whether any row is padded
    (the attention mask's path), inductor's kernel choice below 64 positions, and the
    LM head's row padding below `SAFE_ROWS` rows (`svf.precision`). Padding is masked
    out and weighs nothing, so the values and gradients are the same.
    """
    rows, width = ids.shape
    want = max(
        width + 1,  # at least one padded position: the padded-mask path, always
        -(-COMPILED_MIN_TOKENS // rows),
        first - 1 + -(-SAFE_ROWS // rows),  # the LM head scores `keep` positions per row
    )
    extra = want - width
    return (
        torch.nn.functional.pad(ids, (0, extra), value=pad_id),
        torch.nn.functional.pad(attn, (0, extra)),
        torch.nn.functional.pad(weight, (0, extra)),
    )


def response_logprobs(
    model: torch.nn.Module,
    samples: list[Sample],
    max_tokens: int = 512,
    pad_id: int = 0,
    share_prefix: bool = False,
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of log π over each sample's response tokens, for any causal LM; a
    sample with `Sample.weights` gets their weighted sum and the sum of its weights.
    ``forward`` replaces ``model(...)`` for a pass that runs every row whole (a compiled
    forward, `gesal_core.svf.compiled`).

    Sequences are right-padded, so positions are the natural 0..T-1 of each row and the
    token at position t is predicted by the logits at t-1.

    Two exact savings (most of an update's time is spent in this function):
    logits are computed only from the first position that predicts a response token
    (a prompt position's vocabulary projection is wasted work), and log π(y) is
    ``logit[y] − logsumexp(logits)`` rather than a full-vocabulary log_softmax. With
    ``share_prefix`` (every row runs the *same* model: one adapter, not per-row z), the
    token prefix all rows share (the chat template's system prompt, at least) is run once
    and its KV cache repeated across the batch: causal attention makes those positions'
    states identical in every row, and gradients flow through the repeat.
    """
    device = next(model.buffers(), None)
    device = device.device if device is not None else next(model.parameters()).device
    ids, attn, weight = (t.to(device) for t in _batch(samples, max_tokens, pad_id))
    resp = weight > 0
    width = ids.shape[1]
    has = resp.any(1)
    # earliest response token of any row; the logits one position before predict it
    first = int(torch.where(has, resp.float().argmax(1), width).min()) if has.any() else width
    first = max(first, 1)
    if forward is not None:
        ids, attn, weight = _pad_for_compiled(ids, attn, weight, first, pad_id)
        width = ids.shape[1]
    prefix = 0
    if share_prefix and len(samples) > 1:
        prefix = _shared_prefix(ids, attn, first - 1)  # keep the predicting logits after it
        if prefix < 8:  # not worth a second model call
            prefix = 0
    keep = width - (first - 1)  # positions first-1 .. width-1 (the last predicts nothing)
    if prefix:
        cache = _prefix_cache(model, ids[:1, :prefix])
        cache.batch_repeat_interleave(len(samples))
        logits = model(
            input_ids=ids[:, prefix:],
            attention_mask=attn,
            use_cache=True,
            **cache_kwargs(model, cache),
            logits_to_keep=keep,
        ).logits
    else:
        call = forward or model
        logits = call(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
    # the last position predicts nothing: score it against a dummy token and drop it,
    # rather than slice the logits (a slice's backward is one more vocabulary-sized buffer)
    target = torch.nn.functional.pad(ids[:, first:], (0, 1))
    logp = target_logprobs(logits, target)[:, :-1]
    mask = weight[:, first:]
    return (logp * mask).sum(-1), mask.sum(-1)


def sequence_logprobs(
    svf: SVFModel,
    z: torch.Tensor,
    samples: list[Sample],
    max_tokens: int = 512,
    pad_id: int = 0,
    share_prefix: bool = True,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` under adapter z (one (Z,) or per-row (B, Z)); differentiable in z.

    One shared z means one model for every row, so the common prompt prefix may run once
    (``share_prefix``; per-row z never shares). ``compiled``: a pass that does not share
    runs the model's compiled forward (`SVFModel.compiled_passes`).
    """
    with svf.factored(z):
        share = share_prefix and z.dim() == 1
        forward = svf.compiled_passes if compiled and not share else None
        return response_logprobs(
            svf.model, samples, max_tokens, pad_id, share_prefix=share, forward=forward
        )


def shares_prefix(svf: SVFModel, compute_dtype: str) -> bool:
    """Whether an update's passes, with products in ``compute_dtype``
    (`LearningConfig.compute_dtype`), run the prompt prefix their samples share only once.

    Only when the products run in the model's own precision. Sharing trades rows of the
    main pass (the prefix times the other samples) for a second, separate pass over the
    prefix, with its own thirty layers of small operations and few-row products, and a
    KV cache to repeat. In fp32 the rows cost more than that and sharing pays; with bf16
    products the rows are cheap and the extra pass is not: side by side in
    `bench.update_step`, a k=4 update in bf16 runs faster unshared ("shared prefix"
    columns).
    """
    return not svf.compute_precision.lowers(compute_dtype)


def prior_baseline(rewards: list[float], cfg) -> float:
    """The baseline of a node that has no history: the channel's usual verdict.

    The mean reward of this training round across the whole channel, shrunk towards the
    midpoint of the two rewards by one pseudo-vote. Starting at 0 instead makes a first
    round of 👎 (the usual start: a community votes down most of what a base model says)
    a large negative advantage on everything sampled, and pushing down text the model
    itself wrote can turn it to gibberish within two updates.
    Against the usual verdict, 👎 where 👎 is the norm carries little signal and the
    first 👍 carries most of it; a lone first vote still counts, at half strength.
    ``cfg`` is anything with ``reward_up`` and ``reward_down`` (a ChannelConfig).
    """
    midpoint = (cfg.reward_up + cfg.reward_down) / 2
    return (float(sum(rewards)) + midpoint) / (len(rewards) + 1)


def advantages(samples: list[Sample], baseline: float, cfg: LearningConfig) -> float:
    """Fill each RL sample's advantage; return the new baseline (EMA over rewards)."""
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


@dataclass
class Batch:
    """What one update learns from, and whether it should happen at all."""

    rl: list[Sample]  # rated samples with a non-zero advantage
    demos: list[Sample]  # new corrections, then replayed liked answers and corrections
    baseline: float  # the node's baseline after this round's rewards
    dropped_stale: int
    skip: str = ""  # why no step is taken ("" = step)

    def passes(self, size: int) -> Iterator[tuple[int, Batch]]:
        """(offset, samples) of each forward/backward pass of ``size`` samples, in the
        order of ``rl + demos``; every adapter's update accumulates over these."""
        n, size = len(self.rl) + len(self.demos), max(1, size)
        for lo in range(0, n, size):
            yield lo, self.slice(lo, lo + size)

    def slice(self, lo: int, hi: int) -> Batch:
        """Samples lo..hi of ``rl + demos`` (the order every loss sees them in)."""
        n_rl = len(self.rl)
        return Batch(
            self.rl[lo:hi],
            self.demos[max(0, lo - n_rl) : max(0, hi - n_rl)],
            self.baseline,
            self.dropped_stale,
            self.skip,
        )


def plan_batch(
    samples: list[Sample], baseline: float, cfg: LearningConfig, replay: list[Sample] = ()
) -> Batch:
    """Advantages, stale-sample dropping, replay and the no-signal rule, for any adapter.

    ``replay`` (earlier liked answers and corrections, as demonstrations) joins an update
    that new feedback calls for: a new correction, or a round whose mean reward is
    negative (what the node says now is not what its community wants, and these examples
    are what it did want). A round that matches
    expectations with no complaint moves nothing, so old feedback is not re-applied to a
    node its community is content with.
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


def feedback_loss(
    batch: Batch,
    logp: torch.Tensor,
    ntok: torch.Tensor,
    weights: torch.Tensor,
    cfg,
    total: int | None = None,
) -> torch.Tensor:
    """The votes' policy-gradient term plus the demonstrations' bounded likelihood term.

    ``logp``/``ntok`` are per sample, RL samples first, as `response_logprobs` returns
    them for ``batch.rl + batch.demos``; ``weights`` are the RL samples' importance
    weights. The pull towards the base model is the adapter's own business. The loss is
    a mean over ``total`` samples (default: this batch's); a micro-batch passes the whole
    batch's size so that its losses add up to the whole batch's.
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


def _logprobs_now(svf, z, rl, stale, logp, cfg, pad_id) -> list[float]:
    """log π_z now of the stale samples ``rl[i] for i in stale``, in the precision their
    ``old_logprob`` was recorded in (the model's own, when they were answered).

    The update's bf16 log-probs are fine for a gradient but not for a ratio: a summed
    log-prob in bf16 differs from the fp32 one by up to ~0.5 nats on the bundled model
    (`bench.update_precision`), a 1.6x error in the weight. Those samples are scored once
    more, without gradient, in the model's dtype; an fp32 update reuses its own values.
    """
    if not stale:
        return []
    if not svf.compute_precision.lowers(cfg.compute_dtype):
        return [float(logp[i].detach()) for i in stale]
    samples = [rl[i] for i in stale]
    with torch.no_grad():
        exact, _ = sequence_logprobs(svf, z.detach(), samples, cfg.max_tokens, pad_id)
    return [float(v) for v in exact]


def warm_up_compiled(svf: SVFModel, cfg: LearningConfig, pad_id: int = 0) -> float:
    """Compile the update passes now (`LearningConfig.compile`), on throwaway samples and
    a throwaway z, so that no real update stalls on it; returns the seconds it took.

    A pass of one sample and a pass of several are the two shapes compiled; the samples
    differ in length, as real ones do, so the padded path is the one compiled. Nothing
    is learnt: the gradient goes to a z that is dropped.
    """
    if not cfg.compile:
        return 0.0
    vocab = svf.model.get_input_embeddings().num_embeddings

    def run_pass(rows: int) -> None:
        ids = [(pad_id + 1 + i) % vocab for i in range(80)]
        samples = [Sample(ids[: 30 + 3 * i], ids[50:74], reward=1.0) for i in range(rows)]
        z = svf.trainable()
        with svf.compute_precision(cfg.compute_dtype):
            logp, _ = sequence_logprobs(
                svf, z, samples, cfg.max_tokens, pad_id, share_prefix=False, compiled=True
            )
        logp.sum().backward()

    return svf.compiled_passes.warm_up(run_pass)


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
    replay: list[Sample] = (),
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
    dropped = plan.dropped_stale
    # what every result but an update records: the reward statistics are facts about the
    # community even when no step is taken, unless they are non-finite, which a baseline
    # would carry into every later advantage of the node
    kept = plan.baseline if math.isfinite(plan.baseline) else baseline
    if plan.skip:
        return StepResult(None, "skipped", plan.skip, kept, dropped_stale=dropped)
    if scale <= 0:
        reason = "settled (no 👎 among the node's recent rated replies)"
        return StepResult(None, "skipped", reason, kept, dropped_stale=dropped)
    if not np.isfinite(z0).all():
        return StepResult(
            None, "rolled_back", "the node's z is non-finite", kept, dropped_stale=dropped
        )
    rl, batch = plan.rl, plan.rl + plan.demos
    z = svf.trainable(torch.from_numpy(np.asarray(z0, dtype=np.float32)))
    start = z.detach().clone()
    lr, max_step = cfg.lr * scale, cfg.max_step * scale
    opt = torch.optim.Adam([z], lr=lr) if cfg.optimizer == "adam" else None
    n = len(batch)
    weights = torch.ones(len(rl), device=svf.device)
    # a compiled pass runs every row whole: the prefix pass, with its KV cache, is what
    # compiling would have to cover twice, and its small operations are what it saves
    compiled = cfg.compile
    share = not compiled and shares_prefix(svf, cfg.compute_dtype)
    if compiled and not svf.compiled_passes.warmed:
        warm_up_compiled(svf, cfg, pad_id)
    loss_value, grad_norm = float("nan"), float("nan")
    for step in range(cfg.inner_steps):
        z.grad = None
        loss_sum = 0.0
        for lo, part in plan.passes(cfg.micro_batch):
            with svf.compute_precision(cfg.compute_dtype):
                logp, ntok = sequence_logprobs(
                    svf,
                    z,
                    part.rl + part.demos,
                    cfg.max_tokens,
                    pad_id,
                    share_prefix=share,
                    compiled=compiled,
                )
            w = weights[lo : lo + len(part.rl)]
            if step == 0:  # truncated importance weights for samples from an older z
                stale = [
                    i
                    for i, s in enumerate(part.rl)
                    if s.old_logprob is not None and s.staleness > 0
                ]
                now = _logprobs_now(svf, z, part.rl, stale, logp, cfg, pad_id)
                for i, lp in zip(stale, now, strict=True):
                    ratio = math.exp(min(50.0, lp - part.rl[i].old_logprob))
                    w[i] = min(ratio, cfg.is_clip)
            # every pass divides by the whole batch's size: the sum of the passes' losses
            # is the whole batch's loss, and so are the accumulated gradients
            loss = feedback_loss(part, logp, ntok, w, cfg, total=n)
            if lo == 0:
                loss = loss + (cfg.l2 / 2) * ((z - 1) ** 2).sum()
            if not torch.isfinite(loss):
                return StepResult(
                    None, "rolled_back", "non-finite loss", kept, dropped_stale=dropped
                )
            loss.backward()
            loss_sum += float(loss.detach())
            yield
        grad_norm = float(torch.nn.utils.clip_grad_norm_([z], cfg.max_grad_norm))
        if not math.isfinite(grad_norm):
            return StepResult(
                None, "rolled_back", "non-finite gradient", kept, dropped_stale=dropped
            )
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                z -= lr * z.grad / z.grad.norm().clamp_min(1e-12)
        with torch.no_grad():
            delta = z - start
            norm = float(delta.norm())
            if norm > max_step:
                z.copy_(start + delta * (max_step / norm))
            if cfg.max_drift > 0:  # project back into the ball around the base model
                drift = float((z - 1).norm())
                if drift > cfg.max_drift:
                    z.copy_(1 + (z - 1) * (cfg.max_drift / drift))
        loss_value = loss_sum
    new_z = z.detach().cpu().numpy().astype(np.float32)
    if not np.isfinite(new_z).all():
        return StepResult(None, "rolled_back", "non-finite z", kept, dropped_stale=dropped)
    return StepResult(
        new_z,
        "updated",
        "",
        kept,
        loss=loss_value,
        grad_norm=grad_norm,
        step_norm=float(np.linalg.norm(new_z - z0)),
        used=n,
        dropped_stale=dropped,
        metrics={"mean_weight": float(weights.mean()) if rl else 1.0, "scale": scale},
    )
