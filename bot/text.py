"""Small text helpers shared by every adapter: message splitting, votes from emoji,
correction markers.

They live apart from `service` because they are pure functions with many edge cases,
and each one is tested on its own.
"""

from __future__ import annotations

import re

# Per-message character limits. Discord rejects content over 2000 characters; Slack
# accepts long `text` but truncates section blocks at 3000, so 3000 keeps one chunk
# one readable message on every Slack client.
DISCORD_LIMIT = 2000
SLACK_LIMIT = 3000
PLAYGROUND_LIMIT = 8000
LIMITS = {"discord": DISCORD_LIMIT, "slack": SLACK_LIMIT, "playground": PLAYGROUND_LIMIT}

_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")
_CLOSE = "\n```"


def _open_fence(text: str) -> str | None:
    """The opening line (e.g. "```python") of a code fence still open at the end of text."""
    opened: str | None = None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if not m:
            continue
        opened = "```" + m.group(2).strip() if opened is None else None
    return opened


def _cut(text: str, budget: int) -> tuple[int, int]:
    """Where to end a chunk of at most ``budget`` chars: (end, start of the rest).

    Prefers a paragraph break, then a line break, then a space, in the second half of
    the window, so chunks are not tiny; otherwise cuts hard.
    """
    window = text[: budget + 1]
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep, budget // 2, budget + 1)
        if i > 0:
            return i, i + len(sep)
    return budget, budget


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters.

    A code fence open at a cut is closed at the end of that chunk and reopened (with
    its language tag) at the start of the next, so every chunk renders on its own.
    """
    if limit < 100:
        raise ValueError("limit must be at least 100 characters")
    text = text.strip("\n")
    chunks: list[str] = []
    reopen = ""
    while text:
        budget = limit - len(reopen)
        if len(text) <= budget:
            chunks.append(reopen + text)
            break
        end, nxt = _cut(text, budget)
        fence = _open_fence(reopen + text[:end])
        if fence is not None and len(fence) < limit // 4:  # leave room to close it
            end, nxt = _cut(text, budget - len(_CLOSE))
            fence = _open_fence(reopen + text[:end])
        piece = reopen + text[:end]
        if fence is not None and len(fence) < limit // 4:
            piece = piece.rstrip("\n") + _CLOSE
            reopen = fence + "\n"
        else:
            reopen = ""
        chunks.append(piece)
        text = text[nxt:]
        if not reopen:
            text = text.lstrip("\n")
    return [c for c in chunks if c.strip()]


# -- votes ---------------------------------------------------------------------------
_SKIN_TONES = "\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"
_UNICODE_VOTES = {"\U0001f44d": 1, "\U0001f44e": -1}  # 👍 👎
_SLACK_VOTES = {"+1": 1, "thumbsup": 1, "-1": -1, "thumbsdown": -1}


def vote_for_emoji(emoji: str) -> int | None:
    """+1 for a thumbs-up, -1 for a thumbs-down, None for any other reaction.

    Accepts Discord's unicode (with any skin tone modifier or variation selector) and
    Slack's names (``+1``, ``thumbsup``, ``-1``, ``thumbsdown``, optionally wrapped in
    colons and followed by ``::skin-tone-2`` … ``::skin-tone-6``).
    The -1 is mapped to the channel's reward_down (default -2) by the engine, once.
    """
    if not emoji:
        return None
    e = emoji.strip()
    bare = e.replace("\ufe0f", "")
    for ch in _SKIN_TONES:
        bare = bare.replace(ch, "")
    if bare in _UNICODE_VOTES:
        return _UNICODE_VOTES[bare]
    name = e.strip(":").lower()
    name = re.sub(r"::skin-tone-[2-6]$", "", name)
    return _SLACK_VOTES.get(name)


# -- corrections ---------------------------------------------------------------------
CORRECTION_MARKERS = ("better:", "\u270f\ufe0f", "\u270f", ":pencil2:")
_MARKER = re.compile(
    r"^\s*(?:<@[!&]?[\w]+>\s*)*(?:better\s*:|\u270f\ufe0f?|:pencil2:)\s*", re.IGNORECASE
)


def parse_correction(text: str) -> str | None:
    """The better answer in a message that starts with a correction marker, else None.

    Markers: ``better:`` (any case), ✏️, or Slack's ``:pencil2:``; a leading mention of
    the bot is allowed. ``better:`` with nothing after it is not a correction.
    """
    m = _MARKER.match(text or "")
    if not m:
        return None
    rest = text[m.end() :].strip()
    return rest or None


__all__ = [
    "CORRECTION_MARKERS",
    "LIMITS",
    "parse_correction",
    "split_message",
    "vote_for_emoji",
]
