"""Engine: respond / vote / correct / train / export / import / reset / stats.

This is the one API the chat adapters (Discord, Slack, the playground) and the
evaluation use. It is platform-free: a channel is just a string key such as
``discord:123:456``. The work is done by rooms with one job each, which this facade
builds and wires together:

- `ChannelGraph` (channel_graph.py): routing, new nodes and their edges, folding;
- `Responder` (responder.py): answering through the batched server;
- `FreshDownvotes` (verdicts.py): answers voted down since their node last trained;
- `Trainer` (training/): rounds, node updates, the guard, the commit, failures;
- `ChannelAdmin` (channel_admin.py): settings, reset, export and import;
- stats.py: what admin stats and health checks read, from the store alone.

Model work runs on the `ModelWorker` thread; everything else is asyncio.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

import numpy as np

from .channel_admin import ChannelAdmin
from .channel_graph import ChannelGraph
from .config import EngineConfig
from .embedding import PromptEmbedder
from .errors import GesalError
from .guard import Guard
from .records import ChannelConfig, Node, Reply
from .responder import MAX_MESSAGE_CHARS, ReplyOut, Responder
from .serving import BatchedGenerator, ServingConfig
from .stats import capacity_warnings, channel_capacity, channel_stats
from .store import MemoryStore, Store, UnknownReplyError
from .svf import SVFModel
from .training import NodeReport, TrainReport
from .training.trainer import Trainer
from .verdicts import FreshDownvotes, norm_text, reply_reward
from .worker import ModelWorker

log = logging.getLogger(__name__)


class Engine:
    """The facade over one model, one store and the rooms that work on them."""

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
        self.config = cfg = config or EngineConfig()
        self.worker = worker or ModelWorker()
        serving = ServingConfig(max_resamples=cfg.max_resamples)
        self.serving = BatchedGenerator(svf, tokenizer, self.worker, serving, normalize=norm_text)
        self.model_name = model_name
        self.guard = Guard(svf, tokenizer, cfg.guard, cfg.system, cfg.sampling)
        self.embedder = PromptEmbedder(svf, tokenizer)
        self.last_train: float | None = None
        # wall-clock seconds, the feedback events' own clock (their `ts`): how long a
        # channel's feedback has waited for its round (tests move it)
        self.clock: Callable[[], float] = time.time
        self.downvotes = FreshDownvotes()
        self.graph = ChannelGraph(self.store, svf.z_size)
        self.responder = Responder(
            self.config,
            tokenizer,
            self.store,
            self.worker,
            self.serving,
            self.graph,
            self.downvotes,
            self._embed,
        )
        self.trainer = Trainer(
            svf,
            tokenizer.pad_token_id or 0,
            self.store,
            self.worker,
            self.guard,
            self.config,
            self.downvotes,
            clock=lambda: self.clock(),  # read at each use: tests move `self.clock`
            consumer=f"trainer-{uuid.uuid4().hex[:8]}",
        )
        self.admin = ChannelAdmin(self.store, svf, lambda: self.model_name, self._forget)

    @property
    def consumer(self) -> str:
        """This process's name in the store's feedback consumer group."""
        return self.trainer.consumer

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

    def _embed(self, text: str) -> np.ndarray:
        """The routing embedding of one prompt (see gesal_core/embedding.py), on the
        calling thread."""
        return self.embedder([text])[0]

    # -- respond and feedback -------------------------------------------------------
    async def respond(self, channel: str, messages: list[dict], record: bool = True) -> ReplyOut:
        """Answer the last message of ``messages`` (oldest first) in ``channel``.

        ``record=False`` answers exactly as the channel would but changes nothing (no
        node created or counted, no reply stored): evaluation uses it on held-out prompts.
        """
        return await self.responder.respond(channel, messages, record)

    async def link_message(self, channel: str, reply_id: str, message_id: str) -> None:
        """Remember which platform message carries a reply, so reactions can find it."""
        await self.store.link_message(channel, reply_id, str(message_id))

    async def discard_reply(self, channel: str, reply_id: str) -> None:
        """Forget a reply that could not be posted: nobody can vote on or correct it,
        so keeping it would only hold a place in the channel's reply history."""
        await self.store.drop_reply(channel, reply_id)

    async def reply_for_message(self, channel: str, message_id: str) -> str | None:
        return await self.store.reply_for_message(channel, str(message_id))

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
        owner = await self.graph.owner(channel, reply.node_id)
        reward = reply_reward(reply.votes, await self.store.get_config(channel))
        self.downvotes.note(channel, owner, reply.text, reward)

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

    # -- training -------------------------------------------------------------------
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
        report = await self.trainer.train(channel, force=force)
        self.last_train = time.time()
        return report

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
        """Change some of a channel's settings and return them all; `ConfigError` names
        the first bad value (`ChannelAdmin.configure`)."""
        return await self.admin.configure(channel, **changes)

    async def reset(self, channel: str) -> None:
        await self.admin.reset(channel)

    async def export(self, channel: str) -> dict:
        """A versioned JSON-able snapshot of a channel (`ChannelAdmin.export`)."""
        return await self.admin.export(channel)

    async def import_graph(self, channel: str, data: dict | bytes | str) -> dict:
        """Replace a channel's graph with an export, validated whole before the atomic
        swap (`ChannelAdmin.import_graph`); `SnapshotError` changes nothing."""
        return await self.admin.import_graph(channel, data)

    async def _forget(self, channel: str) -> None:
        """Drop what this process keeps about a channel that was reset or replaced."""
        self.downvotes.forget(channel)
        await self.worker.run(self.serving.forget, channel)

    @staticmethod
    def dumps(data: dict) -> str:
        """Byte-stable JSON: the same state always serialises to the same bytes."""
        return json.dumps(data, sort_keys=True, ensure_ascii=False, indent=1) + "\n"


__all__ = [
    "Engine",
    "EngineConfig",
    "NodeReport",
    "ReplyOut",
    "TrainReport",
    "UnknownReplyError",
    "capacity_warnings",
    "channel_capacity",
    "channel_stats",
    "reply_reward",
]
