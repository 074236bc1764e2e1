"""Data that crosses the engine/store boundary.

Vectors are numpy float32 arrays here, so the store never needs torch. Everything is a
plain dataclass with ``to_dict``/``from_dict`` so the in-memory store, the Redis store
and the JSON export all share one shape.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

UP, DOWN = 1, -1
CORRECTION = "correction"
VOTE = "vote"


def vec_to_b64(v: np.ndarray | None) -> str | None:
    """Little-endian float32 bytes, base64: exact and compact in JSON."""
    if v is None:
        return None
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def vec_from_b64(s: str | None) -> np.ndarray | None:
    if s is None:
        return None
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float32)


@dataclass
class ChannelConfig:
    """Per-channel settings an admin may change (`/gesal config`)."""

    # Cosine similarity (of centred embeddings, gesal_core/embedding.py) below which a prompt
    # starts a new node. 0.15 gives the best topic purity in `bench.embedding_choice`.
    threshold: float = 0.15
    reward_up: float = 1.0
    reward_down: float = -2.0  # the whole negative weight; never doubled again
    max_nodes: int = 64

    def validate(self) -> ChannelConfig:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be between -1 and 1")
        if self.reward_up <= 0 or self.reward_down >= 0:
            raise ValueError("reward_up must be > 0 and reward_down < 0")
        if not 1 <= self.max_nodes <= 10_000:
            raise ValueError("max_nodes must be between 1 and 10000")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> ChannelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items()}).validate()


@dataclass
class Node:
    """One cluster of a channel's prompts, with its own adapter z."""

    node_id: str
    embedding: np.ndarray  # running mean of its prompts' (unit) embeddings
    z: np.ndarray
    count: int = 0
    version: int = 0  # bumped by every committed z update (compare-and-set key)
    baseline: float = 0.0  # EMA of rewards seen: the REINFORCE baseline
    rated: int = 0  # replies whose rewards were trained on
    reward_sum: float = 0.0
    recent: list[float] = field(default_factory=list)  # last rewards, newest last
    updates: int = 0
    skipped: int = 0
    rollbacks: int = 0
    downvoted: list[str] = field(default_factory=list)  # normalised texts voted down here
    neighbors: list[tuple[str, float]] = field(default_factory=list)  # kNN edges
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rated if self.rated else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedding"] = vec_to_b64(self.embedding)
        d["z"] = vec_to_b64(self.z)
        d["neighbors"] = [[n, round(float(s), 6)] for n, s in self.neighbors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        d = dict(d)
        d["embedding"] = vec_from_b64(d["embedding"])
        d["z"] = vec_from_b64(d["z"])
        d["neighbors"] = [(n, float(s)) for n, s in d.get("neighbors", [])]
        return cls(**d)


@dataclass
class Reply:
    """A response the bot gave, with everything needed to learn from votes on it."""

    reply_id: str
    node_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    prompt_text: str
    text: str
    z_version: int
    logprob: float | None = None  # sum log π_z(y|x) at generation: for off-policy weights
    votes: dict[str, int] = field(default_factory=dict)  # user -> +1 / -1
    corrections: list[dict] = field(default_factory=list)  # {"user", "text", "ids"}
    platform_message_id: str | None = None
    created_at: float = field(default_factory=time.time)
    # the verdict (reward) a training run already counted and learnt for this reply; votes
    # that arrive later are learnt as the change from it, so a reply whose votes trickle in
    # over several runs is not learnt once per run. None: never trained on.
    counted: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Reply:
        return cls(**d)


@dataclass
class FeedbackEvent:
    """One entry of a channel's durable feedback buffer (a Redis Stream in production)."""

    event_id: str
    reply_id: str
    user: str
    kind: str = VOTE  # VOTE or CORRECTION
    value: int | None = None  # the vote after this event; None = retracted
    text: str | None = None  # the correction's text
    ts: float = field(default_factory=time.time)


@dataclass
class NodeUpdate:
    """What the trainer commits for one node, atomically with acking its events."""

    node_id: str
    expected_version: int
    z: np.ndarray | None  # None: z unchanged (skipped or rolled back)
    baseline: float
    rated_delta: int
    reward_sum_delta: float
    recent: list[float]
    updated: bool
    rolled_back: bool
    downvoted: list[str]
    # reply id -> the reward now counted for it (`Reply.counted`), written with the update
    counted: dict[str, float] = field(default_factory=dict)
