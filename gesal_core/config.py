"""Engine-wide settings (`EngineConfig`): sampling, learning, the guard and training
rounds, fixed when the engine is built. Per-channel settings an admin may change live in
`ChannelConfig` (gesal_core/records.py), in the store.

Its own module so that the rooms of the engine (routing, answering, training) and the
bot's settings read one definition without importing the engine itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import GesalError
from .generate import SamplingConfig
from .guard import GuardConfig
from .learning import LearningConfig
from .records import ChannelConfig


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
