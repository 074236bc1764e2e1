"""Batched, adapter-aware generation: the function the model worker runs per batch.

Given the requests that piled up (possibly from many channels, each on its own node), it
picks the cheapest correct way to run them:

* every row on one node whose merged weights are current or in the LRU: **merged**, the
  base model's speed;
* otherwise **factored**: ``((x Vhᵀ) ⊙ σ z_b) Uᵀ`` with one z per row, so N channels share
  one forward pass (the SVF analogue of multi-LoRA batching) and a cold node costs no
  ~0.7 s merge before its first token.

A node used ``hot_after`` times gets its merged weights built in the worker's idle
moments (a few layers per step), so its later answers run merged without anyone waiting.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from .generate import Generation, Prompt, SamplingConfig, generate
from .learning import Sample, sequence_logprobs
from .svf import SVFModel
from .worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    hot_after: int = 2  # uses of a node before its merged weights are prepared
    layers_per_step: int = 4  # idle-time merge granularity (~8 ms per layer on a CPU)
    max_resamples: int = 3  # tries to avoid an empty answer or a downvoted one
    track_nodes: int = 4096  # how many nodes' use counts are remembered


@dataclass
class GenRequest:
    """One answer to generate. ``key`` names the adapter (None: never merged or cached)."""

    prompt: Prompt
    z: np.ndarray
    key: Hashable | None
    sampling: SamplingConfig
    avoid: set[str] = field(default_factory=set)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    merged_batches: int = 0
    factored_batches: int = 0
    resamples: int = 0
    premerges: int = 0


class BatchedGenerator:
    """Callable given to `ModelWorker.batch`: ``gen(requests) -> [(Generation, logprob)]``.

    Runs on the model thread only. ``normalize`` maps a text to the form in which
    downvoted answers are remembered (the engine owns that rule).
    """

    def __init__(
        self,
        svf: SVFModel,
        tokenizer,
        worker: ModelWorker,
        config: ServingConfig | None = None,
        normalize: Callable[[str], str] = lambda s: " ".join(s.lower().split()),
    ) -> None:
        self.svf, self.tokenizer, self.worker = svf, tokenizer, worker
        self.config = config or ServingConfig()
        self.normalize = normalize
        self.stats = BatchStats()
        self._uses: OrderedDict[Hashable, int] = OrderedDict()
        self._premerging: set[Hashable] = set()

    def __call__(self, requests: list[GenRequest]) -> list[tuple[Generation, float]]:
        if not requests:
            return []
        sampling = requests[0].sampling
        if any(r.sampling != sampling for r in requests):
            raise ValueError("one batch must share its sampling settings")
        zs = torch.from_numpy(np.stack([np.asarray(r.z, dtype=np.float32) for r in requests]))
        keys = {r.key for r in requests}
        single = len(keys) == 1 and None not in keys
        key = requests[0].key
        self.stats.batches += 1
        self.stats.rows += len(requests)
        for r in requests:
            self._count_use(r)
        if single and self.svf.has_merged(key):
            self.stats.merged_batches += 1
            self.svf.set_merged(zs[0], key=key)
            outs = self._generate_with(None, requests, sampling)
        else:
            self.stats.factored_batches += 1
            z = zs[0] if single else zs
            with self.svf.factored(z):
                outs = self._generate_with(z, requests, sampling)
        # each answer's log π under its own z, recorded while it was generated
        unscored = [i for i, o in enumerate(outs) if math.isnan(o.logprob)]
        if unscored:  # only if `generate` could not record it (see `generate.generate`)
            with torch.no_grad():
                lp, _ = sequence_logprobs(
                    self.svf,
                    zs[0] if single else zs[unscored],
                    [Sample(outs[i].prompt_ids, outs[i].response_ids) for i in unscored],
                    pad_id=self.tokenizer.pad_token_id or 0,
                )
            for j, i in enumerate(unscored):
                outs[i].logprob = float(lp[j])
        return [(o, o.logprob) for o in outs]

    def _generate_with(
        self, z: torch.Tensor | None, requests: list[GenRequest], sampling: SamplingConfig
    ) -> list[Generation]:
        """Generate every row, then re-sample the rows that came out empty or repeated a
        downvoted answer.

        An empty answer says nothing and a chat platform will not post it (the bot would
        send "…"); an adapter taught to be brief sometimes ends its answer at the first
        token (one held-out answer of 32 in a brevity run, "Why do cats purr?" -> "").
        """
        prompts = [r.prompt for r in requests]
        outs = generate(self.svf.model, self.tokenizer, prompts, sampling)
        for _ in range(self.config.max_resamples):
            redo = [
                i
                for i, o in enumerate(outs)
                if not o.text or self.normalize(o.text) in requests[i].avoid  # text is stripped
            ]
            if not redo:
                break
            self.stats.resamples += len(redo)
            log.info("resampling %d answer(s) that were empty or voted down before", len(redo))
            sub = [prompts[i] for i in redo]
            if z is not None and z.dim() == 2:  # per-row adapters: keep only the redone rows
                with self.svf.factored(z[redo]):
                    again = generate(self.svf.model, self.tokenizer, sub, sampling)
            else:
                again = generate(self.svf.model, self.tokenizer, sub, sampling)
            for i, o in zip(redo, again, strict=True):
                outs[i] = o
        return outs

    def _count_use(self, request: GenRequest) -> None:
        key = request.key
        if key is None:
            return
        n = self._uses.pop(key, 0) + 1
        self._uses[key] = n
        while len(self._uses) > self.config.track_nodes:
            self._uses.popitem(last=False)
        if (
            n >= self.config.hot_after
            and key not in self._premerging
            and not self.svf.has_merged(key)
        ):
            self._premerging.add(key)
            self.stats.premerges += 1
            self.worker.when_idle(self._premerge(request.z, key))

    def _premerge(self, z: np.ndarray, key: Hashable):
        try:
            yield from self.svf.merge_steps(
                torch.from_numpy(np.asarray(z, dtype=np.float32)), key, self.config.layers_per_step
            )
        finally:
            self._premerging.discard(key)
