"""A channel's graph as a versioned JSON snapshot: what `/gesal export` writes and
`/gesal import` reads.

Import replaces a channel, so it is two steps. First the whole document is read and
checked (`loads`, `parse`) into the records the store writes (`Snapshot`); only then does
the store swap the channel in one atomic step (`Store.replace`). A damaged, foreign or
hostile file fails with one sentence that says what is wrong and where
(``nodes[3].z: component 17 is 1e+30, outside [-10, 10]``), as a `SnapshotError` (a
`GesalError`, so the admin who imported it sees it), and the channel stays exactly as it
was. The merge map travels with the nodes: without it, feedback on replies of a folded
node would be orphaned after a round trip.

Every field is bounded; what the engine itself writes is always inside:

* the file: at most `MAX_BYTES`, nested at most `MAX_DEPTH` deep (an export nests 6),
  both checked on the text before `json.loads` and without recursion; NaN and Infinity
  are refused (they are not JSON numbers), and so is any field the records do not have.
* ids of nodes and replies (also in edges, replies and the merge map): `ID`, 1 to 64 of
  ``A-Z a-z 0-9 _ -``. The Redis store derives key names from them (``…:node:<id>``,
  ``…:reply:<id>``, ``…:reply:<id>:corr``), so an id with ``:`` could name another
  record's key; the engine's own ids are hex.
* z: this model's length, finite, every component within `Z_RANGE`. One update moves z by
  at most ``LearningConfig.max_step`` × ``rejected_step`` (3 × 2) in L2 and nothing bounds
  the total by default (``max_drift`` 0), so the bound is a practical one: each of an
  update's 4 Adam steps moves a component by about ``lr`` (3e-3, doubled for a rejected
  node), at most about 0.02 per update (38 updates of a mostly rejected node of the tiny
  test model move its largest component by 0.5: tests/test_import.py), and trained nodes
  of the bundled model reach ‖z−1‖₂ of 4–9 over 51,840 components (docs/results),
  hundredths per component.
  Reaching ±10 takes hundreds of maximal updates of one component in one direction;
  beyond it lie the harmful values (1e30 made every answer fail on inf/NaN logits, 50 gave
  gibberish). New nodes start from weighted means of other nodes' z and folding averages
  two, so neither leaves the range.
* the routing embedding: the model's hidden size, finite, of length in (0, 1 + 1e-3]:
  it is a running mean of unit vectors.
* rewards (``baseline``, ``recent``, a reply's ``counted``): finite, within
  ±`REWARD_LIMIT`, the reward bounds of every channel setting; ``reward_sum`` within
  ±`REWARD_LIMIT` × ``rated``; a reply's ``logprob`` finite and at most 0.
* counters: whole numbers from 0 to 2**53 − 1; times: seconds since 1970 up to the year
  9999; texts (prompt, answer, correction, downvoted answer): at most `MAX_TEXT_CHARS`, four
  times the longest message the engine takes (8,000); user names and message ids: at
  most `MAX_NAME_CHARS`; token ids: within the vocabulary, at most `MAX_TOKENS` a list.
* counts: nodes at most the imported settings' ``max_nodes``; replies at most what the
  store keeps per channel (``max_replies``; `MAX_REPLIES` where it keeps everything);
  votes, corrections and the other per-record lists at most `MAX_ITEMS`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import NoReturn

import numpy as np

from .errors import GesalError
from .records import REWARD_LIMIT, ChannelConfig, ConfigError, Node, Reply

FORMAT = "gesal-graph"
VERSION = 1
VECTOR_ENCODING = "base64 little-endian float32"

MAX_BYTES = 128 * 1024 * 1024  # a 64-node export of the bundled model is about 18 MB
MAX_DEPTH = 8
ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
Z_RANGE = (-10.0, 10.0)
EMBEDDING_NORM_LIMIT = 1.0 + 1e-3
MAX_TEXT_CHARS = 32_000
MAX_NAME_CHARS = 256
MAX_TOKENS = 16_384
MAX_REPLIES = 100_000
MAX_ITEMS = 100_000
MAX_COUNT = 2**53 - 1
MAX_TIME = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC
TOP_FIELDS = ("format", "version", "channel", "model", "vector_encoding", "config")
TOP_FIELDS += ("nodes", "replies", "merged")
CORRECTION_FIELDS = {"user", "text", "ids"}


class SnapshotError(GesalError):
    """A refused import file. ``str()`` is one sentence, ``<where>: <what>``; ``where``
    is the field's path in the document (``replies[2].votes``), empty for the whole file."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}" if where else what)
        self.where = where


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
        "vector_encoding": VECTOR_ENCODING,
        "config": asdict(config),
        "nodes": [n.to_dict() for n in sorted(nodes, key=lambda n: n.node_id)],
        "replies": [r.to_dict() for r in sorted(replies, key=lambda r: (r.created_at, r.reply_id))],
        "merged": dict(sorted(merged.items())),
    }


# -- reading the file ---------------------------------------------------------------------

# A JSON string, escapes included. It matches from every quote it starts at, to the
# closing quote or, unterminated (json.loads stops there), to the end of the text, lone
# final backslash included; possessive, so the text is read once, in linear time.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_CHUNK = 1 << 22


def loads(raw: bytes | str, max_bytes: int | None = None) -> object:
    """The JSON document of an export file, after the checks `json.loads` cannot make
    safely: its size, first, and its nesting, which a recursive parser would otherwise
    meet as a RecursionError. `SnapshotError` says what is wrong."""
    max_bytes = max_bytes or MAX_BYTES
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, bytes | bytearray):
        raise SnapshotError("", "an export file is JSON text")
    if len(raw) > max_bytes:
        raise SnapshotError(
            "", f"the file is {_size(len(raw))}, over the {_size(max_bytes)} an export may have"
        )
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SnapshotError("", f"the file is not text (not UTF-8 at byte {exc.start})") from None
    depth = _nesting(text)
    if depth > MAX_DEPTH:
        raise SnapshotError(
            "",
            f"the file nests lists and objects {depth} deep, more than the {MAX_DEPTH} an "
            "export may (an export nests 6)",
        )
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise SnapshotError(
            "", f"the file is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError:  # an integer with more digits than Python converts
        raise SnapshotError("", "the file holds a number with too many digits") from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def _no_constant(name: str) -> NoReturn:
    raise SnapshotError("", f"the file holds {name}, which is not a JSON number")


def _nesting(text: str) -> int:
    """How deep the text's brackets nest outside strings, read linearly (no recursion).

    Exact for any valid JSON text, and for the part of an invalid one that `json.loads`
    reads before it stops, which is all that matters: the parser never goes deeper."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    deepest, level = 0, 0
    for start in range(0, len(brackets), _CHUNK):
        b = np.frombuffer(brackets, np.uint8, min(_CHUNK, len(brackets) - start), start)
        steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int64)
        levels = level + np.cumsum(steps)
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


# -- checking the document ----------------------------------------------------------------


def parse(
    data: object,
    z_size: int,
    embedding_size: int | None = None,
    vocab_size: int | None = None,
    *,
    max_replies: int | None = None,
    max_bytes: int | None = None,
) -> Snapshot:
    """Check a snapshot whole and return it as records; `SnapshotError` names the first
    problem. ``data`` is the file (bytes or text, read by `loads`) or its parsed JSON."""
    if isinstance(data, bytes | bytearray | str):
        data = loads(data, max_bytes)
    else:
        _check_depth(data)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SnapshotError("", "this file is not a gesal-bot graph export")
    if type(data.get("version")) is not int or data["version"] != VERSION:
        raise SnapshotError(
            "version",
            f"unsupported export version {_show(data.get('version'))} "
            f"(this build reads version {VERSION})",
        )
    _known(data, "", TOP_FIELDS, required=("nodes", "replies"))
    if "channel" in data:
        _text(data["channel"], "channel", MAX_NAME_CHARS)
    if data.get("vector_encoding", VECTOR_ENCODING) != VECTOR_ENCODING:
        raise SnapshotError("vector_encoding", f"must be {VECTOR_ENCODING!r}")
    model = data.get("model")
    found = model.get("z_size") if isinstance(model, dict) else None
    if isinstance(model, dict):
        _known(model, "model", ("name", "z_size"))
        _text(model.get("name", ""), "model.name", MAX_NAME_CHARS)
    if type(found) is not int or found != z_size:
        raise SnapshotError(
            "model.z_size",
            f"the export was made for a model with {_show(found)} SVF components; "
            f"this model has {z_size}",
        )
    try:  # the same checks as an admin's `/gesal config`: a NaN reward poisons a channel
        config = ChannelConfig.parse(_of(data.get("config", {}), dict, "config"))
    except ConfigError as exc:
        raise GesalError(f"the export's channel settings are invalid: {exc}") from None
    raw_nodes = _list(data["nodes"], "nodes", math.inf)
    if len(raw_nodes) > config.max_nodes:
        _fail("nodes", f"{len(raw_nodes)} nodes, more than its max_nodes ({config.max_nodes})")
    raw_replies = _list(data["replies"], "replies", math.inf)
    cap = min(max_replies or MAX_REPLIES, MAX_REPLIES)
    if len(raw_replies) > cap:
        _fail("replies", f"{len(raw_replies)} replies, more than the {cap} kept per channel")
    nodes = _nodes(raw_nodes, z_size, embedding_size)
    ids = {n.node_id for n in nodes}
    merged = _merged(data.get("merged", {}), ids)
    replies = _replies(raw_replies, ids | set(merged), vocab_size)
    return Snapshot(config, nodes, replies, merged)


def _of(value, kind: type, what: str):
    if not isinstance(value, kind):
        _fail(what, f"must be a {_KIND.get(kind, kind.__name__)}, not {_show(value)}")
    return value


_KIND = {dict: "JSON object", list: "JSON list", str: "string"}


def _check_depth(data: object) -> None:
    """An already parsed document nests at most `MAX_DEPTH` deep (walked with a stack)."""
    stack: list[tuple[object, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if not isinstance(value, dict | list | tuple):
            continue
        if depth > MAX_DEPTH:
            raise SnapshotError(
                where or "the document", f"nests more than the {MAX_DEPTH} levels an export may"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1, _at(where, key)))


def _at(where: str, key: object) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def _show(value: object) -> str:
    """A value as a refusal quotes it: short, and never more than a line."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else f"{value:.3g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list | tuple):
        return "a JSON list"
    return f"a {type(value).__name__}"


def _fail(where: str, what: str) -> NoReturn:
    raise SnapshotError(where, what)


def _known(d: dict, where: str, names, required=()) -> None:
    for name in d:
        if name not in names:
            _fail(
                _at(where, name) if isinstance(name, str) else where, "is not a field of an export"
            )
    for name in required:
        if name not in d:
            _fail(_at(where, name), "is missing")


def _list(value: object, where: str, max_items: float = MAX_ITEMS) -> list:
    if not isinstance(value, list):
        _fail(where, f"must be a JSON list, not {_show(value)}")
    if len(value) > max_items:
        _fail(where, f"{len(value)} entries, more than the {max_items} an export may have")
    return value


def _dict(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, not {_show(value)}")
    return value


def _text(value: object, where: str, max_chars: int = MAX_TEXT_CHARS, empty: bool = True) -> str:
    if not isinstance(value, str):
        _fail(where, f"must be text, not {_describe(value)}")
    if len(value) > max_chars:
        _fail(where, f"is {len(value)} characters long, more than the {max_chars} allowed")
    if not empty and not value:
        _fail(where, "must not be empty")
    return value


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"the value {_show(value)}"
    if isinstance(value, int | float):
        return f"the number {_show(value)}"
    return _show(value)


def _id(value: object, where: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        _fail(where, f"{_show(value)} is not an id (1 to 64 letters, digits, '_' or '-')")
    return value


def _whole(value: object, where: str, top: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"must be a whole number, not {_describe(value)}")
    if not 0 <= value <= top:
        _fail(where, f"{_show(value)} is outside [0, {top}]")
    return value


def _number(value: object, where: str, low: float, high: float, what: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(where, f"must be {what}, not {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        _fail(where, f"{_show(number)} is not a finite number")
    if not low <= number <= high:
        _fail(where, f"{_show(value)} is outside [{low:g}, {high:g}]")
    return number


def _time(value: object, where: str) -> float:
    return _number(value, where, 0.0, MAX_TIME, "a time in seconds since 1970")


def _reward(value: object, where: str) -> float:
    return _number(value, where, -REWARD_LIMIT, REWARD_LIMIT)


def _vector(value: object, where: str, size: int | None, kind: str) -> np.ndarray:
    if not isinstance(value, str):
        _fail(where, f"must be a {VECTOR_ENCODING} string, not {_describe(value)}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _fail(where, "is not valid base64")
    if len(raw) % 4:
        _fail(where, f"is {len(raw)} bytes, not a whole number of float32 values")
    v = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if size is not None and v.size != size:
        _fail(where, f"has {v.size} components; this model's {kind} has {size}")
    bad = ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        _fail(where, f"component {i} is {v[i]:g}, not a finite number")
    return v


def _nodes(raw: list, z_size: int, embedding_size: int | None) -> list[Node]:
    known = {d["node_id"] for d in raw if isinstance(d, dict) and isinstance(d.get("node_id"), str)}
    nodes: list[Node] = []
    seen: set[str] = set()
    size = embedding_size
    for i, d in enumerate(raw):
        node = _node(d, f"nodes[{i}]", z_size, size, known)
        if node.node_id in seen:
            _fail(f"nodes[{i}].node_id", f"{node.node_id!r} is the id of an earlier node too")
        seen.add(node.node_id)
        size = node.embedding.size  # every node routes in one space
        nodes.append(node)
    return nodes


NODE_FIELDS = {f.name for f in fields(Node)}


def _node(d: object, at: str, z_size: int, size: int | None, ids: set) -> Node:
    d = _dict(d, at)
    _known(d, at, NODE_FIELDS, required=("node_id", "embedding", "z"))
    node_id = _id(d["node_id"], f"{at}.node_id")
    embedding = _vector(d["embedding"], f"{at}.embedding", size, "embedding")
    norm = float(np.linalg.norm(embedding.astype(np.float64)))
    if not 0 < norm <= EMBEDDING_NORM_LIMIT:
        _fail(
            f"{at}.embedding",
            f"has length {norm:g}; a routing embedding (a mean of unit vectors) has a "
            "length above 0 and at most 1",
        )
    z = _vector(d["z"], f"{at}.z", z_size, "z")
    low, high = Z_RANGE
    outside = (z < low) | (z > high)
    if outside.any():
        i = int(np.argmax(outside))
        _fail(f"{at}.z", f"component {i} is {z[i]:g}, outside [{low:g}, {high:g}]")
    node = Node(node_id, embedding, z)
    for name in ("count", "version", "rated", "updates", "skipped", "rollbacks"):
        if name in d:
            setattr(node, name, _whole(d[name], f"{at}.{name}"))
    if "baseline" in d:
        node.baseline = _reward(d["baseline"], f"{at}.baseline")
    if "reward_sum" in d:
        top = REWARD_LIMIT * node.rated * (1 + 1e-9) + 1e-9  # a sum of rated rewards
        node.reward_sum = _number(d["reward_sum"], f"{at}.reward_sum", -top, top)
    if "recent" in d:
        recent = _list(d["recent"], f"{at}.recent")
        node.recent = [_reward(r, f"{at}.recent[{j}]") for j, r in enumerate(recent)]
    if "downvoted" in d:
        texts = _list(d["downvoted"], f"{at}.downvoted")
        node.downvoted = [_text(t, f"{at}.downvoted[{j}]") for j, t in enumerate(texts)]
    if "neighbors" in d:
        node.neighbors = [
            _edge(e, f"{at}.neighbors[{j}]", ids)
            for j, e in enumerate(_list(d["neighbors"], f"{at}.neighbors"))
        ]
    for name in ("created_at", "updated_at"):
        if name in d:
            setattr(node, name, _time(d[name], f"{at}.{name}"))
    return node


def _edge(e: object, at: str, ids: set) -> tuple[str, float]:
    if not isinstance(e, list | tuple) or len(e) != 2:
        _fail(at, f"must be a pair [node id, similarity], not {_show(e)}")
    other = _id(e[0], f"{at}[0]")
    if other not in ids:
        _fail(f"{at}[0]", f"links to {other!r}, which is not a node of the export")
    return other, _number(e[1], f"{at}[1]", -1.0 - 1e-3, 1.0 + 1e-3, "a similarity")


def _merged(raw: object, ids: set[str]) -> dict[str, str]:
    merged = _dict(raw, "merged")
    if len(merged) > MAX_ITEMS:
        _fail("merged", f"{len(merged)} entries, more than the {MAX_ITEMS} kept")
    for victim, target in merged.items():
        _id(victim, "merged")
        at = f"merged.{victim}"
        _id(target, at)
        if victim in ids:
            _fail(at, f"{victim!r} is a node of the export, so it cannot also be folded away")
    for victim in merged:
        seen, node = {victim}, victim
        while node in merged:
            node = merged[node]
            if node in seen:
                _fail(f"merged.{victim}", "the merge map has a loop")
            seen.add(node)
        if node not in ids:
            _fail(
                f"merged.{victim}", f"was merged into {node!r}, which is not a node of the export"
            )
    return dict(merged)


REPLY_FIELDS = {f.name for f in fields(Reply)}
REPLY_REQUIRED = ("reply_id", "node_id", "prompt_ids", "response_ids", "prompt_text", "text")
REPLY_REQUIRED += ("z_version",)


def _replies(raw: list, owners: set[str], vocab_size: int | None) -> list[Reply]:
    replies: list[Reply] = []
    seen: set[str] = set()
    for i, d in enumerate(raw):
        reply = _reply(d, f"replies[{i}]", owners, vocab_size)
        if reply.reply_id in seen:
            _fail(f"replies[{i}].reply_id", f"{reply.reply_id!r} is the id of an earlier reply too")
        seen.add(reply.reply_id)
        replies.append(reply)
    return replies


def _reply(d: object, at: str, owners: set[str], vocab_size: int | None) -> Reply:
    d = _dict(d, at)
    _known(d, at, REPLY_FIELDS, required=REPLY_REQUIRED)
    reply_id = _id(d["reply_id"], f"{at}.reply_id")
    node_id = _id(d["node_id"], f"{at}.node_id")
    if node_id not in owners:
        _fail(f"{at}.node_id", f"{node_id!r} is neither a node of the export nor folded into one")
    reply = Reply(
        reply_id,
        node_id,
        _tokens(d["prompt_ids"], f"{at}.prompt_ids", vocab_size),
        _tokens(d["response_ids"], f"{at}.response_ids", vocab_size),
        _text(d["prompt_text"], f"{at}.prompt_text"),
        _text(d["text"], f"{at}.text"),
        _whole(d["z_version"], f"{at}.z_version"),
    )
    if d.get("logprob") is not None:
        reply.logprob = _number(d["logprob"], f"{at}.logprob", -math.inf, 0.0)
    if "votes" in d:
        votes = _dict(d["votes"], f"{at}.votes")
        if len(votes) > MAX_ITEMS:
            _fail(f"{at}.votes", f"{len(votes)} votes, more than the {MAX_ITEMS} kept")
        for user, value in votes.items():
            _text(user, f"{at}.votes", MAX_NAME_CHARS, empty=False)
            if type(value) is not int or value not in (1, -1):
                _fail(f"{at}.votes.{user}", f"a vote is 1 or -1, not {_show(value)}")
        reply.votes = dict(votes)
    if "corrections" in d:
        corrections = _list(d["corrections"], f"{at}.corrections")
        reply.corrections = [
            _correction(c, f"{at}.corrections[{j}]", vocab_size) for j, c in enumerate(corrections)
        ]
        users = [c["user"] for c in reply.corrections]
        if len(set(users)) != len(users):
            _fail(f"{at}.corrections", "a member has more than one correction of this reply")
    if d.get("platform_message_id") is not None:
        reply.platform_message_id = _text(
            d["platform_message_id"], f"{at}.platform_message_id", MAX_NAME_CHARS, empty=False
        )
    if "created_at" in d:
        reply.created_at = _time(d["created_at"], f"{at}.created_at")
    if d.get("counted") is not None:
        reply.counted = _reward(d["counted"], f"{at}.counted")
    return reply


def _correction(c: object, at: str, vocab_size: int | None) -> dict:
    c = _dict(c, at)
    _known(c, at, CORRECTION_FIELDS, required=tuple(sorted(CORRECTION_FIELDS)))
    ids = _tokens(c["ids"], f"{at}.ids", vocab_size)
    if not ids:
        _fail(f"{at}.ids", "a correction has at least one token")
    return {
        "user": _text(c["user"], f"{at}.user", MAX_NAME_CHARS, empty=False),
        "text": _text(c["text"], f"{at}.text", empty=False),
        "ids": ids,
    }


def _tokens(value: object, at: str, vocab_size: int | None) -> list[int]:
    tokens = _list(value, at, MAX_TOKENS)
    top = (vocab_size or MAX_COUNT + 1) - 1
    for j, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= top:
            _fail(f"{at}[{j}]", f"{_show(t)} is not a token id of this model (0 to {top})")
    return list(tokens)
