"""Engine: respond / vote / correct / train / export / import / reset / stats.

This is the one API the chat adapters (Discord, Slack, the playground) use. It ties
graph routing, SVF generation, the feedback buffer and REINFORCE together, and it is
platform-free: a channel is just a string key such as ``discord:123:456``.

Model work runs on the `ModelWorker` thread; everything else is asyncio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from . import graph, snapshot
from .embedding import PromptEmbedder
from .errors import GesalError
from .generate import Prompt, SamplingConfig, build_prompt
from .guard import Guard, GuardConfig, degenerate_reason
from .learning import (
    LearningConfig,
    Sample,
    correction_sample,
    prior_baseline,
    reinforce_steps,
    settle_scale,
)
from .records import (
    CORRECTION,
    ChannelConfig,
    FeedbackEvent,
    Node,
    NodeHead,
    NodeUpdate,
    Reply,
)
from .serving import BatchedGenerator, GenRequest, ServingConfig
from .store import (
    ConflictError,
    MemoryStore,
    NodeGoneError,
    Store,
    StoreUnavailableError,
    UnknownReplyError,
)
from .svf import SVFModel
from .worker import ModelWorker

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 8000
DOWNVOTED_KEPT = 64  # texts a node avoids repeating, newest kept
# A channel's training health, in its meta (the store's, so every trainer process and
# `gesal-bot stats` see it; a reset or an import clears it with the rest of the channel)
TRAIN_FAILURES = "train_failures"  # failed runs in a row
TRAIN_PARKED = "train_parked"  # true: scheduled runs skip the channel
TRAIN_ERROR = "train_error"  # the last failure, one sentence
# Capacity warnings (admin stats, /healthz): a channel is flagged before a cap bites.
# At NEAR_CAP of `max_nodes` a new topic soon folds the least used node into another; at
# NEAR_CAP of the store's reply retention the oldest replies (and their votes) soon drop.
# Feedback streams have no cap, so PENDING_WARN pending events is the threshold: a parked
# or failing channel's stream grows with every vote until an admin acts.
NEAR_CAP = 0.9
PENDING_WARN = 1000


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings; per-channel ones live in `ChannelConfig`."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    max_prompt_tokens: int = 1024
    # Exploration: when most of a node's recent rewards are negative, the temperature
    # rises linearly from sampling.temperature up to this (top_p stays). 0.7, the sampling
    # temperature: no widening (docs/learning.md, "Exploration and repeats").
    explore_max_temperature: float = 0.7
    explore_window: int = 8  # a node's latest rewards that decide exploration
    max_resamples: int = 3  # tries to avoid repeating a downvoted answer
    learning: LearningConfig = field(default_factory=LearningConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    channel_defaults: ChannelConfig = field(default_factory=ChannelConfig)
    recent_rewards: int = 16  # rewards a node keeps in its recent window
    # The trainer lock's lease: renewed by a heartbeat while training runs, so a crashed
    # trainer's lock frees within this time. The commit's checks keep a lost lock harmless.
    train_lock_ttl: float = 30.0
    # A channel trains once this many of its replies have new feedback, every node with
    # some of it; until then the feedback waits in the store. 1: train whatever is pending
    # (docs/learning.md, "Training rounds").
    train_round: int = 8
    train_max_wait: float = 86400.0  # seconds after which waiting feedback trains anyway
    # A channel whose training fails this many runs in a row is parked: scheduled runs
    # skip it, its feedback stays pending, and its admin stats show the last error, until
    # an admin trains it (`train(channel, force=True)`), resets it or imports a graph into
    # it. One channel's bad data then costs three logged tracebacks, not one per run.
    park_after: int = 3

    def __post_init__(self) -> None:
        if self.train_round < 1:
            raise GesalError(f"train_round must be at least 1, not {self.train_round}")
        if self.park_after < 1:
            raise GesalError(f"park_after must be at least 1, not {self.park_after}")
        if not self.train_max_wait >= 0:
            raise GesalError(f"train_max_wait must be 0 or more seconds, not {self.train_max_wait}")


@dataclass
class ReplyOut:
    reply_id: str
    text: str
    node_id: str
    z_version: int
    new_node: bool
    similarity: float
    temperature: float
    truncated: bool
    seconds: float


@dataclass
class NodeReport:
    node_id: str
    status: str  # updated | skipped | rolled_back | conflict | orphaned
    reason: str = ""
    samples: int = 0
    corrections: int = 0
    seconds: float = 0.0
    related: list[str] = field(default_factory=list, repr=False)  # prompts, for the guard


@dataclass
class TrainReport:
    channels: dict[str, list[NodeReport]] = field(default_factory=dict)
    events: int = 0  # feedback events learnt from (waiting ones are not counted)
    seconds: float = 0.0
    # channel -> node -> replies with new feedback, for channels whose round is not full
    waiting: dict[str, dict[str, int]] = field(default_factory=dict)
    # channel -> the error its training raised in this run (its feedback stays pending)
    failed: dict[str, str] = field(default_factory=dict)
    # channel -> the error it is parked with, for every channel this run skipped or parked
    # (`EngineConfig.park_after`)
    parked: dict[str, str] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(r.status == status for rs in self.channels.values() for r in rs)

    def summary(self) -> str:
        return (
            f"{self.events} feedback events, {self.count('updated')} nodes updated, "
            f"{self.count('skipped')} skipped, {self.count('rolled_back')} rolled back "
            f"in {self.seconds:.1f}s"
            + (f"; {n} node(s) waiting for a round" if (n := self.n_waiting()) else "")
            + (f"; training failed in {', '.join(sorted(self.failed))}" if self.failed else "")
            + (
                f"; parked until an admin acts: {', '.join(sorted(self.parked))}"
                if self.parked
                else ""
            )
        )

    def n_waiting(self) -> int:
        return sum(len(nodes) for nodes in self.waiting.values())


def reply_reward(votes: dict[str, int], cfg: ChannelConfig) -> float | None:
    """The community's verdict on one reply: the mean of its voters' rewards.

    Each user has exactly one vote (last write wins), so no single member can outweigh
    the others, and the result stays within [reward_down, reward_up]. None: no votes.
    """
    if not votes:
        return None
    values = [cfg.reward_up if v > 0 else cfg.reward_down for v in votes.values()]
    return float(np.mean(values))


def _follow(redirects: dict[str, str], node_id: str) -> str:
    """Where a node's feedback goes now: merged (folded) nodes redirect to their target."""
    while node_id in redirects:
        node_id = redirects[node_id]
    return node_id


def capacity_warnings(
    *,
    nodes: int,
    max_nodes: int,
    pending: int,
    replies: int | None = None,
    max_replies: int | None = None,
) -> list[str]:
    """One sentence per cap a channel is near (`NEAR_CAP`, `PENDING_WARN`); [] if none.

    ``max_replies`` is None for a store without reply retention (`MemoryStore`), and
    ``replies`` None where the caller counts no replies (/healthz reads counts only)."""
    out = []
    if nodes >= NEAR_CAP * max_nodes:
        out.append(
            f"{nodes} of {max_nodes} nodes: new topics fold the least used node into another"
        )
    if replies is not None and max_replies and replies >= NEAR_CAP * max_replies:
        out.append(
            f"{replies} of {max_replies} replies kept: the oldest replies and their votes drop"
        )
    if pending >= PENDING_WARN:
        out.append(
            f"{pending} feedback events pending (warning at {PENDING_WARN}): the stream grows "
            "until training drains it"
        )
    return out


async def channel_capacity(store: Store, channel: str) -> list[str]:
    """`capacity_warnings` from counts only (on Redis two ZCARDs, an XLEN and the config):
    no node or reply record is read, so /healthz stays cheap whatever channels hold."""
    cfg = await store.get_config(channel)
    return capacity_warnings(
        nodes=await store.node_count(channel),
        max_nodes=cfg.max_nodes,
        pending=await store.pending_count(channel),
        replies=await store.reply_count(channel),
        max_replies=getattr(store, "max_replies", None),  # the store's retention
    )


async def channel_stats(store: Store, channel: str) -> dict:
    """A channel's nodes, votes, rewards and updates: store reads only, no model needed
    (`gesal-bot stats` answers without loading one)."""
    nodes = await store.load_nodes(channel)
    replies = await store.list_replies(channel)
    meta = await store.meta(channel)
    config = await store.get_config(channel)
    pending = await store.pending_count(channel)
    ups = sum(v > 0 for r in replies for v in r.votes.values())
    downs = sum(v < 0 for r in replies for v in r.votes.values())
    return {
        "channel": channel,
        "nodes": len(nodes),
        "prompts": sum(n.count for n in nodes),
        "replies": len(replies),
        "votes_up": ups,
        "votes_down": downs,
        "corrections": sum(len(r.corrections) for r in replies),
        "pending_feedback": pending,
        "updates": sum(n.updates for n in nodes),
        "rollbacks": sum(n.rollbacks for n in nodes),
        "mean_reward": (sum(n.reward_sum for n in nodes) / max(1, sum(n.rated for n in nodes))),
        "last_update": meta.get("last_train"),
        # training failures in a row; parked: scheduled runs skip the channel until an
        # admin trains, resets or imports it (`EngineConfig.park_after`)
        "train_failures": int(meta.get(TRAIN_FAILURES) or 0),
        "train_parked": bool(meta.get(TRAIN_PARKED)),
        "train_error": meta.get(TRAIN_ERROR) if meta.get(TRAIN_FAILURES) else None,
        "config": asdict(config),
        # caps this channel is near, one sentence each (`capacity_warnings`)
        "near_caps": capacity_warnings(
            nodes=len(nodes),
            max_nodes=config.max_nodes,
            pending=pending,
            replies=len(replies),
            max_replies=getattr(store, "max_replies", None),  # the store's retention
        ),
        "node_list": [
            {
                "id": n.node_id,
                "count": n.count,
                "version": n.version,
                "mean_reward": n.mean_reward,
                "rated": n.rated,
                # how far its adapter has moved from the base model (LearningConfig.max_drift)
                "drift": round(float(np.linalg.norm(n.z - 1)), 4),
                "edges": n.neighbors,
            }
            for n in nodes
        ],
    }


# a URL, or anything with user@host in it, may carry a user name, a password or an address
_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+|\S+@\S+", re.IGNORECASE)


def _error_sentence(exc: BaseException) -> str:
    """A failure in one line for admin stats: the exception's type and the first line of
    its message, addresses removed, cut at 200 characters. The traceback is logged."""
    lines = str(exc).strip().splitlines()
    words = _ADDRESS.sub("<address>", lines[0].strip()) if lines else ""
    if len(words) > 200:
        words = words[:199] + "…"
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


def _refuse_non_finite(channel: str, updates: list[NodeUpdate], reports: list[NodeReport]) -> None:
    """The last check before a commit: a z with a NaN or an infinity is never written
    (the node would answer nothing but errors); its node is rolled back instead."""
    for update, report in zip(updates, reports, strict=True):
        if update.z is not None and not np.isfinite(update.z).all():
            update.z, update.updated, update.rolled_back = None, False, True
            report.status, report.reason = "rolled_back", "non-finite z"
            log.warning("channel %s node %s: non-finite z rolled back", channel, update.node_id)


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


def _conversation(messages: object) -> list[dict]:
    """The messages to answer, checked: a chat adapter's bug becomes a clear error, not a
    KeyError deep in the prompt builder. Very long texts keep their ends."""
    if not isinstance(messages, list | tuple) or not messages:
        raise GesalError("there is no question to answer: the message is empty")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise GesalError("each message must be a dict with a text 'content'")
        role = m.get("role", "user")
        if role not in ("user", "assistant"):
            raise GesalError(f"a message's role is 'user' or 'assistant', not {role!r}")
        out.append({"role": role, "content": m["content"][-MAX_MESSAGE_CHARS:]})
    if not out[-1]["content"].strip():
        raise GesalError("there is no question to answer: the message is empty")
    return out


class Engine:
    def __init__(
        self,
        svf: SVFModel,
        tokenizer,
        store: Store | None = None,
        config: EngineConfig | None = None,
        worker: ModelWorker | None = None,
        model_name: str = "model",
    ) -> None:
        self.svf, self.tokenizer = svf, tokenizer
        self.store: Store = store or MemoryStore()
        self.config = config or EngineConfig()
        self.worker = worker or ModelWorker()
        self.serving = BatchedGenerator(
            svf,
            tokenizer,
            self.worker,
            ServingConfig(max_resamples=self.config.max_resamples),
            normalize=_norm_text,
        )
        self.model_name = model_name
        self.guard = Guard(
            svf, tokenizer, self.config.guard, self.config.system, self.config.sampling
        )
        self.embedder = PromptEmbedder(svf, tokenizer)
        self.consumer = f"trainer-{uuid.uuid4().hex[:8]}"
        self._channel_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._train_lock = asyncio.Lock()
        self.last_train: float | None = None
        # wall-clock seconds, the feedback events' own clock (their `ts`): how long a
        # channel's feedback has waited for its round (tests move it)
        self.clock: Callable[[], float] = time.time
        # (channel, node) -> normalised texts voted down since the last training run: a
        # node's own list (`Node.downvoted`) is only written by training, and a member who
        # just voted an answer down should not get it again minutes later
        self._fresh_downvotes: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        store: Store | None = None,
        config: EngineConfig | None = None,
        device: str | None = None,
        dtype: str | None = None,
        targets: str = "mlp",
    ) -> Engine:
        """Load a model (the bundled one by default), wrap it with SVF and build an engine."""
        from .model import load_model
        from .svf import SVFConfig

        lm = load_model(model, device=device, dtype=dtype)
        svf = SVFModel(lm.model, lm.name, SVFConfig(targets=targets))
        return cls(svf, lm.tokenizer, store, config, model_name=lm.name)

    def close(self) -> None:
        self.worker.close()

    # -- model-thread helpers ----------------------------------------------------------
    def _embed(self, text: str) -> np.ndarray:
        """The routing embedding of one prompt (see gesal_core/embedding.py)."""
        return self.embedder([text])[0]

    def _generate(
        self, prompt: Prompt, z: np.ndarray, key: tuple, sampling: SamplingConfig, avoid: set[str]
    ):
        """One answer on the model thread (respond batches through `self.serving` instead)."""
        return self.serving([GenRequest(prompt, z, key, sampling, avoid)])[0]

    # -- respond ------------------------------------------------------------------------
    async def respond(self, channel: str, messages: list[dict], record: bool = True) -> ReplyOut:
        """Answer the last message of ``messages`` (oldest first) in ``channel``.

        ``record=False`` answers exactly as the channel would but changes nothing (no
        node created or counted, no reply stored): evaluation uses it on held-out prompts.
        """
        messages = _conversation(messages)
        start = time.perf_counter()
        question = messages[-1]["content"]
        emb = await self.worker.run(self._embed, question)
        node, new, sim = await self._route(channel, emb, create=record)
        if record:
            await self.store.observe(channel, node.node_id, emb)
        cfg = self.config
        sampling = self._explore(node)
        prompt = build_prompt(self.tokenizer, messages, cfg.system, cfg.max_prompt_tokens)
        key = (channel, node.node_id, node.version) if record or not new else None
        avoid = set(node.downvoted) | set(self._fresh_downvotes.get((channel, node.node_id), ()))
        request = GenRequest(prompt, node.z, key, sampling, avoid)
        # concurrent answers (other channels, other nodes) share one batched forward
        out, logprob = await self.worker.batch(self.serving, request, group=sampling)
        reply = Reply(
            reply_id=uuid.uuid4().hex,
            node_id=node.node_id,
            prompt_ids=out.prompt_ids,
            response_ids=out.response_ids,
            prompt_text=question,
            text=out.text,
            z_version=node.version,
            logprob=logprob,
        )
        if record:
            await self.store.put_reply(channel, reply, require_node=True)
        return ReplyOut(
            reply.reply_id,
            out.text,
            node.node_id,
            node.version,
            new,
            sim,
            sampling.temperature,
            prompt.truncated,
            time.perf_counter() - start,
        )

    def _explore(self, node: Node) -> SamplingConfig:
        """Widen sampling for a node the community keeps rejecting; narrow it back after."""
        base = self.config.sampling
        recent = node.recent[-self.config.explore_window :]
        if not recent or base.greedy:
            return base
        negative = sum(r < 0 for r in recent) / len(recent)
        boost = max(0.0, negative - 0.5) * 2  # 0 until most votes are 👎, 1 when all are
        top = max(base.temperature, self.config.explore_max_temperature)
        temp = base.temperature + (top - base.temperature) * boost
        return SamplingConfig(
            base.max_new_tokens, temp, base.top_p, base.top_k, base.repetition_penalty
        )

    async def _route(
        self, channel: str, emb: np.ndarray, create: bool = True
    ) -> tuple[Node, bool, float]:
        """The node that answers ``emb``: the nearest one, or a new one (True) when none
        is similar enough. Routing reads the nodes' heads (`Store.node_heads`, no z), so
        a mention's store read grows with the embeddings only; the one z read is the
        answering node's, or a new node's neighbours' (and a fold's two nodes when the
        channel is full). A node deleted between the two reads (a reset, or a fold by
        another process) raises NodeGoneError, as `observe` would have."""
        async with self._channel_locks[channel]:  # two new prompts must not race to create
            heads = await self.store.node_heads(channel)
            cfg = await self.store.get_config(channel)
            index = graph.GraphIndex.build(heads)
            route = graph.route(index, emb, cfg.threshold)
            if route.node_id is not None:
                return await self._node(channel, route.node_id), False, route.similarity
            if not create:  # what a new node would start from, without storing it
                z = await self._initial_z(channel, index, emb)
                return Node("(new)", emb.copy(), z), True, route.similarity
            if len(heads) >= cfg.max_nodes:
                if not await self._fold_least_used(channel, heads, index):
                    # the only node takes it
                    return await self._node(channel, heads[0].node_id), False, route.similarity
                heads = await self.store.node_heads(channel)
                index = graph.GraphIndex.build(heads)
            node = Node(
                node_id=graph.new_node_id(),
                embedding=emb.copy(),
                z=await self._initial_z(channel, index, emb),
            )
            await self.store.save_node(channel, node)
            edges = graph.knn_edges(index, node)
            await self.store.set_neighbors(channel, node.node_id, edges)
            grown = graph.GraphIndex.build([*heads, node])
            by_id = {h.node_id: h for h in heads}
            for other, _ in edges:  # keep the neighbours' edge lists current too
                await self.store.set_neighbors(channel, other, graph.knn_edges(grown, by_id[other]))
            node.neighbors = edges
            return node, True, route.similarity

    async def _node(self, channel: str, node_id: str) -> Node:
        node = await self.store.get_node(channel, node_id)
        if node is None:
            raise NodeGoneError(node_id)
        return node

    async def _initial_z(self, channel: str, index: graph.GraphIndex, emb: np.ndarray):
        """`graph.initial_z`, reading the z of only the neighbours it blends."""
        nodes = {i: await self._node(channel, i) for i, _ in graph.init_neighbours(index, emb)}
        return graph.initial_z(index, nodes, emb, self.svf.z_size)

    async def _fold_least_used(
        self, channel: str, heads: list[NodeHead], index: graph.GraphIndex
    ) -> bool:
        """Fold a full channel's least used node into its nearest; False when there is no
        other node (max_nodes 1): deleting the only one would orphan the feedback waiting
        on its replies."""
        least = graph.least_used(heads)
        nearest = index.nearest(least.embedding, k=1, exclude=least.node_id)
        if not nearest:
            return False
        victim = await self._node(channel, least.node_id)
        target = await self._node(channel, nearest[0][0])
        await self.store.save_node(channel, graph.merge_into(target, victim))
        meta = await self.store.meta(channel)
        merged = dict(meta.get("merged", {}))
        merged[victim.node_id] = target.node_id
        await self.store.set_meta(channel, merged=merged)
        await self.store.delete_node(channel, victim.node_id)
        log.info("channel %s full: folded node %s away", channel, victim.node_id)
        return True

    # -- feedback -----------------------------------------------------------------------
    async def link_message(self, channel: str, reply_id: str, message_id: str) -> None:
        """Remember which platform message carries a reply, so reactions can find it."""
        await self.store.link_message(channel, reply_id, str(message_id))

    async def discard_reply(self, channel: str, reply_id: str) -> None:
        """Forget a reply that could not be posted: nobody can vote on or correct it,
        so keeping it would only hold a place in the channel's reply history."""
        await self.store.drop_reply(channel, reply_id)

    async def reply_for_message(self, channel: str, message_id: str) -> str | None:
        return await self.store.reply_for_message(channel, str(message_id))

    async def _owner(self, channel: str, reply: Reply) -> str:
        """The node a reply's feedback goes to now (its own, or the one it was folded into)."""
        return _follow((await self.store.meta(channel)).get("merged", {}), reply.node_id)

    async def vote(self, channel: str, reply_id: str, user: str, value: int | None) -> str:
        """Record user's 👍 (+1), 👎 (-1) or retraction (None); durable when this returns."""
        if value is not None and (type(value) is not int or value not in (1, -1)):
            raise GesalError("a vote is +1, -1 or None (retract)")
        event = await self.store.set_vote(channel, reply_id, str(user), value)
        try:  # the vote is durable now; keeping its answer out of the next ones is a bonus
            reply = await self.store.get_reply(channel, reply_id)
            if reply is not None:
                await self._note_verdict(channel, reply)
        except GesalError as exc:
            log.warning(
                "vote on %s recorded; its answer is avoided from the next training run on: %s",
                reply_id,
                exc,
            )
        return event

    async def _note_verdict(self, channel: str, reply: Reply) -> None:
        """Keep a reply the community now rejects out of its node's answers at once."""
        fresh = self._fresh_downvotes[(channel, await self._owner(channel, reply))]
        reward = reply_reward(reply.votes, await self.store.get_config(channel))
        text = _norm_text(reply.text)
        fresh.pop(text, None)
        if reward is not None and reward < 0:
            fresh[text] = None  # newest last
            while len(fresh) > DOWNVOTED_KEPT:
                fresh.pop(next(iter(fresh)))

    async def correct(self, channel: str, reply_id: str, user: str, text: str) -> str:
        """A member's better answer to a reply: a demonstration for the node that answered.

        A member's second correction of the same reply replaces their first (last write
        wins, as for votes), so no member can stack demonstrations on one answer.
        """
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise GesalError("the correction is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            raise GesalError(f"the correction is too long (over {MAX_MESSAGE_CHARS} characters)")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return await self.store.add_correction(
            channel, reply_id, str(user), text, list(ids) + ([eos] if eos is not None else [])
        )

    # -- training -----------------------------------------------------------------------
    async def pending(self, channel: str) -> int:
        return await self.store.pending_count(channel)

    async def train(self, channel: str | None = None, *, force: bool = False) -> TrainReport:
        """Learn from pending feedback (of one channel, or of every channel).

        A channel whose round is not full (`EngineConfig.train_round`, `train_max_wait`)
        keeps its feedback pending, and its nodes are listed in `TrainReport.waiting`;
        ``force`` trains all pending feedback now (an admin's "train now").

        Channels fail one by one, as they train: a channel whose training raises is
        logged with its traceback, listed in `TrainReport.failed`, keeps its feedback
        pending, and the run goes on with the next channel. After
        `EngineConfig.park_after` failures in a row the channel is parked
        (`TrainReport.parked`, its admin stats): only ``train(channel, force=True)``, an
        admin's "train now" of that channel, trains it again, and a reset or an import
        clears it. An unreachable store or a stopped model worker ends the run instead:
        no channel could train, and it is no channel's fault.
        """
        report = TrainReport()
        start = time.perf_counter()
        async with self._train_lock:
            channels = [channel] if channel else await self.store.channels()
            for ch in channels:
                await self._train_channel(ch, force, report, admin=force and channel is not None)
        report.seconds = time.perf_counter() - start
        self.last_train = time.time()
        return report

    async def _train_channel(
        self, channel: str, force: bool, report: TrainReport, admin: bool = False
    ) -> None:
        """Train one channel into ``report``; its failure is its own (see `train`)."""
        async with self.store.trainer_lock(channel, self.config.train_lock_ttl) as held:
            if not held:
                log.info("training %s: another trainer is at it; skipping this round", channel)
                return
            failures = 0
            try:  # a channel whose own meta cannot be read fails alone too
                meta = await self.store.meta(channel)
                failures = int(meta.get(TRAIN_FAILURES) or 0)
                if meta.get(TRAIN_PARKED) and not admin:
                    report.parked[channel] = str(meta.get(TRAIN_ERROR) or "")
                    log.debug("training %s: parked until an admin acts", channel)
                    return
                reports, n_events, waiting = await self._train_channel_locked(channel, force)
            except StoreUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - one channel's failure stays its own
                if not self.worker.alive():
                    raise
                await self._training_failed(channel, exc, failures + 1, report)
                return
            if reports or n_events:
                report.channels[channel] = reports
                report.events += n_events
            if waiting:
                report.waiting[channel] = waiting
            if failures and (n_events or admin):
                await self.store.set_meta(
                    channel, **{TRAIN_FAILURES: 0, TRAIN_PARKED: False, TRAIN_ERROR: None}
                )
                log.info("training %s works again after %d failed run(s)", channel, failures)

    async def _training_failed(
        self, channel: str, exc: Exception, failures: int, report: TrainReport
    ) -> None:
        """Log, report and record a channel's failed run; park it after
        `EngineConfig.park_after` of them in a row."""
        error = _error_sentence(exc)
        parked = failures >= self.config.park_after
        report.failed[channel] = error
        if parked:
            report.parked[channel] = error
        log.error(
            "training %s failed (%d run(s) in a row)%s; its feedback stays pending: %s",
            channel,
            failures,
            ", parked until an admin trains, resets or imports it" if parked else "",
            error,
            exc_info=exc,
            extra={"channel": channel},
        )
        try:
            await self.store.set_meta(
                channel, **{TRAIN_FAILURES: failures, TRAIN_PARKED: parked, TRAIN_ERROR: error}
            )
        except Exception:  # noqa: BLE001 - the next run counts again
            log.exception("training %s: the failure could not be recorded", channel)

    def _round_is_full(self, replies: int, oldest: float) -> bool:
        """Whether a channel with new feedback on ``replies`` replies, the oldest given
        at ``oldest`` (wall clock), trains in this run."""
        waited = self.clock() - oldest
        return replies >= self.config.train_round or waited >= self.config.train_max_wait

    async def _train_channel_locked(
        self, channel: str, force: bool
    ) -> tuple[list[NodeReport], int, dict[str, int]]:
        events = await self.store.pending(channel, self.consumer)
        if not events:
            return [], 0, {}
        meta = await self.store.meta(channel)
        redirects = meta.get("merged", {})
        by_node: dict[str, dict[str, Reply]] = defaultdict(dict)
        # node -> (reply, user) -> the newest correction text of this round
        corrections: dict[str, dict[tuple[str, str], tuple[Reply, str]]] = defaultdict(dict)
        orphans: list[str] = []
        live: list[FeedbackEvent] = []
        # one read per reply, not per event: a waiting channel is read again every run
        read: dict[str, Reply | None] = {}
        for ev in events:
            if ev.reply_id not in read:
                read[ev.reply_id] = await self.store.get_reply(channel, ev.reply_id)
            reply = read[ev.reply_id]
            if reply is None:
                orphans.append(ev.event_id)
                continue
            live.append(ev)
            node_id = _follow(redirects, reply.node_id)
            if ev.kind == CORRECTION:
                corrections[node_id][(reply.reply_id, ev.user)] = (reply, ev.text or "")
            by_node[node_id][reply.reply_id] = reply
        waiting: dict[str, int] = {}  # node -> replies with feedback, while the round fills
        replies = sum(len(rs) for rs in by_node.values())
        if live and not force and not self._round_is_full(replies, min(e.ts for e in live)):
            waiting = {node_id: len(rs) for node_id, rs in by_node.items()}
            by_node.clear()
            corrections.clear()
            live = []
            # debug: the interval run says this every few minutes in a quiet channel
            log.debug("channel %s: %d of a round of %d", channel, replies, self.config.train_round)
        acked = orphans + [e.event_id for e in live]
        if not acked:
            return [], 0, waiting
        cfg = await self.store.get_config(channel)
        rewards = {  # reply id -> reward, for the replies that have votes
            rid: r
            for rs in by_node.values()
            for rid, reply in rs.items()
            if (r := reply_reward(reply.votes, cfg)) is not None
        }
        bad = [rid for rid, r in rewards.items() if not math.isfinite(r)]
        if bad:  # a stored config validates on read; this keeps a NaN out of every baseline
            log.warning("channel %s: non-finite rewards of replies %s not learnt", channel, bad)
            for rid in bad:
                del rewards[rid]
        prior = prior_baseline(list(rewards.values()), cfg)
        this_round = {rid for rs in by_node.values() for rid in rs}
        replay = await self._replay_sets(channel, redirects, cfg, this_round)
        unlearnt = {
            rid
            for rs in by_node.values()
            for rid, reply in rs.items()
            if rid in rewards and not self._learnable(reply, rewards[rid])
        }
        if unlearnt:
            log.info("channel %s: 👍 on degenerate replies not learnt: %s", channel, unlearnt)
        updates, reports, before = [], [], {}
        for node_id, replies in by_node.items():
            t0 = time.perf_counter()
            node = await self.store.get_node(channel, node_id)
            if node is None:
                reports.append(NodeReport(node_id, "orphaned", "node no longer exists"))
                continue
            before[node_id] = node.z
            update, rep = await self._train_node(
                channel,
                node,
                list(replies.values()),
                list(corrections.get(node_id, {}).values()),
                rewards,
                prior,
                replay.get(node_id, []),
                unlearnt,
            )
            rep.seconds = time.perf_counter() - t0
            rep.related = [r.prompt_text for r in replies.values()]
            updates.append(update)
            reports.append(rep)
        kept = [r for r in reports if r.status != "orphaned"]
        await self._guard(channel, updates, kept, before)
        _refuse_non_finite(channel, updates, kept)
        try:
            await self.store.commit(channel, updates, acked)
        except ConflictError as exc:
            log.warning("training %s: %s; the events stay pending for the next run", channel, exc)
            for r in reports:
                r.status, r.reason = "conflict", str(exc)
        else:  # the nodes' own lists hold these now
            for u in updates:
                fresh = self._fresh_downvotes.get((channel, u.node_id), {})
                for text in u.downvoted:
                    fresh.pop(text, None)
                if not fresh:
                    self._fresh_downvotes.pop((channel, u.node_id), None)
        await self.store.set_meta(channel, last_train=time.time())
        return reports, len(acked), waiting

    async def _guard(
        self,
        channel: str,
        updates: list[NodeUpdate],
        reports: list[NodeReport],
        before: dict[str, np.ndarray],
    ) -> None:
        """Check every updated node's new z at once; halve the steps that degrade, up to
        `GuardConfig.backtrack` times, and roll back the ones that still do.

        One batched probe run per try for all nodes of a training round, not one per node.
        ``before`` holds each node's z before this round.
        """
        todo = [(u, r) for u, r in zip(updates, reports, strict=True) if u.z is not None]
        if not todo or not self.config.guard.enabled:
            return
        t0 = time.perf_counter()
        verdicts = await self.worker.run(self.guard.check_many, [(u.z, r.related) for u, r in todo])
        failed = [(u, r, v.reason) for (u, r), v in zip(todo, verdicts, strict=True) if not v.ok]
        for halvings in range(1, self.config.guard.backtrack + 1):
            if not failed:
                break
            for update, _, _ in failed:
                start = before[update.node_id]
                update.z = (start + (update.z - start) * 0.5).astype(np.float32)
            verdicts = await self.worker.run(
                self.guard.check_many, [(u.z, r.related) for u, r, _ in failed]
            )
            still = []
            for (update, report, reason), verdict in zip(failed, verdicts, strict=True):
                if verdict.ok:
                    report.reason = f"step halved {halvings}x; the whole step failed: {reason}"
                    log.info("channel %s node %s: %s", channel, update.node_id, report.reason)
                else:
                    still.append((update, report, reason))
            failed = still
        for update, report, reason in failed:
            update.z, update.updated, update.rolled_back = None, False, True
            report.status, report.reason = "rolled_back", reason
            log.warning(
                "channel %s node %s: update rolled back: %s", channel, update.node_id, reason
            )
        share = (time.perf_counter() - t0) / len(todo)
        for _, report in todo:
            report.seconds += share

    def _learnable(self, reply: Reply, reward: float) -> bool:
        """False for a 👍 on a degenerate answer: a loop, a refusal, or an echo of the
        system prompt. A community may like those ("Hugging Face" is a fine short answer
        to a brevity community), but learning them is how a node collapses; the guard
        would only see it afterwards, on its few probes."""
        if reward <= 0:
            return True
        template = self.guard.template  # the words of the system prompt replies run under
        return degenerate_reason(reply.text, None, reply.prompt_text, template) is None

    def _correction_sample(self, reply: Reply, ids: list[int]) -> Sample:
        focus = self.config.learning.demo_focus
        return correction_sample(reply.prompt_ids, reply.response_ids, ids, focus)

    async def _replay_sets(
        self, channel: str, redirects: dict[str, str], cfg: ChannelConfig, exclude: set[str]
    ) -> dict[str, list[Sample]]:
        """Per node, its earlier liked answers and corrections, newest first, as
        demonstrations: what `LearningConfig.replay` re-learns alongside new feedback.

        Read from the reply history the store keeps anyway (its retention bounds it), so a
        node's replay set needs no storage of its own. Replies of this round (``exclude``)
        are learnt from their fresh feedback instead.
        """
        limit = self.config.learning.replay
        if limit <= 0:
            return {}
        sets: dict[str, list[Sample]] = defaultdict(list)
        history = sorted(await self.store.list_replies(channel), key=lambda r: -r.created_at)
        for reply in history:
            if reply.reply_id in exclude:
                continue
            node_id = _follow(redirects, reply.node_id)
            if len(sets[node_id]) >= limit:
                continue
            for c in reversed(reply.corrections):
                sets[node_id].append(self._correction_sample(reply, c["ids"]))
            r = reply_reward(reply.votes, cfg)
            if r is not None and r > 0 and not reply.corrections and self._learnable(reply, r):
                sets[node_id].append(Sample(reply.prompt_ids, reply.response_ids, demo=True))
            del sets[node_id][limit:]
        return sets

    async def _train_node(
        self,
        channel: str,
        node: Node,
        replies: list[Reply],
        corrections: list[tuple[Reply, str]],
        channel_rewards: dict[str, float],
        prior: float,
        replay: list[Sample] | None = None,
        unlearnt: set[str] = frozenset(),
    ):
        """One node's update from its rated replies and corrections; ``prior`` is the
        baseline of a node without history (see `prior_baseline`), ``replay`` its earlier
        liked answers and corrections (see `_replay_sets`). Replies in ``unlearnt`` count
        in the node's votes but are not learnt from (see `_learnable`).

        A non-finite number read from the store (a baseline, a counted verdict, a recent
        reward, written by hand or by a build that checked nothing) is logged and
        replaced: the baseline by ``prior``, the others left out. Carried on, one NaN
        makes every later advantage, loss and update of the node NaN."""
        baseline = node.baseline if node.rated else prior
        if not math.isfinite(baseline):
            log.warning(
                "channel %s node %s: baseline %r is not finite; it restarts from the "
                "channel's usual verdict, %.3f",
                channel,
                node.node_id,
                baseline,
                prior,
            )
            baseline = prior
        history = [r for r in node.recent if math.isfinite(r)]
        if len(history) < len(node.recent):
            log.warning(
                "channel %s node %s: non-finite recent rewards dropped", channel, node.node_id
            )
        samples: list[Sample] = []
        rewards: list[float] = []  # first verdicts: the node's statistics and window
        changed = 0.0  # how far later votes moved the verdicts of replies counted before
        counted: dict[str, float] = {}
        downvoted = list(node.downvoted)
        corrected = {reply.reply_id for reply, _ in corrections}
        for reply in replies:
            r = channel_rewards.get(reply.reply_id)
            if r is None:  # every vote retracted: what was learnt stays learnt
                continue
            if reply.counted is not None and not math.isfinite(reply.counted):
                log.warning(
                    "channel %s reply %s: its counted verdict %r is not finite; it is "
                    "learnt afresh",
                    channel,
                    reply.reply_id,
                    reply.counted,
                )
                reply.counted = None
            if reply.counted is None:
                rewards.append(r)
            elif r == reply.counted:  # new votes, same verdict: nothing more to learn
                continue
            else:
                changed += r - reply.counted
            counted[reply.reply_id] = r
            if r < 0 and _norm_text(reply.text) not in downvoted:
                downvoted.append(_norm_text(reply.text))
            if reply.reply_id in unlearnt:
                continue
            if reply.reply_id in corrected and self.config.learning.correction_replaces_vote:
                continue
            samples.append(
                Sample(
                    reply.prompt_ids,
                    reply.response_ids,
                    reward=r,
                    old_logprob=reply.logprob,
                    staleness=max(0, node.version - reply.z_version),
                    counted=reply.counted,
                )
            )
        demos = 0
        for reply, text in corrections:
            ids = next((c["ids"] for c in reversed(reply.corrections) if c["text"] == text), None)
            if ids:
                samples.append(self._correction_sample(reply, ids))
                demos += 1
        recent = (history + rewards)[-self.config.recent_rewards :]
        result = await self.worker.steps(
            reinforce_steps,
            self.svf,
            node.z,
            samples,
            baseline,
            self.config.learning,
            self.tokenizer.pad_token_id or 0,
            replay or [],
            settle_scale(history, rewards, demos > 0, self.config.learning),
        )
        status, reason = result.status, result.reason
        updated = status == "updated"
        if not math.isfinite(result.baseline):
            log.warning(
                "channel %s node %s: the round's baseline %r is not finite; %.3f is kept",
                channel,
                node.node_id,
                result.baseline,
                baseline,
            )
        update = NodeUpdate(
            node_id=node.node_id,
            expected_version=node.version,
            z=result.z if updated else None,
            baseline=result.baseline if math.isfinite(result.baseline) else baseline,
            rated_delta=len(rewards),
            reward_sum_delta=float(sum(rewards)) + changed,
            recent=recent,
            updated=updated,
            rolled_back=status == "rolled_back",
            downvoted=downvoted[-DOWNVOTED_KEPT:],
            counted=counted,
        )
        return update, NodeReport(node.node_id, status, reason, len(counted), demos)

    # -- reads: what the bot's status pages and the evaluation see ----------------------
    def embed(self, text: str) -> np.ndarray:
        """The routing embedding of one prompt. Runs the model on the calling thread:
        for code that owns the model (the evaluation), never from the event loop."""
        return self._embed(text)

    async def channels(self) -> list[str]:
        return await self.store.channels()

    async def get_config(self, channel: str) -> ChannelConfig:
        return await self.store.get_config(channel)

    async def get_reply(self, channel: str, reply_id: str) -> Reply | None:
        return await self.store.get_reply(channel, reply_id)

    async def get_node(self, channel: str, node_id: str) -> Node | None:
        return await self.store.get_node(channel, node_id)

    async def nodes(self, channel: str) -> list[Node]:
        return await self.store.load_nodes(channel)

    async def replies(self, channel: str) -> list[Reply]:
        return await self.store.list_replies(channel)

    async def node_count(self, channel: str) -> int:
        return await self.store.node_count(channel)

    async def capacity(self, channel: str) -> list[str]:
        """The caps the channel is near, one sentence each (`channel_capacity`)."""
        return await channel_capacity(self.store, channel)

    async def ping_store(self) -> str:
        """Raise if the store cannot be reached; else its kind (``RedisStore``…)."""
        ping = getattr(self.store, "ping", None)
        if ping is None:
            await self.store.channels()
        else:
            await ping()
        return type(self.store).__name__

    @property
    def shared_url(self) -> str | None:
        """The URL of the Redis server this engine's store lives on, which every bot
        process of a deployment shares (rate limits, Slack's event record); None for a
        store of this process alone."""
        return getattr(self.store, "url", None)

    # -- admin --------------------------------------------------------------------------
    async def stats(self, channel: str) -> dict:
        return await channel_stats(self.store, channel)

    async def configure(self, channel: str, **changes) -> ChannelConfig:
        """Change some of a channel's settings and return them all. Every value must be
        a finite number in its range (`ChannelConfig`); else `ConfigError`, a
        `GesalError`, names the first bad one and the channel keeps its settings."""
        current = asdict(await self.store.get_config(channel))
        current.update(changes)
        cfg = ChannelConfig.parse(current)
        await self.store.set_config(channel, cfg)
        return cfg

    async def reset(self, channel: str) -> None:
        await self.store.reset(channel)
        await self._forget(channel)

    async def export(self, channel: str) -> dict:
        """A versioned, self-contained JSON-able snapshot of a channel's graph and history
        (`gesal_core.snapshot`).

        Pending (not yet trained) feedback is not part of it; votes on replies are.
        """
        return snapshot.build(
            channel,
            {"name": self.model_name, "z_size": self.svf.z_size},
            await self.store.get_config(channel),
            await self.store.load_nodes(channel),
            await self.store.list_replies(channel),
            (await self.store.meta(channel)).get("merged", {}),
        )

    async def _forget(self, channel: str) -> None:
        """Drop what this process keeps about a channel that was reset or replaced."""
        for key in [k for k in self._fresh_downvotes if k[0] == channel]:
            del self._fresh_downvotes[key]
        await self.worker.run(self.serving.forget, channel)

    @staticmethod
    def dumps(data: dict) -> str:
        """Byte-stable JSON: the same state always serialises to the same bytes."""
        return json.dumps(data, sort_keys=True, ensure_ascii=False, indent=1) + "\n"

    async def import_graph(self, channel: str, data: dict | bytes | str) -> dict:
        """Replace a channel's graph with an export (possibly from another channel).

        ``data``: the export file as bytes or text (its size and nesting are checked
        before it is parsed), or its parsed JSON. Validate, then swap: the whole document
        is checked first and turned into records (`snapshot.parse`, in a thread, so a
        large file does not hold up other channels' answers), then the store replaces the
        channel in one atomic step (`Store.replace`). A refused file raises
        `SnapshotError` (a `GesalError`: one sentence naming the field) and changes nothing.
        """
        config = getattr(self.svf.model, "config", None)
        snap = await asyncio.to_thread(
            snapshot.parse,
            data,
            self.svf.z_size,
            getattr(config, "hidden_size", None),  # prompts embed as mean hidden states
            getattr(config, "vocab_size", None),
            max_replies=getattr(self.store, "max_replies", None),  # the store's retention
        )
        meta = {"merged": snap.merged} if snap.merged else {}
        await self.store.replace(channel, snap.config, snap.nodes, snap.replies, meta)
        # the imported nodes keep their ids and versions: what this process cached under
        # those keys may be another z (an export of a copy trained elsewhere)
        await self._forget(channel)
        return {"nodes": len(snap.nodes), "replies": len(snap.replies)}


__all__ = [
    "Engine",
    "EngineConfig",
    "ReplyOut",
    "TrainReport",
    "UnknownReplyError",
    "channel_stats",
    "reply_reward",
]
