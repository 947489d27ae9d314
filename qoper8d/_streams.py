"""What the nodes of a cluster keep in Redis: the keys, the entry and reply formats, and
the Lua scripts that change them (docs/cluster.md is the same, for other languages).

Every change that must be all-or-nothing is one script, so one round trip and atomic: a
batch of submits checked against the bound and added; a batch of replies each pushed only
if its entry's acknowledgement is the first (so a submitter gets one reply per entry even
when two nodes ran it); a cancel that removes an entry nobody took, or tells its holder;
a takeover that poisons what was delivered too often. Sans-IO: no client here, only text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

__all__ = [
    "BEAT",
    "CALL_BYTES",
    "CANCEL",
    "DEAD_MAXLEN",
    "PROGRESS",
    "RECLAIM",
    "RENEW",
    "REPLY",
    "REPLY_MAXLEN",
    "REQUEUE",
    "SUBMIT",
    "SWEEP",
    "Keys",
    "Reply",
    "call_length",
    "decode_reply",
    "entry_fields",
    "pack",
]

#: About how many entries `<stream>:dead` keeps (`XADD MAXLEN ~`): the oldest go first.
DEAD_MAXLEN = 10_000
#: Most replies a reply list keeps (`LTRIM`), should its node never read them.
REPLY_MAXLEN = 1_000_000


class Keys:
    """The names of a stream's keys, as bytes, for the node called `node`."""

    def __init__(self, stream: str, node: str) -> None:
        self.stream = stream
        self.group = stream
        self.node = node
        self.dead = f"{stream}:dead"
        self.nodes = f"{stream}:nodes"
        self.reply = self.reply_of(node)
        self.control = self.control_prefix + node

    @property
    def control_prefix(self) -> str:
        return f"{self.stream}:control:"

    def reply_of(self, node: str) -> str:
        return f"{self.stream}:reply:{node}"


class Reply(msgspec.Struct, frozen=True):
    """One element of a reply list: a final outcome (`ok` true or false) or a progress
    report (`ok` absent). Results and errors stay raw JSON, spliced into the client's line."""

    tag: str
    entry: str = ""
    ok: bool | None = None
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: msgspec.Raw = msgspec.Raw(b"null")
    progress: msgspec.Raw = msgspec.Raw(b"null")


decode_reply = msgspec.json.Decoder(Reply).decode


def _lua(text: str) -> bytes:
    return text.strip().encode()


#: KEYS: stream. ARGV: group, max_queue, this node's consumer name, how many entries it
#: takes, then the entries, one msgpack array of field arrays (one argument for the batch,
#: not one per field: each argument costs the client ~2 us to send). Each entry is added
#: while fewer than max_queue wait (in the stream, not yet taken); then the node takes up to
#: as many entries as it has room for, the oldest waiting first (`XREADGROUP`, as its
#: feeder would: its own submits when nothing older waits). The reply: the id of each entry,
#: or 0 for one refused; the entries taken, each its id and fields.
SUBMIT = _lua("""
local s, g = KEYS[1], ARGV[1]
local limit, take = tonumber(ARGV[2]), tonumber(ARGV[4])
local waiting = redis.call('XLEN', s)
local p = redis.pcall('XPENDING', s, g)
if type(p) == 'table' and p[1] then waiting = waiting - p[1] end
local out = {}
for n, fields in ipairs(cmsgpack.unpack(ARGV[5])) do
  if waiting < limit then
    out[n] = redis.call('XADD', s, '*', unpack(fields))
    waiting = waiting + 1
  else
    out[n] = 0
  end
end
local taken = {}
if take > 0 then
  local got = redis.call('XREADGROUP', 'GROUP', g, ARGV[3], 'COUNT', take, 'STREAMS', s, '>')
  if got then taken = got[1][2] end
end
return {out, taken}
""")

#: KEYS: stream. ARGV: group, ttl in ms, list cap, then one msgpack array of, per entry,
#: its id, its reply list and the reply. An entry acknowledged now for the first time is
#: deleted and its reply pushed (each list expires ttl after its last reply); one
#: acknowledged before (another node was first, or it was cancelled) gets nothing. An entry
#: with no reply list (its submitter was answered in process) is only acknowledged and
#: deleted. One XDEL for the batch, one RPUSH, LTRIM and PEXPIRE per list. The reply: how
#: many replies were pushed.
REPLY = _lua("""
local s, g, ttl, cap = KEYS[1], ARGV[1], ARGV[2], -tonumber(ARGV[3])
local a = cmsgpack.unpack(ARGV[4])
local gone, quiet, lists, keys = {}, {}, {}, {}
for i = 1, #a, 3 do
  local key = a[i + 1]
  if key == '' then
    quiet[#quiet + 1] = a[i]
  elseif redis.call('XACK', s, g, a[i]) == 1 then
    gone[#gone + 1] = a[i]
    local list = lists[key]
    if not list then
      list = {}
      lists[key] = list
      keys[#keys + 1] = key
    end
    list[#list + 1] = a[i + 2]
  end
end
if #quiet > 0 then
  -- One acknowledged before (another node's or a cancel's) was deleted then: a no-op.
  redis.call('XACK', s, g, unpack(quiet))
  for _, id in ipairs(quiet) do gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('XDEL', s, unpack(gone)) end
local pushed = 0
for _, key in ipairs(keys) do
  redis.call('RPUSH', key, unpack(lists[key]))
  redis.call('LTRIM', key, cap, -1)
  redis.call('PEXPIRE', key, ttl)
  pushed = pushed + #lists[key]
end
return pushed
""")

#: KEYS: stream. ARGV: group, ttl in ms, list cap, then per entry its id, its reply list
#: and a progress report: pushed only while the entry is still pending (not answered yet),
#: so never after its reply. The reply: how many were pushed.
PROGRESS = _lua("""
local s, g, ttl, cap = KEYS[1], ARGV[1], ARGV[2], -tonumber(ARGV[3])
local pushed = 0
for i = 4, #ARGV, 3 do
  local p = redis.call('XPENDING', s, g, ARGV[i], ARGV[i], 1)
  if p[1] and ARGV[i + 1] ~= '' then
    redis.call('RPUSH', ARGV[i + 1], ARGV[i + 2])
    redis.call('LTRIM', ARGV[i + 1], cap, -1)
    redis.call('PEXPIRE', ARGV[i + 1], ttl)
    pushed = pushed + 1
  end
end
return pushed
""")

#: KEYS: stream. ARGV: group, the control lists' prefix, "cancel" or "withdraw", ttl in
#: ms, then entry ids. An entry nobody took yet is deleted: it never runs (1). One a node
#: holds: on "cancel" it is acknowledged and deleted (its holder's reply will be dropped)
#: and the holder told on its control list (its name); on "withdraw" it is left to finish
#: (2). An id not in the stream: 0.
CANCEL = _lua("""
local s, g, prefix, mode, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', s, g, id, id, 1)
  if p[1] then
    if mode == 'cancel' then
      redis.call('XACK', s, g, id)
      redis.call('XDEL', s, id)
      redis.call('RPUSH', prefix .. p[1][2], id)
      redis.call('PEXPIRE', prefix .. p[1][2], ttl)
      out[#out + 1] = p[1][2]
    else
      out[#out + 1] = 2
    end
  else
    out[#out + 1] = redis.call('XDEL', s, id)
  end
end
return out
""")

#: KEYS: stream. ARGV: group, this node, then ids it holds. Each still held by this node
#: has its idle time reset (XCLAIM JUSTID: no delivery counted). The reply: the ids lost,
#: each followed by 1 (another node holds it now) or 0 (it is answered or cancelled).
RENEW = _lua("""
local s, g, me = KEYS[1], ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', s, g, ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == me then
    redis.call('XCLAIM', s, g, me, 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
    lost[#lost + 1] = p[1] and 1 or 0
  end
end
return lost
""")

#: KEYS: stream, dead stream. ARGV: group, this node, min idle ms, count, max_deliveries,
#: dead cap, reply ttl ms, reply list cap. Takes over up to `count` entries idle that long
#: (XAUTOCLAIM, which counts a delivery). One delivered more than max_deliveries times now
#: is not run again: it moves to the dead stream with the reason, and its submitter gets
#: `poisoned`. The reply: {next cursor, entries taken over, poisoned, deleted}.
RECLAIM = _lua("""
local s, dead, g, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local most, cap, ttl, rcap = tonumber(ARGV[5]), ARGV[6], ARGV[7], -tonumber(ARGV[8])
local r = redis.call('XAUTOCLAIM', s, g, me, ARGV[3], '0-0', 'COUNT', ARGV[4])
local taken, poisoned = {}, 0
for _, e in ipairs(r[2]) do
  local id, fields = e[1], e[2]
  local p = redis.call('XPENDING', s, g, id, id, 1)
  local n = p[1] and p[1][4] or 0
  if fields and n > most then
    local f = {}
    for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
    local why = 'delivered ' .. (n - 1) .. ' times (cluster.max_deliveries = ' .. most .. ')'
    redis.call('XADD', dead, 'MAXLEN', '~', cap, '*', 'entry', id, 'reason', why,
      'deliveries', n - 1, unpack(fields))
    redis.call('XACK', s, g, id)
    redis.call('XDEL', s, id)
    if f.reply_to and f.reply_to ~= '' then
      redis.call('RPUSH', f.reply_to, cjson.encode({tag = f.tag or '', entry = id, ok = false,
        error = {code = 'poisoned', message = 'the action was ' .. why, deliveries = n - 1}}))
      redis.call('LTRIM', f.reply_to, rcap, -1)
      redis.call('PEXPIRE', f.reply_to, ttl)
    end
    poisoned = poisoned + 1
  elseif fields then
    taken[#taken + 1] = e
  else
    redis.call('XACK', s, g, id)
  end
end
return {r[1], taken, poisoned, #(r[3] or {})}
""")

#: KEYS: stream. ARGV: group, then ids of entries this node holds but never started (it is
#: stopping): each is added again at the stream's end, as it was, and the old one
#: acknowledged and deleted, so another node runs it at once and no delivery is counted.
REQUEUE = _lua("""
local s, g = KEYS[1], ARGV[1]
local moved = 0
for i = 2, #ARGV do
  local e = redis.call('XRANGE', s, ARGV[i], ARGV[i])
  if e[1] and redis.call('XACK', s, g, ARGV[i]) == 1 then
    redis.call('XADD', s, '*', unpack(e[1][2]))
    redis.call('XDEL', s, ARGV[i])
    moved = moved + 1
  end
end
return moved
""")

#: KEYS: stream, nodes (sorted set: node -> when last seen, ms, Redis's clock), dead stream.
#: ARGV: group, this node, its description (JSON), seconds a node stays listed unseen.
#: Marks this node seen; the reply: {live nodes' descriptions, entries pending (taken, not
#: answered), entries waiting (not taken), entries in the dead stream}.
BEAT = _lua("""
local s, nodes, dead, g, me = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', nodes, now, me)
redis.call('HSET', nodes .. ':info', me, ARGV[3])
local live = redis.call('ZRANGEBYSCORE', nodes, now - ARGV[4] * 1000, '+inf')
local info = {}
if #live > 0 then info = redis.call('HMGET', nodes .. ':info', unpack(live)) end
local pending = 0
local p = redis.pcall('XPENDING', s, g)
if type(p) == 'table' and p[1] then pending = p[1] end
return {info, pending, redis.call('XLEN', s) - pending, redis.call('XLEN', dead)}
""")

#: KEYS: stream, nodes. ARGV: group, ms a node must be unseen to count as gone. Removes
#: the consumers of gone nodes that hold no entries any more (their entries were taken
#: over), and forgets those nodes. The reply: the names removed.
SWEEP = _lua("""
local s, nodes, g = KEYS[1], KEYS[2], ARGV[1]
local t = redis.call('TIME')
local cutoff = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[2])
local gone, held = {}, {}
local consumers = redis.pcall('XINFO', 'CONSUMERS', s, g)
if type(consumers) ~= 'table' or consumers.err then consumers = {} end
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  local seen = redis.call('ZSCORE', nodes, f.name)
  if f.pending == 0 and (not seen or tonumber(seen) < cutoff) then
    redis.call('XGROUP', 'DELCONSUMER', s, g, f.name)
    gone[#gone + 1] = f.name
  else
    held[f.name] = true
  end
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', cutoff)) do
  if not held[name] then
    redis.call('ZREM', nodes, name)
    redis.call('HDEL', nodes .. ':info', name)
  end
end
return gone
""")


#: About the most bytes of actions or replies one script call carries, one whole item at
#: least: a call holds Redis for as long as it runs, and Redis takes no argument longer than
#: its `proto-max-bulk-len` (512 MB by default) and no command past its
#: `client-query-buffer-limit` (1 GB), which a batch of a thousand 1 MiB actions or 16 MiB
#: results would pass.
CALL_BYTES = 8 << 20

_T = TypeVar("_T")


def call_length(items: Sequence[_T], size: Callable[[_T], int], most: int) -> int:
    """How many of `items`, from the first, one call carries: at most `most`, and no more
    than `CALL_BYTES` of their `size` unless the first alone is longer."""
    total = 0
    for n in range(min(len(items), most)):
        total += size(items[n])
        if total > CALL_BYTES and n:
            return n
    return min(len(items), most)


def pack(items: list[Any]) -> bytes:
    """`items` (byte strings, str, or lists of them) as one msgpack array for a script's
    `cmsgpack.unpack`: one argument for a batch rather than one per field. Byte strings go
    as msgpack str, which Redis's cmsgpack takes whatever their bytes (its bin is not
    supported), so an entry written by hand with bytes that are not UTF-8 passes as is."""
    out = bytearray()
    _pack_into(out, items)
    return bytes(out)


def _pack_into(out: bytearray, items: list[Any]) -> None:
    n = len(items)
    out += (
        bytes((0x90 | n,))
        if n < 16
        else b"\xdc" + n.to_bytes(2)
        if n < 65536
        else (b"\xdd" + n.to_bytes(4))
    )
    for item in items:
        if isinstance(item, list):
            _pack_into(out, item)
            continue
        data = item.encode() if isinstance(item, str) else item
        size = len(data)
        if size < 32:
            out.append(0xA0 | size)
        elif size < 256:
            out += b"\xd9" + size.to_bytes(1)
        elif size < 65536:
            out += b"\xda" + size.to_bytes(2)
        else:
            out += b"\xdb" + size.to_bytes(4)
        out += data


def entry_fields(fields: Any) -> dict[bytes, bytes]:
    """An entry's fields as XREADGROUP / XAUTOCLAIM give them, as a dict."""
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    return dict(zip(it, it, strict=True))
