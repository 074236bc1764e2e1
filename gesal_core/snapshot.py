"""A channel's graph as a versioned JSON snapshot: what `/gesal export` writes and
`/gesal import` reads.

Import replaces a channel, so everything is checked *before* the channel is touched: a
damaged or foreign file must fail with a clear message and leave the channel as it was,
never half-written, and never with a node the router cannot use (a wrong-sized embedding
made every later answer in that channel fail). The merge map travels with the nodes:
without it, feedback on replies of a folded node would be orphaned after a round trip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import GesalError
from .records import ChannelConfig, Node, Reply

FORMAT = "gesal-graph"
VERSION = 1


@dataclass
class Snapshot:
    """A validated snapshot, ready to write into a channel."""

    config: ChannelConfig
    nodes: list[Node]
    replies: list[Reply]
    merged: dict[str, str]  # folded node id -> the node that took it over


def build(
    channel: str,
    model: dict,
    config: ChannelConfig,
    nodes: list[Node],
    replies: list[Reply],
    merged: dict[str, str],
) -> dict:
    """The JSON-able snapshot; nodes and replies in a stable order (byte-stable dumps)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "channel": channel,
        "model": model,
        "vector_encoding": "base64 little-endian float32",
        "config": asdict(config),
        "nodes": [n.to_dict() for n in sorted(nodes, key=lambda n: n.node_id)],
        "replies": [r.to_dict() for r in sorted(replies, key=lambda r: (r.created_at, r.reply_id))],
        "merged": dict(sorted(merged.items())),
    }


def parse(
    data: object, z_size: int, embedding_size: int | None = None, vocab_size: int | None = None
) -> Snapshot:
    """Check a snapshot whole and return it; `GesalError` names the first problem."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GesalError("this file is not a gesal-bot graph export")
    if data.get("version") != VERSION:
        raise GesalError(
            f"unsupported export version {data.get('version')!r} "
            f"(this build reads version {VERSION})"
        )
    model = data.get("model")
    found = model.get("z_size") if isinstance(model, dict) else None
    if found != z_size:
        raise GesalError(
            f"the export was made for a model with {found} SVF components; this model has {z_size}"
        )
    try:
        config = ChannelConfig.from_dict(_of(data.get("config", {}), dict, "config"))
        nodes = [Node.from_dict(_of(d, dict, "a node")) for d in _of(data["nodes"], list, "nodes")]
        replies = [
            Reply.from_dict(_of(d, dict, "a reply")) for d in _of(data["replies"], list, "replies")
        ]
        merged = _of(data.get("merged", {}), dict, "merged")
    except (KeyError, TypeError, ValueError) as exc:  # bad base64 is a ValueError too
        raise GesalError(f"the export is damaged: {exc}") from exc
    _check_nodes(nodes, z_size, embedding_size)
    ids = {n.node_id for n in nodes}
    _check_merged(merged, ids)
    _check_replies(replies, ids | set(merged), vocab_size)
    return Snapshot(config, nodes, replies, merged)


def _of(value, kind: type, what: str):
    if not isinstance(value, kind):
        raise GesalError(f"the export is damaged: {what} is not a {kind.__name__}")
    return value


def _vector_ok(v: np.ndarray | None, size: int | None) -> bool:
    return (
        v is not None
        and v.ndim == 1
        and (size is None or v.size == size)
        and bool(np.isfinite(v).all())
    )


def _check_nodes(nodes: list[Node], z_size: int, embedding_size: int | None) -> None:
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise GesalError("the export is damaged: two nodes share an id")
    sizes = {n.embedding.size for n in nodes if n.embedding is not None}
    size = embedding_size or (sizes.pop() if len(sizes) == 1 else None)
    for n in nodes:
        if not isinstance(n.node_id, str) or not n.node_id:
            raise GesalError("the export is damaged: a node has no id")
        if not _vector_ok(n.z, z_size):
            raise GesalError(f"node {n.node_id} has an invalid z vector")
        if not _vector_ok(n.embedding, size) or not np.linalg.norm(n.embedding) > 0:
            raise GesalError(
                f"node {n.node_id} has an invalid embedding "
                f"(this model routes by {size or 'equal'}-sized, finite, non-zero vectors)"
            )
        counts = (n.count, n.version, n.rated, n.updates, n.skipped, n.rollbacks)
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise GesalError(f"the export is damaged: node {n.node_id} has a negative count")
        numbers = (n.baseline, n.reward_sum, *n.recent)
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers):
            raise GesalError(f"the export is damaged: node {n.node_id} has a non-finite reward")
        if any(other not in ids for other, _ in n.neighbors):
            raise GesalError(f"the export is damaged: node {n.node_id} links to a missing node")


def _check_merged(merged: dict, ids: set[str]) -> None:
    for victim in merged:
        seen, at = {victim}, victim
        while at in merged:
            at = merged[at]
            if not isinstance(at, str) or at in seen:
                raise GesalError("the export is damaged: its merge map has a loop")
            seen.add(at)
        if at not in ids:
            raise GesalError(f"the export is damaged: node {victim} was merged into a missing node")


def _check_replies(replies: list[Reply], owners: set[str], vocab_size: int | None) -> None:
    top = vocab_size or math.inf
    ids = [r.reply_id for r in replies]
    if len(set(ids)) != len(ids):
        raise GesalError("the export is damaged: two replies share an id")
    for r in replies:
        if r.node_id not in owners:
            raise GesalError(f"the export is damaged: reply {r.reply_id} has no node")
        if not all(isinstance(x, list) for x in (r.prompt_ids, r.response_ids, r.corrections)):
            raise GesalError(f"the export is damaged: reply {r.reply_id} is not a reply")
        for c in r.corrections:
            if not (isinstance(c, dict) and isinstance(c.get("text"), str)) or not (
                isinstance(c.get("ids"), list) and c["ids"]
            ):
                raise GesalError(f"the export is damaged: reply {r.reply_id} has a bad correction")
        tokens = (*r.prompt_ids, *r.response_ids, *(t for c in r.corrections for t in c["ids"]))
        if not all(isinstance(t, int) and 0 <= t < top for t in tokens):
            raise GesalError(f"the export is damaged: reply {r.reply_id} has invalid token ids")
        if r.counted is not None and not (
            isinstance(r.counted, int | float) and math.isfinite(r.counted)
        ):
            raise GesalError(f"the export is damaged: reply {r.reply_id} has a bad verdict")
        if not isinstance(r.votes, dict) or any(v not in (1, -1) for v in r.votes.values()):
            raise GesalError(f"the export is damaged: reply {r.reply_id} has a vote other than ±1")
