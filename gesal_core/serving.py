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
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from .generate import (
    Generation,
    PrefixKV,
    Prompt,
    SamplingConfig,
    cache_layers,
    cache_of,
    decoder_of,
    generate,
)
from .learning import Sample, sequence_logprobs
from .svf import SVFModel
from .svf.cache import MergedCache
from .worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    hot_after: int = 2  # uses of a node before its merged weights are prepared
    layers_per_step: int = 4  # idle-time merge granularity (~8 ms per layer on a CPU)
    max_resamples: int = 3  # tries to avoid an empty answer or a downvoted one
    track_nodes: int = 4096  # how many nodes' use counts are remembered
    # LRU of each node's KV cache of the chat template's head (`generate.PrefixKV`);
    # one entry per (node, version) and system prompt; 0 turns it off
    prefix_cache_mb: float = 64.0
    min_prefix: int = 4  # shorter shared heads are not worth a cache entry


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
    prefix_hits: int = 0  # rows whose template head came from the prefix LRU
    prefix_misses: int = 0  # rows whose head was computed (and then kept)


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
        self.prefixes = MergedCache(int(self.config.prefix_cache_mb * 2**20))

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
        prefix = self._prefix(z, requests)
        outs = self._generate(prompts, sampling, prefix)
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
            part = prefix.rows(redo) if prefix is not None else None
            if z is not None and z.dim() == 2:  # per-row adapters: keep only the redone rows
                with self.svf.factored(z[redo]):
                    again = self._generate(sub, sampling, part)
            else:
                again = self._generate(sub, sampling, part)
            for i, o in zip(redo, again, strict=True):
                outs[i] = o
        return outs

    def forget(self, channel: str) -> None:
        """Drop everything cached for ``channel``'s nodes: merged weights, template heads and
        use counts. Keys are (channel, node, version), and an import restores nodes with
        their ids and versions but possibly another z; runs on the model thread."""

        def ours(key: Hashable) -> bool:
            return isinstance(key, tuple) and bool(key) and key[0] == channel

        self.svf.forget(ours)
        for key in self.prefixes.keys():  # noqa: SIM118 (a list copy: safe to discard from)
            if ours(key[0]):
                self.prefixes.discard(key)
        for key in [k for k in self._uses if ours(k)]:
            del self._uses[key]
        self._premerging -= {k for k in self._premerging if ours(k)}

    def _generate(
        self, prompts: list[Prompt], sampling: SamplingConfig, prefix: PrefixKV | None
    ) -> list[Generation]:
        if prefix is not None:
            try:
                return generate(self.svf.model, self.tokenizer, prompts, sampling, prefix=prefix)
            except (TypeError, ValueError, AttributeError) as exc:
                # a model or transformers version whose generate takes no such cache: answer
                # without it from now on (slower prefill, same answers)
                log.warning("prefix KV cache turned off, generation refused it: %r", exc)
                self.prefixes.max_bytes = 0
                self.prefixes.clear()
        return generate(self.svf.model, self.tokenizer, prompts, sampling)

    def _prefix(self, z: torch.Tensor | None, requests: list[GenRequest]) -> PrefixKV | None:
        """The batch's shared template head as a KV cache, one row per request under its
        own adapter: from the LRU, or computed now (all missing rows in one pass) and kept.

        Runs inside the SVF state the batch generates under (``z``: None when merged, one
        z, or a z per row), so a row's head is exactly what prefilling it would compute.
        Anonymous adapters (key None) are not cached: nothing could find them again.
        """
        shared = min(r.prompt.head for r in requests)
        head = requests[0].prompt.input_ids[:shared]
        if (
            self.prefixes.max_bytes <= 0
            or shared < self.config.min_prefix
            or any(r.key is None for r in requests)
            or any(r.prompt.input_ids[:shared] != head for r in requests)
        ):
            return None
        keys = [(r.key, tuple(head)) for r in requests]
        found = {key: self.prefixes.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, kv in found.items() if kv is None]
        self.stats.prefix_misses += sum(found[key] is None for key in keys)
        self.stats.prefix_hits += sum(found[key] is not None for key in keys)
        if missing:
            rows = [keys.index(key) for key in missing]
            ids = torch.tensor([head] * len(rows), device=self.svf.device)
            per_row = z is not None and z.dim() == 2  # else the batch's state is every row's
            with self.svf.factored(z[rows]) if per_row else nullcontext(), torch.inference_mode():
                decoder = decoder_of(self.svf.model) or self.svf.model
                layers = cache_layers(cache_of(decoder(input_ids=ids)))
            for j, key in enumerate(missing):
                kv = {
                    f"{i}{n}": t[j : j + 1].clone()
                    for i, pair in enumerate(layers)
                    for n, t in zip("kv", pair, strict=True)
                }
                self.prefixes.put(key, kv)
                found[key] = kv
        depth = len(found[keys[0]]) // 2
        return PrefixKV(
            shared,
            [
                (
                    torch.cat([found[key][f"{i}k"] for key in keys]),
                    torch.cat([found[key][f"{i}v"] for key in keys]),
                )
                for i in range(depth)
            ],
        )

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
        steps = self.svf.merge_steps(
            torch.from_numpy(np.asarray(z, dtype=np.float32)), key, self.config.layers_per_step
        )
        try:
            for _ in steps:
                yield
                if key not in self._premerging:  # forgotten meanwhile: never store it
                    steps.close()
                    return
        finally:
            self._premerging.discard(key)
