"""The Redis key layout, in one place.

Every key of a channel starts with ``gesal:{<channel>}:``. The braces are a Redis Cluster
*hash tag*: only the part inside them picks the slot, so all of a channel's keys live in
one slot and the multi-key Lua scripts (vote + event, commit + ack) are legal on a
cluster. The only global key is the channel registry, touched by single-key commands.

================================  ======  ================================================
key                               type    content
================================  ======  ================================================
``gesal:channels``                set     channel keys that hold data (for ``train()``)
``gesal:{ch}:nodes``              zset    node ids, scored by creation order
``gesal:{ch}:seq``                string  counter behind that order
``gesal:{ch}:node:<id>``          hash    ``emb``/``z``: little-endian float32 bytes;
                                          ``count``, ``version``, ``rated``, ``updates``,
                                          ``skipped``, ``rollbacks``: integers;
                                          ``baseline``, ``reward_sum``, ``created_at``,
                                          ``updated_at``: floats (exact ``repr``);
                                          ``recent``/``downvoted``/``neighbors``: JSON
``gesal:{ch}:replies``            zset    reply ids scored by creation time (retention)
``gesal:{ch}:reply:<id>``         hash    ``data``: the reply's JSON (prompt, response,
                                          token ids, node, z version, log-prob);
                                          ``msg``: platform message id; ``v:<user>``: vote
``gesal:{ch}:reply:<id>:corr``    list    corrections, JSON ``{"user","text","ids"}``
``gesal:{ch}:messages``           hash    platform message id -> reply id
``gesal:{ch}:feedback``           stream  feedback events; consumer group ``trainers``
``gesal:{ch}:config``             string  the channel's settings (JSON)
``gesal:{ch}:meta``               hash    field -> JSON value (last_train, merged, ...)
``gesal:{ch}:trainlock``          string  the trainer lock's token (with a TTL)
``gesal:import:{ch}:<token>:…``   any     an import being staged: the same keys as above
                                          under this prefix, each with a TTL, until one
                                          script moves them into place (`lua.REPLACE`)
================================  ======  ================================================

Why little-endian float32 bytes for vectors: it is exactly numpy's ``<f4`` memory, so a
read is one ``np.frombuffer`` with no parsing and no rounding (the z vectors round-trip
bit for bit, which the byte-stable export relies on), it is half the size of float64 and
a quarter of JSON text (SmolLM2's z is 51 840 floats = 207 KB), and Lua's ``struct``
library reads and writes the same format for the atomic running-mean update. float16
would halve it again but round the adapters, and z moves in small steps.
"""

from __future__ import annotations

import re

from ..errors import GesalError

PREFIX = "gesal"
CHANNELS = f"{PREFIX}:channels"
GROUP = "trainers"
MAX_CHANNEL_CHARS = 256
STAGE = re.compile(r"[A-Za-z0-9]{1,64}")


class BadChannelError(GesalError):
    """A channel key that cannot be mapped onto the key layout."""


def check_channel(channel: str) -> str:
    """Reject channel keys that would break the hash tag (braces) or be unreadable."""
    if not isinstance(channel, str) or not channel:
        raise BadChannelError("a channel key must be a non-empty string")
    if len(channel) > MAX_CHANNEL_CHARS:
        raise BadChannelError(f"a channel key must be at most {MAX_CHANNEL_CHARS} characters")
    if any(c in "{}" or c.isspace() or not c.isprintable() for c in channel):
        raise BadChannelError(
            f"channel key {channel!r} must not contain braces, spaces or control characters"
        )
    return channel


class Keys:
    """The keys of one channel (all sharing the hash tag ``{channel}``).

    ``stage``: the keys of an import being staged for the channel instead, under
    ``gesal:import:{channel}:<stage>``. The same hash tag puts them in the channel's slot,
    so one script can move them into place; the other prefix keeps them out of the
    channel's own key pattern until then.
    """

    def __init__(self, channel: str, stage: str | None = None) -> None:
        self.channel = check_channel(channel)
        if stage is None:
            self.base = f"{PREFIX}:{{{channel}}}"
        elif STAGE.fullmatch(stage):
            self.base = f"{PREFIX}:import:{{{channel}}}:{stage}"
        else:
            raise ValueError(f"a staging token is 1 to 64 letters or digits, not {stage!r}")
        self.nodes = f"{self.base}:nodes"
        self.seq = f"{self.base}:seq"
        self.replies = f"{self.base}:replies"
        self.messages = f"{self.base}:messages"
        self.feedback = f"{self.base}:feedback"
        self.config = f"{self.base}:config"
        self.meta = f"{self.base}:meta"
        self.trainlock = f"{self.base}:trainlock"

    def node(self, node_id: str) -> str:
        return f"{self.base}:node:{node_id}"

    def reply(self, reply_id: str) -> str:
        return f"{self.base}:reply:{reply_id}"

    def corrections(self, reply_id: str) -> str:
        return f"{self.base}:reply:{reply_id}:corr"

    def pattern(self) -> str:
        """SCAN pattern for every key of this channel (glob characters escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.base)
        return escaped + ":*"
