"""Answering a mention: route the question to a node, generate with the node's z, and
store the reply that votes will later find.

Generation goes through the batched server (`BatchedGenerator` on the model worker), so
concurrent answers of any channels share one forward pass. A node the community keeps
rejecting answers with a wider temperature (`explore`), and never repeats an answer
voted down, whether training has written it to the node yet or not (`FreshDownvotes`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .channel_graph import ChannelGraph
from .config import EngineConfig
from .errors import GesalError
from .generate import Generation, SamplingConfig, build_prompt
from .records import Node, Reply
from .serving import BatchedGenerator, GenRequest
from .store import Store
from .verdicts import FreshDownvotes
from .worker import ModelWorker

MAX_MESSAGE_CHARS = 8000


@dataclass
class ReplyOut:
    """An answer as the chat adapters post it, with what routing and sampling chose."""

    reply_id: str
    text: str
    node_id: str
    z_version: int
    new_node: bool
    similarity: float
    temperature: float
    truncated: bool
    seconds: float


def conversation(messages: object) -> list[dict]:
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


def _reply(node: Node, question: str, out: Generation, logprob: float | None) -> Reply:
    """The record of an answer: what training needs to learn from votes on it."""
    return Reply(
        reply_id=uuid.uuid4().hex,
        node_id=node.node_id,
        prompt_ids=out.prompt_ids,
        response_ids=out.response_ids,
        prompt_text=question,
        text=out.text,
        z_version=node.version,
        logprob=logprob,
    )


class Responder:
    """Answers one conversation in one channel (`respond`)."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer,
        store: Store,
        worker: ModelWorker,
        serving: BatchedGenerator,
        graph: ChannelGraph,
        downvotes: FreshDownvotes,
        embed: Callable[[str], np.ndarray],
    ) -> None:
        self.config, self.tokenizer, self.store = config, tokenizer, store
        self.worker, self.serving, self.graph = worker, serving, graph
        self.downvotes, self.embed = downvotes, embed

    async def respond(self, channel: str, messages: list[dict], record: bool = True) -> ReplyOut:
        """Answer the last message of ``messages`` (see `Engine.respond`)."""
        messages = conversation(messages)
        start = time.perf_counter()
        question = messages[-1]["content"]
        emb = await self.worker.run(self.embed, question)
        node, new, sim = await self.graph.route(channel, emb, create=record)
        if record:
            await self.graph.observe(channel, node.node_id, emb)
        cfg = self.config
        sampling = self.explore(node)
        prompt = build_prompt(self.tokenizer, messages, cfg.system, cfg.max_prompt_tokens)
        key = (channel, node.node_id, node.version) if record or not new else None
        avoid = set(node.downvoted) | set(self.downvotes.avoid(channel, node.node_id))
        request = GenRequest(prompt, node.z, key, sampling, avoid)
        # concurrent answers (other channels, other nodes) share one batched forward
        out, logprob = await self.worker.batch(self.serving, request, group=sampling)
        reply = _reply(node, question, out, logprob)
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

    def explore(self, node: Node) -> SamplingConfig:
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
