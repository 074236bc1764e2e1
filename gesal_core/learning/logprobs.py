"""Scoring: log π_z(response | prompt) of samples, fast on a CPU, exact in value.

The REINFORCE maths (`reinforce`) needs one number per sample, the summed log-prob of
its response tokens, and its gradient in z. Most of an update's time is spent here, so
this module holds the speed choices, each exact or bounded in error:

* logits only from the first position that predicts a response token, and log π(y) as
  ``logit[y] − logsumexp`` in a custom autograd function (`_TargetLogprob`) whose
  backward pass needs one vocabulary-sized buffer;
* the prompt prefix every row shares run once, its KV cache repeated (`shares_prefix`
  says when that pays);
* rows padded so that a compiled forward never meets a shape it did not compile
  (`_pad_for_compiled`, `warm_up_compiled`);
* matrix products in bf16 where that runs faster (`LearningConfig.compute_dtype`), with
  importance ratios scored in the model's own precision (`UpdateScorer.exact`).

`UpdateScorer` puts these together for one update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import LearningConfig
from ..generate import cache_kwargs, cache_of, decoder_of
from ..svf import SVFModel
from ..svf.precision import SAFE_ROWS
from .samples import Sample

# the fewest positions (rows × tokens) a compiled pass runs (`_pad_for_compiled`)
COMPILED_MIN_TOKENS = 64


def batch_tensors(
    samples: list[Sample], max_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _pad_for_compiled(ids, attn, weight, first: int, pad_id: int):
    """Right-pad a pass for the compiled forward so that every pass falls on the side of
    each size test that the warm-up compiled. A compiled graph guards on such tests, and
    failing one recompiles: minutes on a CPU, in the middle of an update. The tests:
    whether any row is padded (the attention mask's path), inductor's kernel choice below
    64 positions, and the LM head's row padding below `SAFE_ROWS` rows (`svf.precision`).
    Padding is masked out and weighs nothing, so the values and gradients are the same.
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


def _first_response_position(resp: torch.Tensor) -> int:
    """The earliest position of a response token in any row (at least 1): the logits one
    position before it are the first that are needed."""
    width = resp.shape[1]
    has = resp.any(1)
    first = int(torch.where(has, resp.float().argmax(1), width).min()) if has.any() else width
    return max(first, 1)


def _response_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attn: torch.Tensor,
    keep: int,
    prefix: int,
    forward: Callable[..., Any] | None,
) -> torch.Tensor:
    """The last ``keep`` positions' logits of every row; with ``prefix`` > 0 the first
    ``prefix`` tokens (the same in every row) run once and their KV cache is repeated."""
    if not prefix:
        call = forward or model
        return call(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
    cache = _prefix_cache(model, ids[:1, :prefix])
    cache.batch_repeat_interleave(ids.shape[0])
    return model(
        input_ids=ids[:, prefix:],
        attention_mask=attn,
        use_cache=True,
        **cache_kwargs(model, cache),
        logits_to_keep=keep,
    ).logits


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
    token at position t is predicted by the logits at t-1. Logits are computed only from
    the first position that predicts a response token (a prompt position's vocabulary
    projection is wasted work). With ``share_prefix`` (every row runs the *same* model:
    one adapter, not per-row z), the token prefix all rows share (the chat template's
    system prompt, at least) is run once and its KV cache repeated across the batch:
    causal attention makes those positions' states identical in every row, and gradients
    flow through the repeat.
    """
    device = next(model.buffers(), None)
    device = device.device if device is not None else next(model.parameters()).device
    ids, attn, weight = (t.to(device) for t in batch_tensors(samples, max_tokens, pad_id))
    first = _first_response_position(weight > 0)
    if forward is not None:
        ids, attn, weight = _pad_for_compiled(ids, attn, weight, first, pad_id)
    prefix = 0
    if share_prefix and len(samples) > 1:
        prefix = _shared_prefix(ids, attn, first - 1)  # keep the predicting logits after it
        if prefix < 8:  # not worth a second model call
            prefix = 0
    keep = ids.shape[1] - (first - 1)  # positions first-1 .. width-1 (the last predicts nothing)
    logits = _response_logits(model, ids, attn, keep, prefix, forward)
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


class UpdateScorer:
    """How one update's passes are scored on this machine: products in
    ``cfg.compute_dtype``, the shared prompt prefix run once where that pays
    (`shares_prefix`), or every row whole through the compiled forward
    (``cfg.compile``, compiled on first use). The update's maths sees only log-probs.

    A compiled pass runs every row whole: the prefix pass, with its KV cache, is what
    compiling would have to cover twice, and its small operations are what it saves.
    """

    def __init__(self, svf: SVFModel, cfg: LearningConfig, pad_id: int = 0) -> None:
        self.svf, self.cfg, self.pad_id = svf, cfg, pad_id
        self.compiled = cfg.compile
        self.share = not self.compiled and shares_prefix(svf, cfg.compute_dtype)
        if self.compiled and not svf.compiled_passes.warmed:
            warm_up_compiled(svf, cfg, pad_id)

    def __call__(self, z: torch.Tensor, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log π, token count) per sample, differentiable in z."""
        with self.svf.compute_precision(self.cfg.compute_dtype):
            return sequence_logprobs(
                self.svf,
                z,
                samples,
                self.cfg.max_tokens,
                self.pad_id,
                share_prefix=self.share,
                compiled=self.compiled,
            )

    def exact(
        self, z: torch.Tensor, samples: list[Sample], logp: torch.Tensor, rows: list[int]
    ) -> list[float]:
        """log π_z of ``samples[i] for i in rows`` in the precision their ``old_logprob``
        was recorded in (the model's own, when they were answered); ``logp`` is this
        pass's scores of ``samples``.

        The update's bf16 log-probs are fine for a gradient but not for a ratio: a summed
        log-prob in bf16 differs from the fp32 one by up to ~0.5 nats on the bundled model
        (`bench.update_precision`), a 1.6x error in the weight. Those samples are scored
        once more, without gradient, in the model's dtype; an fp32 update reuses ``logp``.
        """
        if not rows:
            return []
        if not self.svf.compute_precision.lowers(self.cfg.compute_dtype):
            return [float(logp[i].detach()) for i in rows]
        again = [samples[i] for i in rows]
        with torch.no_grad():
            exact, _ = sequence_logprobs(
                self.svf, z.detach(), again, self.cfg.max_tokens, self.pad_id
            )
        return [float(v) for v in exact]
