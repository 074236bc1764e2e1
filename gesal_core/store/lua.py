"""Lua scripts that make the Redis store's multi-step updates atomic.

A script runs to completion with no other command interleaved, so each one is a small
transaction. Every key a script touches is passed in KEYS and shares the channel's hash
tag, so the scripts also run on Redis Cluster. Errors are returned with a one-word code
(``NONODE``, ``NOREPLY``, ``CONFLICT``, ``BADDIM``, ``STAGED``) that `RedisStore` maps to
exceptions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Script:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


# KEYS: node, nodes zset, seq. ARGV: node id, then field/value pairs of the whole record.
# Replaces the record; a new node joins the end of the creation order.
SAVE_NODE = Script(
    "save_node",
    """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
end
return 1
""",
)

# KEYS: nodes zset. ARGV: the channel's key prefix. Routing's read: each node's id,
# embedding, count and updated_at (flat, in creation order), never its z. One script, so
# one round trip and one consistent view, however many nodes the channel has; node
# hashes are found through the index, as in RESET, and share the channel's hash tag.
NODE_HEADS = Script(
    "node_heads",
    """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HMGET', ARGV[1] .. ':node:' .. id, 'emb', 'count', 'updated_at')
  if h[1] then
    out[#out + 1] = id
    out[#out + 1] = h[1]
    out[#out + 1] = h[2]
    out[#out + 1] = h[3]
  end
end
return out
""",
)

# KEYS: node. ARGV: neighbours JSON. A node deleted meanwhile stays deleted.
SET_NEIGHBORS = Script(
    "set_neighbors",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'neighbors', ARGV[1])
end
return 1
""",
)

# KEYS: node. ARGV: the prompt's embedding (little-endian float32 bytes).
# count += 1; mean += (x - mean) / count, in double precision, stored as float32.
# Chunks of 1024 floats keep unpack() well inside Lua's C-stack limit for any width.
OBSERVE = Script(
    "observe",
    """
local h = redis.call('HMGET', KEYS[1], 'count', 'emb')
if not h[1] then return redis.error_reply('NONODE node does not exist') end
local old, new = h[2], ARGV[1]
if #old ~= #new then return redis.error_reply('BADDIM embedding size differs from the node') end
local count = tonumber(h[1]) + 1
local n = #new / 4
local out = {}
local i = 0
while i < n do
  local m = math.min(1024, n - i)
  local fmt = '<' .. string.rep('f', m)
  local a = {struct.unpack(fmt, old, i * 4 + 1)}
  local b = {struct.unpack(fmt, new, i * 4 + 1)}
  for j = 1, m do a[j] = a[j] + (b[j] - a[j]) / count end
  out[#out + 1] = struct.pack(fmt, unpack(a, 1, m))
  i = i + m
end
redis.call('HSET', KEYS[1], 'count', count, 'emb', table.concat(out))
return count
""",
)

# KEYS: reply, its corrections, replies zset, messages hash, the reply's node, meta hash.
# ARGV: require node (0/1), node id, reply id, created_at, platform message id or '',
# number of corrections, the corrections (JSON), then field/value pairs of the reply hash.
# With require=1 the reply is kept only if its node exists or was folded into another
# (meta "merged"): an answer that raced a reset is refused whole. Returns the history size.
PUT_REPLY = Script(
    "put_reply",
    """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[5]) == 0 then
  local merged = redis.call('HGET', KEYS[6], 'merged')
  if not (merged and cjson.decode(merged)[ARGV[2]]) then
    return redis.error_reply('NONODE the node of the reply does not exist')
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
local nc = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 7 + nc))
if nc > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 7, 6 + nc)) end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], ARGV[5], ARGV[3]) end
return redis.call('ZCARD', KEYS[3])
""",
)

# The part of RESET and REPLACE that erases a channel's node and reply records (KEYS[1],
# KEYS[2]: its node and reply sets; ARGV[1]: its key prefix); `n` counts what went.
ERASE_RECORDS = """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  n = n + redis.call('UNLINK', ARGV[1] .. ':node:' .. id)
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local r = ARGV[1] .. ':reply:' .. id
  n = n + redis.call('UNLINK', r, r .. ':corr')
end
"""

# KEYS: nodes zset, replies zset, then the channel's fixed keys (messages, feedback,
# config, meta, seq). ARGV: the channel's key prefix ``gesal:{ch}``.
# One step, so a concurrent write lands wholly before (erased) or wholly after it. The
# per-node and per-reply keys are found through the two indexes (every write adds a key
# and its index entry in one script or MULTI, so nothing is left out); they share the
# hash tag of the declared keys, so on a cluster they live in this script's slot. The
# trainer lock is not data and stays. The feedback stream goes with its consumer group:
# the next vote recreates the stream and `pending` the group (from id 0), so votes
# after a reset are trained as usual.
RESET = Script(
    "reset",
    ERASE_RECORDS
    + """
return n + redis.call('UNLINK', unpack(KEYS))
""",
)

# KEYS: the channel's fixed keys (nodes, replies, messages, feedback, config, meta, seq),
# then the same seven of a staged import (`Keys(channel, stage)`), then the stage's "done"
# marker. ARGV: the channel's key prefix, the stage's, the staged node and reply counts.
# An import, in one step: the stage is checked whole first (so a stage that expired or was
# cut short changes nothing), then the channel's data goes exactly as in RESET (the
# trainer lock stays; the feedback stream and its group go) and every staged key is
# renamed into its place, without the TTL that guarded it while staged. The marker makes
# a retried call (its reply lost to a dropped connection) a success, not a STAGED error.
REPLACE = Script(
    "replace",
    """
if redis.call('EXISTS', KEYS[15]) == 1 then return 0 end
local nn, nr = tonumber(ARGV[3]), tonumber(ARGV[4])
local nodes = redis.call('ZRANGE', KEYS[8], 0, -1)
local replies = redis.call('ZRANGE', KEYS[9], 0, -1)
if #nodes ~= nn or #replies ~= nr or redis.call('EXISTS', KEYS[12]) == 0 then
  return redis.error_reply('STAGED the staged import is incomplete')
end
for _, id in ipairs(nodes) do
  if redis.call('EXISTS', ARGV[2] .. ':node:' .. id) == 0 then
    return redis.error_reply('STAGED the staged import is incomplete')
  end
end
for _, id in ipairs(replies) do
  if redis.call('EXISTS', ARGV[2] .. ':reply:' .. id) == 0 then
    return redis.error_reply('STAGED the staged import is incomplete')
  end
end
"""
    + ERASE_RECORDS
    + """n = n + redis.call('UNLINK', unpack(KEYS, 1, 7))
local function move(from, to)
  redis.call('RENAME', from, to)
  redis.call('PERSIST', to)
end
for _, id in ipairs(nodes) do move(ARGV[2] .. ':node:' .. id, ARGV[1] .. ':node:' .. id) end
for _, id in ipairs(replies) do
  local from, to = ARGV[2] .. ':reply:' .. id, ARGV[1] .. ':reply:' .. id
  move(from, to)
  if redis.call('EXISTS', from .. ':corr') == 1 then move(from .. ':corr', to .. ':corr') end
end
for i = 1, 7 do
  if redis.call('EXISTS', KEYS[7 + i]) == 1 then move(KEYS[7 + i], KEYS[i]) end
end
redis.call('SET', KEYS[15], '1', 'EX', 600)
return n
""",
)

# KEYS: reply, feedback stream. ARGV: user, value ('' = retract), reply id, ts.
# The vote (last write wins per user) and its feedback event are written together.
SET_VOTE = Script(
    "set_vote",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOREPLY') end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'v:' .. ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], ARGV[2])
end
return redis.call('XADD', KEYS[2], '*', 'reply', ARGV[3], 'user', ARGV[1],
                  'kind', 'vote', 'value', ARGV[2], 'ts', ARGV[4])
""",
)

# KEYS: reply, its corrections list, feedback stream. ARGV: user, correction JSON,
# reply id, ts, text. A user's newer correction of the same reply replaces the older one.
ADD_CORRECTION = Script(
    "add_correction",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOREPLY') end
for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if cjson.decode(item)['user'] == ARGV[1] then redis.call('LREM', KEYS[2], 0, item) end
end
redis.call('RPUSH', KEYS[2], ARGV[2])
return redis.call('XADD', KEYS[3], '*', 'reply', ARGV[3], 'user', ARGV[1],
                  'kind', 'correction', 'text', ARGV[5], 'ts', ARGV[4])
""",
)

# KEYS: reply, messages hash. ARGV: reply id, platform message id.
LINK_MESSAGE = Script(
    "link_message",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOREPLY') end
redis.call('HSET', KEYS[1], 'msg', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
""",
)

# KEYS: reply, its corrections, replies zset, messages hash. ARGV: reply id.
# Retention: forget one old reply and its message mapping.
DROP_REPLY = Script(
    "drop_reply",
    """
local msg = redis.call('HGET', KEYS[1], 'msg')
if msg and redis.call('HGET', KEYS[4], msg) == ARGV[1] then
  redis.call('HDEL', KEYS[4], msg)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
""",
)

# KEYS: feedback stream, meta hash, one node key per update, then one reply key per
# counted reply.
# ARGV: group, #updates, #events, #counted replies, then 9 values per update (expected
# version, z bytes or '', baseline, rated delta, reward_sum delta, recent JSON, downvoted
# JSON, updated 0/1, rolled back 0/1), then the event ids, then each counted reply's reward
# (written to its hash field 'counted' if the reply is still kept).
# All checks come first, so a conflict changes nothing:
#   * every event must still be in the stream (acked events are deleted in this same
#     script), so a batch that another trainer already applied is refused;
#   * every node must exist with the version the trainer read.
# Then the updates are applied and the events acknowledged and deleted.
COMMIT = Script(
    "commit",
    """
local nu, ne, nc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local F = 9
local ev0 = 4 + nu * F
local ids = {}
for j = 1, ne do
  local id = ARGV[ev0 + j]
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    return redis.error_reply('CONFLICT feedback event ' .. id .. ' was already applied')
  end
  ids[j] = id
end
for i = 1, nu do
  local b = 4 + (i - 1) * F
  local v = redis.call('HGET', KEYS[2 + i], 'version')
  if (not v) or tonumber(v) ~= tonumber(ARGV[b + 1]) then
    return redis.error_reply('CONFLICT a node changed since it was read')
  end
end
for i = 1, nu do
  local k, b = KEYS[2 + i], 4 + (i - 1) * F
  if ARGV[b + 2] ~= '' then
    redis.call('HSET', k, 'z', ARGV[b + 2])
    redis.call('HINCRBY', k, 'version', 1)
  end
  local rs = tonumber(redis.call('HGET', k, 'reward_sum') or '0') + tonumber(ARGV[b + 5])
  redis.call('HSET', k, 'baseline', ARGV[b + 3], 'reward_sum', string.format('%.17g', rs),
             'recent', ARGV[b + 6], 'downvoted', ARGV[b + 7])
  redis.call('HINCRBY', k, 'rated', ARGV[b + 4])
  if ARGV[b + 8] == '1' then
    redis.call('HINCRBY', k, 'updates', 1)
  elseif ARGV[b + 9] == '1' then
    redis.call('HINCRBY', k, 'rollbacks', 1)
  else
    redis.call('HINCRBY', k, 'skipped', 1)
  end
end
for j = 1, nc do
  local key = KEYS[2 + nu + j]
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'counted', ARGV[ev0 + ne + j]) end
end
local acked = 0
local i = 1
while i <= ne do
  local chunk = {unpack(ids, i, math.min(ne, i + 999))}
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
  redis.call('XDEL', KEYS[1], unpack(chunk))
  i = i + 1000
end
if ne > 0 then redis.call('HINCRBY', KEYS[2], 'trained_events', ne) end
return acked
""",
)

# KEYS: lock. ARGV: token. Release only a lock we still hold.
RELEASE_LOCK = Script(
    "release_lock",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
)

# KEYS: lock. ARGV: token, lease (ms). Extend only a lock we still hold: a heartbeat
# must never prolong a lock that expired and another trainer took.
RENEW_LOCK = Script(
    "renew_lock",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""",
)

ALL = {
    s.name: s
    for s in (
        SAVE_NODE,
        NODE_HEADS,
        SET_NEIGHBORS,
        OBSERVE,
        PUT_REPLY,
        RESET,
        REPLACE,
        SET_VOTE,
        ADD_CORRECTION,
        LINK_MESSAGE,
        DROP_REPLY,
        COMMIT,
        RELEASE_LOCK,
        RENEW_LOCK,
    )
}
