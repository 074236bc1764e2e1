"""What a community's votes say about an answer, and which answers a node avoids.

A reply's verdict (`reply_reward`) is the mean of its voters' rewards: training learns
from it, statistics count it, and a negative one keeps the answer out of its node's
next answers. Answers are compared in a normal form (`norm_text`), so a repeat that
differs only in case or spacing is still a repeat. A node's own list of downvoted
answers (`Node.downvoted`) is written by training only; `FreshDownvotes` holds the ones
voted down since, so a member who just voted an answer down does not get it again
minutes later.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from .records import ChannelConfig, NodeUpdate

DOWNVOTED_KEPT = 64  # texts a node avoids repeating, newest kept


def reply_reward(votes: dict[str, int], cfg: ChannelConfig) -> float | None:
    """The community's verdict on one reply: the mean of its voters' rewards.

    Each user has exactly one vote (last write wins), so no single member can outweigh
    the others, and the result stays within [reward_down, reward_up]. None: no votes.
    """
    if not votes:
        return None
    values = [cfg.reward_up if v > 0 else cfg.reward_down for v in votes.values()]
    return float(np.mean(values))


def norm_text(text: str) -> str:
    """An answer's normal form for spotting repeats: lower case, single spaces."""
    return " ".join(text.lower().split())


class FreshDownvotes:
    """Per (channel, node), the normalised answers voted down since the node's last
    training run, newest last, at most `DOWNVOTED_KEPT`. Kept in this process only: the
    node's stored list takes them over at its next commit (`settled`)."""

    def __init__(self) -> None:
        self._texts: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)

    def __len__(self) -> int:
        return len(self._texts)

    def avoid(self, channel: str, node_id: str) -> Iterable[str]:
        """The answers the node should not give again until it trains."""
        return self._texts.get((channel, node_id), ())

    def note(self, channel: str, node_id: str, text: str, reward: float | None) -> None:
        """A reply's verdict changed: avoid its answer while the verdict is negative, lift
        it when a vote is retracted or turned."""
        fresh = self._texts[(channel, node_id)]
        text = norm_text(text)
        fresh.pop(text, None)
        if reward is not None and reward < 0:
            fresh[text] = None  # newest last
            while len(fresh) > DOWNVOTED_KEPT:
                fresh.pop(next(iter(fresh)))

    def settled(self, channel: str, updates: Iterable[NodeUpdate]) -> None:
        """A commit wrote these nodes' own lists: what they hold needs no copy here."""
        for u in updates:
            fresh = self._texts.get((channel, u.node_id), {})
            for text in u.downvoted:
                fresh.pop(text, None)
            if not fresh:
                self._texts.pop((channel, u.node_id), None)

    def forget(self, channel: str) -> None:
        """Drop a channel that was reset or replaced."""
        for key in [k for k in self._texts if k[0] == channel]:
            del self._texts[key]
