"""Data that crosses the engine/store boundary.

Vectors are numpy float32 arrays here, so the store never needs torch. Everything is a
plain dataclass with ``to_dict``/``from_dict`` so the in-memory store, the Redis store
and the JSON export all share one shape.
"""

from __future__ import annotations

import base64
import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .config_fields import setting
from .errors import GesalError

log = logging.getLogger(__name__)
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


# Largest magnitude a vote's reward may have. Only the ratio of up to down and the sign
# shape what a node learns (updates are bounded by `LearningConfig.max_step`, Adam scales
# the gradient), so larger rewards buy nothing but larger losses and statistics that no
# longer read as votes; ten times the defaults' order leaves room for any weighting.
REWARD_LIMIT = 10.0
MAX_NODES_LIMIT = 10_000


class ConfigError(GesalError, ValueError):
    """A channel setting outside its range or not a finite number: a `GesalError` (its
    message is for the admin who typed it) and a ValueError for code that parses."""


def _number(name: str, value: object, whole: bool = False) -> float | int:
    """One setting's value as a finite number (an int for ``whole``), or `ConfigError`."""
    shown = repr(value[:40]) if isinstance(value, str) else str(value)[:40]
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ConfigError(f"{name} must be a number, not {shown}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {shown}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, not {shown}")
    if whole:
        if not number.is_integer():
            raise ConfigError(f"{name} must be a whole number, not {shown}")
        return int(number)
    return number


@dataclass
class ChannelConfig:
    """Per-channel settings an admin may change (`/gesal config`).

    Ranges: ``threshold`` in [-1, 1] (a cosine similarity); ``reward_up`` in
    (0, REWARD_LIMIT], ``reward_down`` in [-REWARD_LIMIT, 0); ``max_nodes`` from 1 to
    10,000; every value finite. A NaN reward would make every reward, baseline and loss
    of the channel NaN, so nothing outside these ranges is ever stored.
    """

    threshold: float = setting(
        0.15,
        help="Similarity (-1 to 1) a prompt needs to join its channel's nearest node, else "
        "it starts a new one (cosine of centred embeddings; 0.15 gives the best topic "
        "purity in bench.embedding_choice). New channels start with it; admins change it "
        "per channel.",
        env="GESAL_THRESHOLD",
        flag="--threshold",
        ge=-1.0,
        le=1.0,
    )
    reward_up: float = setting(
        1.0,
        help="Reward of a 👍. New channels start with it; admins change it per channel.",
        env="GESAL_REWARD_UP",
        gt=0.0,
        le=REWARD_LIMIT,
    )
    reward_down: float = setting(
        -2.0,
        help="Reward of a 👎, the whole negative weight. New channels start with it; admins "
        "change it per channel.",
        env="GESAL_REWARD_DOWN",
        lt=0.0,
        ge=-REWARD_LIMIT,
    )
    max_nodes: int = setting(
        64,
        help="Nodes a channel keeps at most; a new topic in a full channel folds its least "
        "used node into its nearest.",
    )

    def validate(self) -> ChannelConfig:
        """This config if every value is in its range, else `ConfigError` naming the
        first one that is not."""
        for f in fields(self):
            _number(f.name, getattr(self, f.name), whole=f.name == "max_nodes")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be between -1 and 1, not {self.threshold:g}")
        if not 0 < self.reward_up <= REWARD_LIMIT:
            raise ConfigError(
                f"reward_up must be above 0 and at most {REWARD_LIMIT:g}, not {self.reward_up:g}"
            )
        if not -REWARD_LIMIT <= self.reward_down < 0:
            raise ConfigError(
                f"reward_down must be below 0 and at least {-REWARD_LIMIT:g}, "
                f"not {self.reward_down:g}"
            )
        if not 1 <= self.max_nodes <= MAX_NODES_LIMIT:
            raise ConfigError(
                f"max_nodes must be between 1 and {MAX_NODES_LIMIT}, not {self.max_nodes}"
            )
        return self

    @classmethod
    def parse(cls, d: object) -> ChannelConfig:
        """A config from what a person supplied (`Engine.configure`, an import): every
        value checked, unknown names refused; `ConfigError` names the first problem."""
        if not isinstance(d, dict):
            raise ConfigError("the channel settings must be a mapping of names to numbers")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(map(str, unknown)))}")
        values = {k: _number(k, v, whole=k == "max_nodes") for k, v in d.items()}
        return cls(**values).validate()

    @classmethod
    def from_dict(cls, d: dict) -> ChannelConfig:
        """A config the store kept. A value that does not pass `validate` (a NaN reward
        written by hand or by a build that checked nothing, or a value outside a range
        narrower than the one it was set under) falls back to this class's default for
        that setting, with a warning: one bad setting must not make every mention of the
        channel fail, and the admin's next `configure` writes a valid config back.
        Unknown names still raise."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(map(str, unknown)))}")
        default = cls()
        values = {}
        for name, value in d.items():
            try:
                values[name] = _number(name, value, whole=name == "max_nodes")
                cls(**{**asdict(default), name: values[name]}).validate()
            except ConfigError as exc:
                values[name] = getattr(default, name)
                _warn_once(name, value, f"{exc}; using the default {values[name]!r}")
        try:
            return cls(**values).validate()
        except ConfigError as exc:  # each value fits alone, not together: all defaults
            _warn_once("config", tuple(sorted(values.items())), f"{exc}; using the defaults")
            return cls()


_warned: set[tuple[str, str]] = set()


def _warn_once(name: str, value: object, message: str) -> None:
    """Log a repaired stored setting once per process: every mention reads the config."""
    key = (name, repr(value))
    if key not in _warned:
        _warned.add(key)
        log.warning("a stored channel setting is invalid: %s", message)


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
class NodeHead:
    """What routing reads of a node: its embedding, and the count and age that pick the
    node to fold when a channel is full. No z, which is about a hundred times the size of
    an embedding: a mention reads every node's head and only the z it answers with."""

    node_id: str
    embedding: np.ndarray
    count: int = 0
    updated_at: float = 0.0


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


@dataclass
class ChannelMeta:
    """A channel's bookkeeping beside its graph: the merge map and training health.

    The store keeps these as loose fields (a Redis hash of JSON values), written one or a
    few at a time so that concurrent writers (a fold, a trainer) never overwrite each
    other's fields; code above the store reads them through this record. A reset or an
    import clears them with the rest of the channel.
    """

    # folded node id -> the node that took it over: feedback on a folded node's replies
    # goes to its target (see `owner`)
    merged: dict[str, str] = field(default_factory=dict)
    last_train: float | None = None  # wall clock of the channel's last committed run
    train_failures: int = 0  # failed training runs in a row
    train_parked: bool = False  # true: scheduled runs skip the channel until an admin acts
    train_error: str | None = None  # the last failure, one sentence
    trained_events: int = 0  # feedback events ever committed (the store counts them)

    @classmethod
    def from_dict(cls, d: dict) -> ChannelMeta:
        """The record from the store's fields; absent ones take their defaults and fields
        this record does not know are ignored, so an older or newer writer's extra field
        never stops a channel from training."""
        last = d.get("last_train")
        error = d.get("train_error")
        return cls(
            merged=dict(d.get("merged") or {}),
            last_train=float(last) if last is not None else None,
            train_failures=int(d.get("train_failures") or 0),
            train_parked=bool(d.get("train_parked")),
            train_error=str(error) if error is not None else None,
            trained_events=int(d.get("trained_events") or 0),
        )

    def owner(self, node_id: str) -> str:
        """Where a node's feedback goes now: a folded node redirects to its target, which
        may have been folded in turn."""
        while node_id in self.merged:
            node_id = self.merged[node_id]
        return node_id
