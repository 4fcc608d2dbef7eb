"""Redis store: latency-tagged snapshots, a bounded delta log, cursors, health.

Layout (DESIGN §4; every key of partition ``p`` shares the hash tag ``{p}``
so one script touches them on Redis Cluster)::

    of:{p}:m:<market_id>   snapshot of one market (msgspec JSON of feed.models.Market)
    of:{p}:seq             hash  market_id -> seq of the stored snapshot
    of:{p}:idx             set   market ids of the partition
    of:{p}:owner           hash  market_id -> the source that owns it (first writer)
    of:{p}:pt              hash  market_id -> provider time of its stored state (ms)
    of:{p}:log             stream of delta batches, MAXLEN ~ log_maxlen; field d = JSON array of Delta
    of:{p}:epoch           copy of the store epoch, checked by every apply
    of:{p}:floor           seq floor: the highest seq of any market pruned from the partition
                           (written by Store.prune, never lowered, never expires); a market the
                           partition does not hold must start above it (see "Seq floor" below)
    of:{p}:h:<market_id>   stream: price history of one market (feed.history), one entry per applied
                           change that moved a selection's top: id = provider time (ms, kept
                           non-decreasing), fields t (provider time), r (received), q (seq), d (JSON
                           array of feed.history.Top); trimmed MINID ~ id − history_retention_ms,
                           the key expires history_retention_ms after its last write
    of:{0}:cursor          hash  source -> resume cursor (written with partition 0's data)
    of:epoch               random id made when the store is created (a new one voids resume tokens)
    of:meta                hash  partitions, created_at
    of:src:<source>        source health (msgspec JSON of feed.models.SourceHealth)
    of:sources             set   source names
    of:quarantine          stream of rejected provider messages (source, reason, detail, raw ≤ 4 KiB)
    of:quarantine:count    hash  "<source>:<reason>" -> count
    of:{links}:events      hash  event record id -> msgspec JSON of feed.matching.EventRecord
    of:{links}:seen        hash  event record id -> first seen, ms (the matcher links first seen first)
    of:{links}:events:ver  counter, bumped by every event registration that changed something
    of:{links}:map         hash  event record id -> {"c": canonical id, "p": confidence, "m": method}
    of:{links}:canon       hash  canonical id -> JSON summary (sport, name, start_time, members …)
    of:{links}:ver         counter, bumped when the links are rewritten (API nodes reload on change)
    of:{links}:lease       the linker lease (one linker writes links at a time)
    of:{es}:state          hash  provider event id -> msgspec JSON of feed.models.EventState (the latest)
    of:{es}:v              hash  event id -> version of the stored state
    of:{es}:pt             hash  event id -> provider time (ms) of the stored state
    of:{es}:owner          hash  event id -> the source that owns it (first writer)
    of:{es}:log            stream of event-state changes, MAXLEN ~ log_maxlen; field d = JSON array of
                           EventState (each a whole state: a consumer keeps the highest version per event)

``p = crc32(market_id) mod partitions``.

Apply is atomic and batched: one script call per partition applies many
market deltas — it drops any delta whose ``seq`` is not above the stored
one (a market's deltas in a batch are consecutive, so it compares the
first and last seq and the caller trims a partial overlap), writes the newest snapshot of each market once, appends the kept deltas
as one log entry and, for partition 0, stores the source cursor with them.

Seq floor (docs/architecture.md §69): a market id's seq never goes backwards,
across a prune and an ingest restart. Clients keep a market the nodes pruned
(nothing tells them) and drop every delta whose seq is not above the one they
hold, so a pruned market re-created at seq 1 would be ignored until its seq
passed the old one and its next delta then applied to the *old* market. So
:meth:`Store.prune` raises the partition's floor to the seq of every market it
drops, and the apply script refuses (reply ``FLOOR``, nothing written) a
market the partition does not hold whose first seq is not above the floor; the
writer's ``rebase`` callback (:meth:`feed.book.Book.rebase`) turns that
market's deltas into one image of its current state above the floor, and the
batch is retried. One integer per partition, not a tombstone per market: a
client can hold a pruned market for as long as it runs, so no TTL would be long
enough, and the memory stays constant whatever the prune rate. The cost: a
market new to a partition starts above the floor, not at 1 (a seq is only ever
compared within one market; an image needs no continuity).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

from feed.errors import ConfigError, StoreError
from feed.models import (
    DELTAS_DECODER,
    ENCODER,
    EVENT_STATE_DECODER,
    EVENT_STATES_DECODER,
    HEALTH_DECODER,
    MARKET_DECODER,
    Delta,
    EventState,
    Market,
    SourceHealth,
)

logger = logging.getLogger(__name__)

QUARANTINE_RAW_MAX = 4096
QUARANTINE_MAXLEN = 10_000


def partition_of(market_id: str, partitions: int) -> int:
    """The partition a market belongs to: crc32(id) mod partitions."""
    if partitions == 1:
        return 0
    return zlib.crc32(market_id.encode()) % partitions


def market_key(p: int, market_id: str) -> str:
    return f"of:{{{p}}}:m:{market_id}"


def log_key(p: int) -> str:
    return f"of:{{{p}}}:log"


def seq_key(p: int) -> str:
    return f"of:{{{p}}}:seq"


def idx_key(p: int) -> str:
    return f"of:{{{p}}}:idx"


def owner_key(p: int) -> str:
    return f"of:{{{p}}}:owner"


def pt_key(p: int) -> str:
    return f"of:{{{p}}}:pt"


def pepoch_key(p: int) -> str:
    return f"of:{{{p}}}:epoch"


def floor_key(p: int) -> str:
    """Partition ``p``'s seq floor (in the partition's hash slot, like its other keys)."""
    return f"of:{{{p}}}:floor"


def writers_key(p: int) -> str:
    """Partition ``p``'s writer marks: per source, the id of the newest log entry its writes added
    (in the partition's hash slot: it goes back with the partition's data, §81)."""
    return f"of:{{{p}}}:writers"


def push_channel(p: int, db: int = 0) -> str:
    """The pushed log's channel of partition ``p`` (pub/sub channels are not per database:
    the database is in the name, so two stores on one server never hear each other)."""
    return f"of:{{{p}}}:push:{db}"


def history_key(p: int, market_id: str) -> str:
    return f"of:{{{p}}}:h:{market_id}"


CURSOR_KEY = "of:{0}:cursor"
EPOCH_KEY = "of:epoch"
META_KEY = "of:meta"
SOURCES_KEY = "of:sources"
QUARANTINE_KEY = "of:quarantine"
QUARANTINE_COUNT_KEY = "of:quarantine:count"


ES_STATE_KEY = "of:{es}:state"
ES_VERSION_KEY = "of:{es}:v"
ES_PT_KEY = "of:{es}:pt"
ES_OWNER_KEY = "of:{es}:owner"
ES_LOG_KEY = "of:{es}:log"
#: per source: the id of the newest event-state log entry its writes added (§81)
ES_WRITERS_KEY = "of:{es}:writers"
_ES_KEYS = [ES_STATE_KEY, ES_VERSION_KEY, ES_PT_KEY, ES_OWNER_KEY, ES_LOG_KEY, ES_WRITERS_KEY]

EVENTS_KEY = "of:{links}:events"
EVENTS_SEEN_KEY = "of:{links}:seen"
EVENTS_VER_KEY = "of:{links}:events:ver"
LINKS_KEY = "of:{links}:map"
CANON_KEY = "of:{links}:canon"
LINKS_VER_KEY = "of:{links}:ver"
LINK_LEASE_KEY = "of:{links}:lease"

# KEYS: 1 lease; ARGV: 1 owner, 2 ttl ms. Take the lease when free, renew it when ours.
LEASE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""

# KEYS: 1 lease, 2 links map, 3 canonical summaries, 4 links version; ARGV: 1 owner, 2 n links,
#       then n (record id, link JSON) pairs, then (canonical id, summary JSON) pairs.
# Replaces every link and summary only while ``owner`` holds the lease (a leader that stalled past
# its lease must not overwrite what the next leader wrote); returns the new version, or -1.
SAVE_LINKS_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('DEL', KEYS[2], KEYS[3])
local n = tonumber(ARGV[2])
local last = 2 + 2 * n
for i = 3, last, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = last + 1, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return redis.call('INCR', KEYS[4])
"""


def source_key(name: str) -> str:
    return f"of:src:{name}"


# KEYS: 1 seq hash, 2 log, 3 idx, 4 partition epoch, 5 cursor hash (or a dummy key of the
#       partition), 6 owner hash (market -> source), 7 provider-time hash, 8 seq floor,
#       9 writer marks (source -> newest entry id it added), 10.. snapshot keys in market order
# ARGV: 1 epoch, 2 log maxlen, 3 cursor source ("" = none), 4 cursor value, 5 n markets,
#       6 push channel ("" = no push), 7 the writer (the batch's source; "" = no mark),
#       then per market: market_id, snapshot JSON, first seq, last seq, the market's deltas
#       as JSON array items joined by "," (seqs first..last, consecutive), source name,
#       provider time (ms) of the first delta, provider time of the last delta, "1" when the
#       first delta is an image else "0"
# Checks every market before writing anything: a batch is applied whole or not at all.
# A market belongs to the first source that wrote it: another source's changes are dropped
# (counted as foreign), so two sources can never interleave their books in one market.
# A market never moves back to older provider data: deltas whose provider time is older than
# the stored state's are dropped (a restarted replay, a second writer of the same source) — judged
# after the seq checks, on the part of the batch the store does not hold: a retried batch whose
# first try landed without a reply is trimmed first (PARTIAL), else its oldest delta, older than
# what that first try stored, dropped the newer ones with it.
# Failing writes: Redis does not roll back a script, so whatever can fail comes before the first
# write — every key the script writes is read first (a key of another type errors there), and the
# XADD (a MAXLEN Redis refuses) goes before the other writes: a script that errors has written nothing.
# Lost writes: a market whose stored seq is below first - 1 while the batch starts with a delta
# (not an image) lost acknowledged writes (a failover promoted a replica that had not received
# them, an older RDB was restored): counted in `lost`; the writer re-images its markets.
# Pushed log: the new entry is also PUBLISHed on the push channel as "<epoch> <previous entry id>
# <entry id> <deltas JSON>" (the previous id read from the log itself, "" when it is empty: an
# entry any other writer added breaks the chain), so a reader that holds exactly the previous
# entry can apply it without reading the log (LogPush). A refused PUBLISH (an ACL without the
# channel) does not fail the write: readers then read the log.
# Seq floor: a market the partition does not hold (no stored seq: new, or pruned) whose first seq
# is not above the partition's floor (the highest seq of any market pruned from it) would move
# back in time for every client that still holds the pruned market: nothing is written and the
# reply is {"FLOOR", floor, ids of those markets} (the caller re-images them above the floor and
# retries).
# Writer mark: the entry's id is also the writer's mark in KEYS[9]; the mark found before (the id of
# the newest entry this writer added, as the store holds it — "" when none) is returned: older than
# what the writer knows it added means the store went back in time (§81), whatever others wrote since.
# Returns {log entry id or "", kept, dropped, foreign, lost, ids of the markets kept, the writer's mark
# before}; errors "EPOCH <epoch>" when the
# partition epoch differs and "PARTIAL <market_id> <stored seq>" when a market's stored seq
# falls inside the batch (the caller trims and retries).
APPLY_SCRIPT = """
local epoch = redis.call('GET', KEYS[4])
if epoch ~= ARGV[1] then
  return redis.error_reply('EPOCH ' .. tostring(epoch))
end
-- every key written below is read first (a key of another type errors here, before any write)
redis.call('SCARD', KEYS[3])
if ARGV[3] ~= '' then
  redis.call('HEXISTS', KEYS[5], ARGV[3])
end
local mark = ''
if ARGV[7] ~= '' then
  mark = redis.call('HGET', KEYS[9], ARGV[7]) or ''
end
local n = tonumber(ARGV[5])
local keep = {}
local dropped = 0
local foreign = 0
local lost = 0
local a = 8
local ptkey = KEYS[7]
local floor = nil
local below = {}
for i = 1, n do
  local mid = ARGV[a]
  local first = tonumber(ARGV[a + 2])
  local last = tonumber(ARGV[a + 3])
  local owner = redis.call('HGET', KEYS[6], mid)
  if owner and owner ~= ARGV[a + 5] then
    keep[i] = false
    foreign = foreign + (last - first + 1)
  else
    local held = redis.call('HGET', KEYS[1], mid)
    local stored = tonumber(held or '0')
    local stored_pt = tonumber(redis.call('HGET', ptkey, mid) or '0')
    if held == false and floor == nil then
      floor = redis.call('GET', KEYS[8]) or '0'
    end
    if stored >= last then
      keep[i] = false
      dropped = dropped + (last - first + 1)
    elseif stored >= first then
      return redis.error_reply('PARTIAL ' .. mid .. ' ' .. stored)
    elseif tonumber(ARGV[a + 6]) < stored_pt then
      keep[i] = false
      dropped = dropped + (last - first + 1)
    elseif held == false and first <= tonumber(floor) then
      keep[i] = false
      below[#below + 1] = mid
    else
      keep[i] = true
      if stored < first - 1 and ARGV[a + 8] == '0' then
        lost = lost + 1
      end
    end
  end
  a = a + 9
end
if #below > 0 then
  return {'FLOOR', floor, below}
end
local parts = {}
local kept = 0
local kept_ids = {}
a = 8
for i = 1, n do
  if keep[i] then
    parts[#parts + 1] = ARGV[a + 4]
    kept = kept + (tonumber(ARGV[a + 3]) - tonumber(ARGV[a + 2]) + 1)
    kept_ids[#kept_ids + 1] = ARGV[a]
  end
  a = a + 9
end
local id = ''
local payload = ''
local prev = ''
if #parts > 0 then
  payload = '[' .. table.concat(parts, ',') .. ']'
  if ARGV[6] ~= '' then
    local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if #last > 0 then
      prev = last[1][1]
    end
  end
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'd', payload)
  if ARGV[7] ~= '' then
    redis.call('HSET', KEYS[9], ARGV[7], id)
  end
end
a = 8
for i = 1, n do
  if keep[i] then
    local mid = ARGV[a]
    redis.call('HSET', KEYS[1], mid, ARGV[a + 3])
    redis.call('HSET', KEYS[6], mid, ARGV[a + 5])
    redis.call('HSET', ptkey, mid, ARGV[a + 7])
    redis.call('SET', KEYS[9 + i], ARGV[a + 1])
    redis.call('SADD', KEYS[3], mid)
  end
  a = a + 9
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[3], ARGV[4])
end
if id ~= '' and ARGV[6] ~= '' then
  redis.pcall('PUBLISH', ARGV[6], ARGV[1] .. ' ' .. prev .. ' ' .. id .. ' ' .. payload)
end
return {id, kept, dropped, foreign, lost, kept_ids, mark}
"""


# KEYS: 1 state hash, 2 version hash, 3 provider-time hash, 4 owner hash, 5 log stream, 6 writer marks
# ARGV: 1 log maxlen, 2 n states, 3 the writer ("" = no mark), then per state: event id, JSON, version,
#       provider time (ms), source
# A state is kept only when its version is above the stored one and its provider time not below the
# stored one (an out-of-order or older state never overwrites a newer one), and only from the source
# that first wrote the event (another source's states are dropped as foreign). The kept states are
# appended to the log as one entry, whose id becomes the writer's mark (as APPLY_SCRIPT's). Returns
# {log entry id or "", kept, dropped, foreign, the writer's mark before ("" when none)}.
EVENT_STATE_SCRIPT = """
local n = tonumber(ARGV[2])
local mark = ''
if ARGV[3] ~= '' then
  mark = redis.call('HGET', KEYS[6], ARGV[3]) or ''
end
local parts = {}
local kept, dropped, foreign = 0, 0, 0
local a = 4
for i = 1, n do
  local eid = ARGV[a]
  local owner = redis.call('HGET', KEYS[4], eid)
  if owner and owner ~= ARGV[a + 4] then
    foreign = foreign + 1
  else
    local v = tonumber(redis.call('HGET', KEYS[2], eid) or '-1')
    local pt = tonumber(redis.call('HGET', KEYS[3], eid) or '0')
    if tonumber(ARGV[a + 2]) <= v or tonumber(ARGV[a + 3]) < pt then
      dropped = dropped + 1
    else
      redis.call('HSET', KEYS[1], eid, ARGV[a + 1])
      redis.call('HSET', KEYS[2], eid, ARGV[a + 2])
      redis.call('HSET', KEYS[3], eid, ARGV[a + 3])
      redis.call('HSET', KEYS[4], eid, ARGV[a + 4])
      parts[#parts + 1] = ARGV[a + 1]
      kept = kept + 1
    end
  end
  a = a + 5
end
local id = ''
if #parts > 0 then
  id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[1], '*', 'd', '[' .. table.concat(parts, ',') .. ']')
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[6], ARGV[3], id)
  end
end
return {id, kept, dropped, foreign, mark}
"""

# KEYS: 1 a writer-marks hash; ARGV: writer, mark, … Drops each writer's mark only if it is still the
# one given (a writer that moved it since keeps it). Returns how many were dropped.
DROP_MARKS_SCRIPT = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: a delta log, its writer marks hash; ARGV: writer, least entry time (ms). A writer that has written
# nothing there yet (a restarted ingest) takes the log's newest entry id as its mark (§81, §88: the store
# going back to before it is found at the next mark check) — unless that entry is older than the least
# time (the marks' pruning would drop it: a false alarm). Returns the writer's mark ("" when none).
ADOPT_MARK_SCRIPT = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then return cur end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] == nil then return '' end
local id = top[1][1]
if tonumber(string.match(id, '^(%d+)')) < tonumber(ARGV[2]) then return '' end
redis.call('HSET', KEYS[2], ARGV[1], id)
return id
"""

# KEYS: state, version, provider-time, owner hashes; ARGV: event id, version, … Drops each state only if
# its stored version is still the given one. Returns the ids dropped.
PRUNE_STATES_SCRIPT = """
local out = {}
for i = 1, #ARGV, 2 do
  local eid = ARGV[i]
  if redis.call('HGET', KEYS[2], eid) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], eid)
    redis.call('HDEL', KEYS[2], eid)
    redis.call('HDEL', KEYS[3], eid)
    redis.call('HDEL', KEYS[4], eid)
    out[#out + 1] = eid
  end
end
return out
"""


PRUNE_SCRIPT = """
local out = {}
local n = #ARGV / 2
local floor = tonumber(redis.call('GET', KEYS[5]) or '0')
local top = nil
for i = 1, n do
  local mid = ARGV[2 * i - 1]
  local seq = ARGV[2 * i]
  if redis.call('HGET', KEYS[1], mid) == seq then
    redis.call('DEL', KEYS[5 + i])
    redis.call('SREM', KEYS[2], mid)
    redis.call('HDEL', KEYS[1], mid)
    redis.call('HDEL', KEYS[3], mid)
    redis.call('HDEL', KEYS[4], mid)
    out[#out + 1] = mid
    if tonumber(seq) > floor then
      floor = tonumber(seq)
      top = seq
    end
  end
end
if top then
  redis.call('SET', KEYS[5], top)
end
return out
"""
"""Drop markets from one partition — each only if its stored seq is still the given one
(a change since the caller decided wins) — and raise the partition's seq floor to the highest
seq dropped (never lowered: a re-created market must start above it). KEYS: seq, idx, owner,
pt, seq floor, then one market key per market; ARGV: market id, seq, … (seqs as decimal
strings, stored as given). Returns the ids dropped."""


# KEYS: history streams of one partition; ARGV: 1 retention ms, then per key: n entries, then per
# entry: provider time ms, received ms, seq, payload. Entry ids are <provider time>-<n> (Redis 6.2
# has no <ms>-* ids), the time kept non-decreasing per stream (a time before the newest entry's
# uses the newest's); each XADD trims MINID ~ (its ms − retention) and the key expires retention
# ms after the write.
# Returns the number of entries added.
HISTORY_SCRIPT = """
local retention = tonumber(ARGV[1])
local a = 2
local added = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local n = tonumber(ARGV[a])
  a = a + 1
  local top = -1
  local sub = 0
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last > 0 then
    local ms, sq = string.match(last[1][1], '^(%d+)-(%d+)$')
    top = tonumber(ms)
    sub = tonumber(sq)
  end
  for j = 1, n do
    local t = tonumber(ARGV[a])
    if t <= top then
      t = top
      sub = sub + 1
    else
      sub = 0
    end
    top = t
    redis.call('XADD', key, 'MINID', '~', string.format('%d', math.max(t - retention, 0)),
               string.format('%d-%d', t, sub), 't', ARGV[a], 'r', ARGV[a + 1], 'q', ARGV[a + 2], 'd', ARGV[a + 3])
    a = a + 4
    added = added + 1
  end
  redis.call('PEXPIRE', key, retention)
end
return added
"""

HistoryEntry = tuple[int, int, int, bytes]
"""One history entry to write: (provider time ms, received ms, seq, payload JSON)."""


@dataclass(slots=True)
class ApplyResult:
    """What one batched apply did: log entry ids per partition; deltas kept,
    dropped (seq not above the stored one) and foreign (the market belongs
    to another source); lost: markets whose stored state was missing
    acknowledged writes (stored seq below the batch's first delta − 1): the
    writer must re-image its markets."""

    entries: dict[int, str]
    kept: int
    dropped: int
    foreign: int = 0
    lost: int = 0
    #: ids of the markets whose deltas were applied (feed.history records only those)
    markets: set[str] = field(default_factory=set)
    #: markets the store did not hold that would have started at or below their partition's seq
    #: floor: market id -> the image (from the ``rebase`` callback, above the floor) written in
    #: place of all of that market's deltas in the batch
    rebased: dict[str, Delta] = field(default_factory=dict)
    #: per partition written, the writer's mark before this write: the id of the newest log entry
    #: its writes had added as the store held it ("" when none; §81) — older than the writer knows
    #: it added means the store went back in time
    marks: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class EventStateResult:
    """What one event-state write did: the log entry id ("" when nothing was
    kept), states kept, dropped (not newer than the stored one) and foreign
    (the event belongs to another source)."""

    entry: str
    kept: int
    dropped: int
    foreign: int
    #: the writer's mark before this write (as :attr:`ApplyResult.marks`, on the event-state log;
    #: "" when none, None when nothing was written or no writer was named)
    mark: str | None = None


@dataclass(slots=True)
class StoredMarks:
    """What the store holds of some markets, read in one round trip
    (:meth:`Store.stored_marks`): the epoch now in Redis (``of:epoch``; None
    when it is missing) and, per market id asked for, (stored seq — 0 when the
    partition holds none; the source that owns it — None when none; provider
    time of the stored state, ms since the Unix epoch — 0 when none); per
    event id asked for, the same of its stored event state (version — 0 when
    none is stored; owner; provider time)."""

    epoch: str | None
    marks: dict[str, tuple[int, str | None, int]]
    events: dict[str, tuple[int, str | None, int]] = field(default_factory=dict)
    #: per partition asked for: the writer's mark (:attr:`ApplyResult.marks`; "" when none)
    writer_marks: dict[int, str] = field(default_factory=dict)
    #: the writer's mark on the event-state log ("" when none; None when not asked)
    state_mark: str | None = None


#: rounds :meth:`Store.ensure_epoch` reads and repairs the epochs before it gives up (StoreError)
EPOCH_ROUNDS = 8

# KEYS: 1 of:epoch; ARGV: 1 the epoch read, 2 a new epoch. Replaces the epoch only while it is still
# the one read (a concurrent opener that replaced it first wins); returns the epoch now (nil: none).
EPOCH_SWAP_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return cur
"""


def _config_values(reply: object, name: str) -> set[str]:
    """Every value of setting ``name`` in a CONFIG GET reply: redis-py's dict, or a
    Redis Cluster client's dict of such dicts (one per node)."""
    out: set[str] = set()
    if isinstance(reply, dict):
        for k, v in reply.items():
            key = k.decode() if isinstance(k, bytes) else k
            if isinstance(v, dict):
                out |= _config_values(v, name)
            elif key == name and isinstance(v, (bytes, str)):
                out.add(v.decode() if isinstance(v, bytes) else v)
    return out


class EpochChanged(StoreError):
    """The store's epoch is not the one this writer started with (Redis lost
    its data or was reset): the writer must re-send full images."""


class SeqBelowFloor(StoreError):
    """A market the store does not hold would start at or below its
    partition's seq floor (it was pruned at a higher seq: clients may still
    hold it), and the writer gave :meth:`Store.apply` no ``rebase`` that
    re-images it above the floor. Nothing of that partition was written."""

    def __init__(self, market_id: str, floor: int) -> None:
        super().__init__(f"market {market_id} would start at or below its partition's seq floor {floor}")
        self.market_id = market_id
        self.floor = floor


Rebase = Callable[[str, int], Delta | None]
"""``rebase(market_id, floor)``: the market's current state as an image delta at a
seq above ``floor`` — the writer's book moves to that seq (:meth:`feed.book.Book.rebase`);
None when the writer does not hold the market."""


# -- replies ---------------------------------------------------------------
# redis-py types a reply ``bytes | str`` (it cannot know ``decode_responses``)
# and XREAD's as a RESP2 list or a RESP3 map. The clients made by connect()
# use the defaults (bytes, RESP2); these helpers narrow a reply once, and
# raise StoreError on anything else instead of failing later with a TypeError.


def reply_text(value: object) -> str:
    """A Redis string reply as str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise StoreError(f"unexpected redis reply {value!r:.80}")


def _mark_text(value: object) -> str:
    """A writer mark reply as str ("" for nil or anything that is not text: a mark someone
    overwrote reads as missing — the writer audits the store — never as an exception)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def reply_text_or_none(value: object) -> str | None:
    """A Redis string reply as str; a nil reply as None."""
    return None if value is None else reply_text(value)


def reply_entries(rows: object) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE / XREVRANGE rows → [(entry id, fields)]."""
    if not isinstance(rows, list):
        raise StoreError(f"unexpected redis stream reply {rows!r:.80}")
    out: list[tuple[str, dict[bytes, bytes]]] = []
    for entry_id, fields in rows:
        if not isinstance(fields, dict):
            raise StoreError(f"unexpected redis stream entry {fields!r:.80}")
        out.append((reply_text(entry_id), fields))
    return out


def reply_streams(res: object) -> list[tuple[str, list[tuple[str, dict[bytes, bytes]]]]]:
    """An XREAD reply (None when nothing arrived) → [(stream key, entries)]."""
    if res is None:
        return []
    if isinstance(res, dict):  # RESP3
        pairs = list(res.items())
    elif isinstance(res, list):  # RESP2: [[key, rows], …]
        pairs = [(pair[0], pair[1]) for pair in res]
    else:
        raise StoreError(f"unexpected redis XREAD reply {res!r:.80}")
    return [(reply_text(key), reply_entries(rows)) for key, rows in pairs]


def connect(url: str, *, cluster: bool = False, timeout_s: float = 5.0) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (``redis://``, ``rediss://``,
    ``unix://``); ``cluster=True`` gives a RedisCluster client."""
    if cluster:
        # RedisCluster serves the same command API as Redis but redis-py does not declare it a
        # subclass (or a shared protocol), so its stubs cannot express "either client" here
        return RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)  # type: ignore[return-value]
    # No hidden retries: redis-py's default retry loop can hold one call for
    # ~15 s against a stalled server; callers back off and retry themselves.
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   health_check_interval=30, retry=Retry(NoBackoff(), 0))


class Store:
    """Reads and writes the oddsfeed layout on one Redis (or Redis Cluster).

    partitions: P ≥ 1, fixed for the life of the data (stored in ``of:meta``;
    a mismatch raises StoreError). log_maxlen: approximate number of log
    entries kept per partition (``XADD MAXLEN ~``). push: also PUBLISH every
    new log entry for the readers' pushed log (:class:`LogPush`; never on
    Redis Cluster).
    """

    def __init__(self, redis: aioredis.Redis, *, partitions: int = 1, log_maxlen: int = 100_000,
                 push: bool = True) -> None:
        if partitions < 1 or log_maxlen < 1:  # (a MAXLEN below 1 fails every XADD: nothing would be logged)
            raise ConfigError(f"partitions and log_maxlen must be at least 1, not {partitions} and {log_maxlen}")
        self.redis = redis
        self.partitions = partitions
        self.log_maxlen = log_maxlen
        self.epoch: str = ""
        #: publish every log entry for the readers' pushed log (``push=False``: not; never on
        #: Redis Cluster, where a PUBLISH goes to every node: readers there follow the log with
        #: XREAD alone)
        self.push = push and not isinstance(redis, RedisCluster)
        self.db = 0 if not self.push else int(redis.connection_pool.connection_kwargs.get("db") or 0)
        self._apply = redis.register_script(APPLY_SCRIPT)
        self._lease = redis.register_script(LEASE_SCRIPT)
        self._save_links = redis.register_script(SAVE_LINKS_SCRIPT)
        self._prune = redis.register_script(PRUNE_SCRIPT)
        self._history = redis.register_script(HISTORY_SCRIPT)
        self._event_states = redis.register_script(EVENT_STATE_SCRIPT)
        self._drop_marks = redis.register_script(DROP_MARKS_SCRIPT)
        self._adopt_mark = redis.register_script(ADOPT_MARK_SCRIPT)
        self._prune_states = redis.register_script(PRUNE_STATES_SCRIPT)

    @classmethod
    async def open(cls, url: str, *, partitions: int = 1, log_maxlen: int = 100_000,
                   cluster: bool = False, push: bool = True) -> "Store":
        """Connect, check the server answers, create or load the epoch
        (:meth:`ensure_epoch`), and warn when Redis may evict keys
        (:meth:`warn_if_evicting`).

        Raises StoreError("cannot reach redis at …: …") when unreachable, and
        :meth:`ensure_epoch`'s StoreError (another partition count; epochs that
        do not settle).
        """
        client = connect(url, cluster=cluster)
        store = cls(client, partitions=partitions, log_maxlen=log_maxlen, push=push)
        try:
            await client.ping()
            await store.ensure_epoch()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(f"cannot reach redis at {_redact(url)}: {exc}") from None
        except StoreError:
            await client.aclose()
            raise
        await store.warn_if_evicting()
        return store

    async def warn_if_evicting(self) -> str | None:
        """Log a warning when Redis's ``maxmemory-policy`` is an ``allkeys-*`` one:
        under memory pressure it may evict ``of:epoch``, a snapshot, a seq hash or
        a delta log — writes the store acknowledged would vanish
        (docs/architecture.md §79). (``volatile-*`` policies evict only keys with
        a TTL, which none of those has: Redis then refuses writes with OOM, as
        under ``noeviction``, and the ingest keeps them.) Returns the policy
        warned about (several joined by "/" on a Redis Cluster whose nodes
        differ), or None: no ``allkeys-*`` policy, or CONFIG refused (a managed
        Redis) — then nothing is said. Never raises."""
        client: Any = self.redis
        try:
            if isinstance(client, RedisCluster):  # every primary's (redis-py asks one node by default)
                reply = await client.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
            else:
                reply = await client.config_get("maxmemory-policy")
        except (RedisError, OSError):
            return None
        policies = sorted(p for p in _config_values(reply, "maxmemory-policy") if p.startswith("allkeys"))
        if not policies:
            return None
        policy = "/".join(policies)
        logger.warning("redis maxmemory-policy is %s: under memory pressure Redis may evict the "
                       "store's epoch, snapshots or delta log and lose acknowledged writes; set "
                       "maxmemory-policy noeviction (writes then fail with OOM, and the ingest keeps them)", policy)
        return policy

    async def close(self) -> None:
        await self.redis.aclose()

    # -- epoch ---------------------------------------------------------------

    #: connections the client made or remade since :meth:`ensure_epoch` (a plain Redis client's;
    #: not counted on Redis Cluster): redis-py reconnects a pooled connection silently — to a
    #: server that may have restarted on an older file — so a writer compares the store with its
    #: book when this moves (:meth:`feed.ingest.Ingest._audit_store`)
    connects = 0

    def _watch_connects(self) -> None:
        """Count every connect of the client's pooled connections, present and
        future, in :attr:`connects` (a connect callback on each). Idempotent; a
        no-op on a Redis Cluster client (its writers' audit timer covers it)."""
        pool = getattr(self.redis, "connection_pool", None)
        if pool is None or isinstance(self.redis, RedisCluster) or getattr(pool, "_oddsfeed_connects", None) is self:
            return
        make = pool.make_connection

        def make_connection() -> Any:
            conn = make()
            conn.register_connect_callback(self._connected)
            return conn

        setattr(pool, "make_connection", make_connection)
        setattr(pool, "_oddsfeed_connects", self)
        for conn in [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]:
            conn.register_connect_callback(self._connected)

    def _connected(self, conn: object) -> None:
        """redis-py's connect callback: one more (re)connection."""
        self.connects += 1

    async def ensure_epoch(self) -> str:
        """Load the epoch, creating it (and ``of:meta``) on an empty store, and
        make every partition carry it; returns it (also kept in :attr:`epoch`).

        ``of:epoch`` is what nodes compare and resume tokens carry; each
        partition's copy ``of:{p}:epoch`` is what the apply script checks. They
        converge whatever was lost (docs/architecture.md §79):

        - all in place and equal: adopted as they are (reads only);
        - an empty store: every partition epoch is set (NX) first, then
          ``of:epoch`` to the one they agree on, so a concurrent opener never
          finds ``of:epoch`` without its partitions' copies;
        - ``of:epoch`` lost alone (its Redis Cluster shard wiped, the key
          deleted) while every partition carries one same epoch: that epoch is
          adopted — a partition's epoch shares its hash slot, so its shard, with
          its data: the data is in place and clients keep their resume tokens;
        - partition epochs that disagree, or one missing (its shard's data may
          be gone): a NEW epoch, every partition's overwritten (plain SET), so
          every node reloads and every writer gets EpochChanged and re-images
          every market;
        - ``of:epoch`` in place and a partition's copy different: overwritten
          with it (its writers then re-image).

        ``of:epoch`` is only created with SET NX or swapped from the value just
        read, and each round re-reads everything, so concurrent openers settle
        on one epoch. Raises StoreError when the store was created with another
        partition count, or when the epochs have not settled after
        :data:`EPOCH_ROUNDS` rounds; redis-py's errors (RedisError, OSError)
        pass through (:meth:`open` and :meth:`reset_epoch` turn them into StoreError).
        Also starts counting the client's (re)connections (:attr:`connects`).
        """
        self._watch_connects()
        r = self.redis
        await r.hsetnx(META_KEY, "partitions", self.partitions)
        await r.hsetnx(META_KEY, "created_at", int(time.time() * 1000))
        stored = int(await r.hget(META_KEY, "partitions") or self.partitions)
        if stored != self.partitions:
            raise StoreError(f"store was created with {stored} partitions, not {self.partitions}")
        token: str | None = None  # the epoch this call made for an empty store
        for _ in range(EPOCH_ROUNDS):
            epoch, parts = await self._read_epochs()
            if epoch is not None and all(e == epoch for e in parts):
                self.epoch = epoch
                return epoch
            present = {e for e in parts if e is not None}
            if epoch is None and not present:  # an empty store: the partitions' copies first
                token = secrets.token_hex(8)
                for p in range(self.partitions):
                    await r.set(pepoch_key(p), token, nx=True)
                continue
            if epoch is None and len(present) == 1 and None not in parts:
                adopt = next(iter(present))
                if adopt != token:
                    logger.warning("the store epoch of:epoch is missing while every partition carries %s: "
                                   "adopting it", adopt)
                await r.set(EPOCH_KEY, adopt, nx=True)
                continue
            if epoch is None:
                logger.warning("the store epoch of:epoch is missing and the partitions' epochs disagree or are "
                               "missing (%s): a new epoch (every node reloads, every writer re-images)",
                               ", ".join(e or "-" for e in parts))
                await r.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
                epoch = reply_text_or_none(await r.get(EPOCH_KEY))
            elif None in parts:
                logger.warning("partition epochs missing under the store epoch %s (a shard lost its data?): "
                               "a new epoch (every node reloads, every writer re-images)", epoch)
                epoch = reply_text_or_none(await r.eval(EPOCH_SWAP_SCRIPT, 1, EPOCH_KEY, epoch,
                                                         secrets.token_hex(8)))
            if epoch is None:
                continue
            for p, e in enumerate(parts):
                if e != epoch:
                    await r.set(pepoch_key(p), epoch)
        raise StoreError(f"the store's epochs did not settle after {EPOCH_ROUNDS} rounds (concurrent resets?)")

    async def _read_epochs(self) -> tuple[str | None, list[str | None]]:
        """(``of:epoch``, each partition's ``of:{p}:epoch``) — None where missing —
        in one pipelined round trip. Raises RedisError/OSError."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(EPOCH_KEY)
        for p in range(self.partitions):
            pipe.get(pepoch_key(p))
        replies = await pipe.execute()
        return reply_text_or_none(replies[0]), [reply_text_or_none(v) for v in replies[1:]]

    async def current_epoch(self) -> str | None:
        """The epoch now in Redis (None when the store was wiped)."""
        return reply_text_or_none(await self.redis.get(EPOCH_KEY))

    async def partition_epochs(self) -> list[str | None]:
        """Each partition's ``of:{p}:epoch`` (None where missing), one round trip."""
        return (await self._read_epochs())[1]

    # -- writes --------------------------------------------------------------

    async def apply(self, deltas: Iterable[Delta], markets: Mapping[str, Market],
                    cursor: tuple[str, str] | None = None, *, rebase: Rebase | None = None,
                    writer: str | None = None) -> ApplyResult:
        """Atomically store a batch of deltas with the latest snapshot of each
        touched market (``markets[market_id]``), per partition; partition 0
        goes last and carries ``cursor`` = (source, value) so the cursor
        never runs ahead of the data it covers.

        Seq floor: a market the store does not hold (new, or pruned) must
        start above its partition's floor (the highest seq pruned there), or
        a client still holding the pruned market would drop it as old. Such a
        market's deltas are replaced by ``rebase(market_id, floor)`` — an image
        of its current state above the floor, snapshot included — and the
        partition is retried; :attr:`ApplyResult.rebased` lists them.

        ``writer``: whose mark the entries become (:attr:`ApplyResult.marks`, §81; an
        ingest names itself, one mark per running ingest); None: the batch's source when it
        has one, else no mark.

        Raises EpochChanged when Redis no longer holds this writer's epoch,
        SeqBelowFloor when a market is below the floor and ``rebase`` is not
        given (or gives no image above the floor), StoreError on any other
        Redis failure.
        """
        by_part: dict[int, dict[str, list[Delta]]] = {}
        P = self.partitions
        sources: set[str] = set()
        for d in deltas:
            sources.add(d.source)
            mid = d.market_id
            p = 0 if P == 1 else partition_of(mid, P)
            per_market = by_part.get(p)
            if per_market is None:
                per_market = by_part[p] = {}
            ds = per_market.get(mid)
            if ds is None:
                per_market[mid] = [d]
            else:
                ds.append(d)
        if cursor is not None:
            by_part.setdefault(0, {})
        if writer is None:  # (whose mark the entries become, §81: the batch's one source; none for a mixed batch)
            writer = next(iter(sources)) if len(sources) == 1 else ""
        entries: dict[int, str] = {}
        marks: dict[int, str] = {}
        kept = dropped = foreign = lost = 0
        kept_markets: set[str] = set()
        rebased: dict[str, Delta] = {}
        encode = ENCODER.encode
        for p in sorted(by_part, reverse=True):
            per_market = by_part[p]
            if p == 0 and cursor is not None:
                cursor_args = [cursor[0], cursor[1]]
            else:
                cursor_args = ["", ""]
            while True:
                keys = [seq_key(p), log_key(p), idx_key(p), pepoch_key(p),
                        CURSOR_KEY if p == 0 else f"of:{{{p}}}:cursor", owner_key(p), pt_key(p), floor_key(p),
                        writers_key(p)]
                args: list[bytes | str | int] = [self.epoch, self.log_maxlen, *cursor_args, len(per_market),
                                                 push_channel(p, self.db) if self.push else "", writer]
                for mid, ds in per_market.items():
                    keys.append(market_key(p, mid))
                    first, last = ds[0], ds[-1]
                    snapshot = markets[mid] if not rebased or mid not in rebased else rebased[mid].market
                    # the deltas as one JSON array without its brackets: their items joined by ","
                    args += [mid, encode(snapshot), first.seq, last.seq, encode(ds)[1:-1],
                             first.source, provider_ts(first), provider_ts(last),
                             "1" if first.kind == "image" else "0"]
                try:
                    res = await self._apply(keys=keys, args=args)
                    if reply_text(res[0]) == "FLOOR":
                        # markets new to the store at or below the partition's seq floor: nothing
                        # was written; re-image each above the floor and retry
                        floor = int(res[1])
                        for x in res[2]:
                            mid = reply_text(x)
                            image = rebase(mid, floor) if rebase is not None else None
                            if image is None or image.market is None or image.seq <= floor:
                                raise SeqBelowFloor(mid, floor)
                            per_market[mid] = [image]
                            rebased[mid] = image
                        continue
                    break
                except ResponseError as exc:
                    text = str(exc)
                    if text.startswith("EPOCH"):
                        raise EpochChanged(f"store epoch changed ({exc})") from None
                    if text.startswith("PARTIAL"):
                        _, mid, stored = text.split()
                        before = len(per_market[mid])
                        per_market[mid] = [d for d in per_market[mid] if d.seq > int(stored)]
                        dropped += before - len(per_market[mid])
                        continue
                    raise StoreError(f"apply failed: {exc}") from None
                except (RedisError, OSError) as exc:
                    raise StoreError(f"redis write failed: {exc}") from None
            entry = reply_text(res[0])
            if entry:
                entries[p] = entry
            kept += int(res[1])
            dropped += int(res[2])
            foreign += int(res[3])
            lost += int(res[4])
            if len(res) > 5:
                kept_markets.update(reply_text(x) for x in res[5])
            if writer and len(res) > 6:
                marks[p] = _mark_text(res[6])
        return ApplyResult(entries, kept, dropped, foreign, lost, kept_markets, rebased, marks)

    async def reset_epoch(self) -> str:
        """After EpochChanged (or ``of:epoch`` found missing or changed): adopt the
        epoch now in Redis, creating one, and make every partition carry it — a
        partition copy that differs is overwritten, so the writer's next apply
        passes the epoch check (:meth:`ensure_epoch`; the caller re-images its
        markets when the epoch moved). Returns the epoch. Raises StoreError when
        Redis fails meanwhile (it may be restarting empty) or the epochs do not settle."""
        try:
            return await self.ensure_epoch()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis failed while adopting the new epoch: {exc}") from None

    async def adopt_writer_marks(self, writer: str, partitions: Iterable[int], *, states: bool = False,
                                 newer_than_ms: int = 0) -> tuple[dict[int, str], str | None]:
        """§81 for a writer that has written nothing yet (a restarted ingest, before its first
        write — in a quiet partition that may be long; §88): its mark in each of ``partitions``
        (and, with ``states``, on the event-state log) becomes the log's newest entry id, in one
        script per log, so a store that goes back to before now lacks it and the writer's next
        mark check finds that. A mark the writer already has is kept; a log whose newest entry
        is older than ``newer_than_ms`` (ms since the epoch: what :meth:`prune_writer_marks`
        would drop) gets none. Returns ({partition: mark}, the event-state mark or None when not
        asked); "" where none was taken. Raises StoreError."""
        marks: dict[int, str] = {}
        try:
            for p in partitions:
                marks[p] = _mark_text(await self._adopt_mark(keys=[log_key(p), writers_key(p)],
                                                             args=[writer, newer_than_ms]))
            state = (_mark_text(await self._adopt_mark(keys=[ES_LOG_KEY, ES_WRITERS_KEY], args=[writer, newer_than_ms]))
                     if states else None)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return marks, state

    async def drop_writer_marks(self, writer: str, partitions: Iterable[int] | None = None, *,
                                states: bool = True) -> None:
        """Drop ``writer``'s marks in ``partitions`` (None: all) and, with ``states``, on the
        event-state log (an ingest stopping cleanly: a restart takes new ones; marks a restored
        ingest has no use for, §88). Raises StoreError."""
        parts = range(self.partitions) if partitions is None else partitions
        try:
            for key in [*(writers_key(p) for p in parts), *([ES_WRITERS_KEY] if states else [])]:
                await self.redis.hdel(key, writer)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None

    async def prune_writer_marks(self, older_than_ms: int) -> int:
        """Drop the writer marks (§81) whose newest entry is older than ``older_than_ms`` (ms since
        the Unix epoch): each running ingest keeps its own, so a restarted or retired one leaves one
        behind — bounded by this. A mark its writer moved meanwhile stays (dropped only at the value
        read). A quiet writer whose mark went is told the store lost it and audits everything once.
        Returns how many were dropped. Raises StoreError."""
        dropped = 0
        try:
            for key in [*(writers_key(p) for p in range(self.partitions)), ES_WRITERS_KEY]:
                stale: list[str] = []
                for field_, value in (await self.redis.hgetall(key)).items():
                    mark = _mark_text(value)
                    ms = mark.partition("-")[0]
                    if not ms.isdigit() or int(ms) < older_than_ms:
                        stale += [reply_text(field_), mark]
                if stale:
                    dropped += int(await self._drop_marks(keys=[key], args=stale))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return dropped

    async def set_health(self, health: SourceHealth) -> None:
        """Persist one source's health (and register the source)."""
        try:
            await self.redis.set(source_key(health.source), ENCODER.encode(health))
            await self.redis.sadd(SOURCES_KEY, health.source)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None

    async def quarantine(self, source: str, reason: str, detail: str, raw: bytes, at_ms: int) -> None:
        """Keep a rejected provider message (raw bytes capped at 4 KiB) with
        its reason, and count it per source and reason."""
        try:
            await self.redis.xadd(QUARANTINE_KEY, {
                "source": source, "reason": reason, "detail": detail[:500],
                "raw": raw[:QUARANTINE_RAW_MAX], "raw_len": len(raw), "at": at_ms,
            }, maxlen=QUARANTINE_MAXLEN, approximate=True)
            await self.redis.hincrby(QUARANTINE_COUNT_KEY, f"{source}:{reason}", 1)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None

    async def write_history(self, entries: Mapping[str, list[HistoryEntry]], retention_ms: int) -> int:
        """Append price-history entries ({market id: entries, oldest first}) to
        the markets' history streams: one script call per partition, all in one
        pipelined round trip. Returns the entries added. Raises StoreError."""
        by_p: dict[int, list[str]] = {}
        for mid in entries:
            by_p.setdefault(partition_of(mid, self.partitions), []).append(mid)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for p, mids in by_p.items():
                args: list[int | bytes] = [retention_ms]
                for mid in mids:
                    rows = entries[mid]
                    args.append(len(rows))
                    for t, r, q, d in rows:
                        args += [t, r, q, d]
                await self._history(keys=[history_key(p, mid) for mid in mids], args=args, client=pipe)
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"history write failed: {exc}") from None
        return sum(int(x) for x in replies)

    async def history_range(self, market_id: str, start: str, end: str, *, count: int,
                            reverse: bool = False) -> list[tuple[str, dict[bytes, bytes]]]:
        """Entries of a market's history stream between stream ids ``start`` and
        ``end`` (XRANGE syntax: "-", "+", "<ms>", "(<id>"), at most ``count``;
        with ``reverse`` newest first (then ``start`` is the upper bound).
        Raises StoreError."""
        key = history_key(partition_of(market_id, self.partitions), market_id)
        try:
            if reverse:
                rows = await self.redis.xrevrange(key, max=start, min=end, count=count)
            else:
                rows = await self.redis.xrange(key, min=start, max=end, count=count)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return reply_entries(rows)

    async def history_bytes(self, market_id: str) -> int | None:
        """MEMORY USAGE of a market's history stream (None when it has none)."""
        key = history_key(partition_of(market_id, self.partitions), market_id)
        v = await self.redis.memory_usage(key, samples=0)
        return None if v is None else int(v)

    # -- price history export (feed.history_export) ---------------------------------------------

    async def history_markets(self) -> list[str]:
        """Ids of every market that has a price-history stream, sorted — also
        markets whose snapshot is gone (closed markets are dropped before
        their history expires). One ``SCAN … TYPE stream`` over the keyspace
        (every primary on Redis Cluster). Raises StoreError."""
        found: set[str] = set()
        try:
            async for key in self.redis.scan_iter(match="of:{*}:h:*", count=1000, _type="stream"):
                k = reply_text(key)
                tag_end = k.find("}:h:")
                if tag_end > 4 and k[4:tag_end].isdigit():
                    found.add(k[tag_end + 4:])
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return sorted(found)

    # -- event states (feed.models.EventState) -----------------------------------------------

    async def apply_event_states(self, states: Iterable[EventState], *, writer: str | None = None) -> EventStateResult:
        """Store event states (each a whole state with its version) in one
        script call: the latest per event in ``of:{es}:state``, the kept ones
        appended to ``of:{es}:log`` as one entry. A state whose version is not
        above the stored one, or whose provider time is older, is dropped; one
        for an event another source owns is dropped as foreign. Raises
        StoreError."""
        args: list[bytes | str | int] = [self.log_maxlen, 0, ""]
        n = 0
        encode = ENCODER.encode
        sources: set[str] = set()
        for es in states:
            args += [es.event_id, encode(es), es.version, es.provider_ts, es.source]
            sources.add(es.source)
            n += 1
        if not n:
            return EventStateResult("", 0, 0, 0)
        args[1] = n
        if writer is None:  # (whose mark the entry becomes, §81: as Store.apply)
            writer = next(iter(sources)) if len(sources) == 1 else ""
        args[2] = writer
        try:
            res = await self._event_states(keys=_ES_KEYS, args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return EventStateResult(reply_text(res[0]), int(res[1]), int(res[2]), int(res[3]),
                                _mark_text(res[4]) if writer and len(res) > 4 else None)

    async def load_event_states(self, source: str | None = None) -> list[EventState]:
        """Every stored event state (of ``source`` only, when given). Raises StoreError."""
        try:
            raw = await self.redis.hgetall(ES_STATE_KEY)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        out = []
        for key, v in raw.items():
            try:
                es = EVENT_STATE_DECODER.decode(v)
            except msgspec.MsgspecError as exc:  # one bad record must not hide every other event's state
                logger.error("stored event state %r is undecodable (%s); skipped", reply_text(key), exc)
                continue
            if source is None or es.source == source:
                out.append(es)
        return out

    async def get_event_states(self, event_ids: Iterable[str]) -> dict[str, EventState]:
        """The stored states of ``event_ids`` (those that have one). Raises StoreError."""
        ids = list(event_ids)
        if not ids:
            return {}
        try:
            values = await self.redis.hmget(ES_STATE_KEY, ids)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return {eid: EVENT_STATE_DECODER.decode(v) for eid, v in zip(ids, values, strict=True) if v is not None}

    async def event_state_log_bounds(self) -> tuple[str | None, str]:
        """(id of the oldest retained entry of ``of:{es}:log`` or None when it
        is empty, id of the newest or ``"0-0"``). Raises StoreError."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrange(ES_LOG_KEY, count=1)
            pipe.xrevrange(ES_LOG_KEY, count=1)
            first, last = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return (reply_text(first[0][0]) if first else None), (reply_text(last[0][0]) if last else "0-0")

    async def event_state_log_head(self) -> str:
        """The id of the newest entry of ``of:{es}:log`` (``"0-0"`` when it is
        empty): read by a node after the source health records, it vouches for
        a record's event states once its tail has read that far. Raises StoreError."""
        try:
            last = await self.redis.xrevrange(ES_LOG_KEY, count=1)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return reply_text(last[0][0]) if last else "0-0"

    async def event_state_log_has(self, entry_id: str) -> bool:
        """Whether ``of:{es}:log`` still holds entry ``entry_id``. Raises StoreError."""
        try:
            return bool(await self.redis.xrange(ES_LOG_KEY, min=entry_id, max=entry_id, count=1))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None

    async def read_event_state_log(self, after: str, *, block_ms: int | None = None,
                                   count: int = 1000) -> list[tuple[str, list[EventState]]]:
        """Entries of ``of:{es}:log`` after entry id ``after``, oldest first:
        [(entry id, states)]; ``block_ms`` waits for the first (XREAD BLOCK).
        Raises StoreError (also for an entry that does not decode)."""
        try:
            res = await self.redis.xread({ES_LOG_KEY: after}, count=count, block=block_ms)
            out: list[tuple[str, list[EventState]]] = []
            for _, rows in reply_streams(res):
                for entry_id, fields in rows:
                    out.append((entry_id, EVENT_STATES_DECODER.decode(fields[b"d"])))
        except (RedisError, OSError, msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
            raise StoreError(f"redis read of the event-state log failed: {exc}") from None
        return out

    async def prune_event_states(self, states: Iterable[tuple[str, int]]) -> list[str]:
        """Drop stored event states — ``(event id, version)`` pairs, each only
        if its stored version is still that one (a newer state wins). Returns
        the ids dropped. Raises StoreError."""
        args: list[str | int] = []
        for eid, version in states:
            args += [eid, version]
        if not args:
            return []
        try:
            res = await self._prune_states(keys=_ES_KEYS[:4], args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return [reply_text(x) for x in res]

    # -- reads ---------------------------------------------------------------

    async def load_cursor(self, source: str) -> str | None:
        return reply_text_or_none(await self.redis.hget(CURSOR_KEY, source))

    async def last_log_id(self, p: int) -> str:
        """Id of the newest log entry of partition p ("0-0" when empty)."""
        rows = reply_entries(await self.redis.xrevrange(log_key(p), count=1))
        return rows[0][0] if rows else "0-0"

    async def first_log_id(self, p: int) -> str | None:
        """Id of the oldest retained log entry of partition p (None when empty)."""
        rows = reply_entries(await self.redis.xrange(log_key(p), count=1))
        return rows[0][0] if rows else None

    async def load_markets(self, p: int) -> list[Market]:
        """Every stored snapshot of partition p."""
        ids = [reply_text(m) for m in await self.redis.smembers(idx_key(p))]
        out: list[Market] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            values = await self.redis.mget([market_key(p, mid) for mid in chunk])
            out.extend(MARKET_DECODER.decode(v) for v in values if v is not None)
        return out

    async def load_all_markets(self) -> list[Market]:
        out: list[Market] = []
        for p in range(self.partitions):
            out.extend(await self.load_markets(p))
        return out

    async def get_market(self, market_id: str) -> Market | None:
        value = await self.redis.get(market_key(partition_of(market_id, self.partitions), market_id))
        return MARKET_DECODER.decode(value) if value is not None else None

    async def read_log(self, positions: dict[int, str], *, block_ms: int | None = None,
                       count: int = 1000) -> list[tuple[int, str, list[Delta]]]:
        """Log entries after ``positions`` ({partition: entry id}), oldest
        first: [(partition, entry id, deltas)]. ``block_ms`` waits (XREAD BLOCK)."""
        streams: dict[KeyT, StreamIdT] = {log_key(p): pos for p, pos in positions.items()}
        res = await self.redis.xread(streams, count=count, block=block_ms)
        out: list[tuple[int, str, list[Delta]]] = []
        for k, rows in reply_streams(res):
            p = int(k[k.index("{") + 1:k.index("}")])
            for entry_id, fields in rows:
                out.append((p, entry_id, DELTAS_DECODER.decode(fields[b"d"])))
        return out

    def tail(self, p: int) -> "LogTail":
        """A :class:`LogTail` following partition ``p``'s log (close it with ``aclose()``)."""
        return LogTail(self, p)

    def event_state_tail(self) -> "StreamTail":
        """A :class:`StreamTail` following the event-state log (``read_entries`` gives
        ``[(entry id, [EventState…])]``; close it with ``aclose()``)."""
        return StreamTail(self, ES_LOG_KEY, EVENT_STATES_DECODER)

    async def log_range(self, p: int, after: str, *, count: int | None = None) -> list[tuple[str, list[Delta]]]:
        """Log entries of partition p strictly after entry id ``after``."""
        rows = await self.redis.xrange(log_key(p), min=f"({after}" if after != "0-0" else "-", count=count)
        return [(i, DELTAS_DECODER.decode(f[b"d"])) for i, f in reply_entries(rows)]

    async def get_health(self, source: str) -> SourceHealth | None:
        """The stored health record of ``source`` (None when there is none)."""
        v = await self.redis.get(source_key(source))
        return HEALTH_DECODER.decode(v) if v is not None else None

    async def prune(self, markets: Iterable[tuple[str, int]], chunk: int = 500) -> list[str]:
        """Drop closed markets an ingest forgot (:meth:`feed.book.Book.prune_closed`):
        ``(market_id, seq)`` pairs; each goes (snapshot, index, seq, owner and
        provider-time entries) only if its stored seq is still ``seq``, and
        raises its partition's seq floor to that seq in the same script call
        (a re-created market must start above it: :meth:`apply`). Returns
        the ids dropped. Raises RedisError."""
        by_p: dict[int, list[tuple[str, int]]] = {}
        for mid, seq in markets:
            by_p.setdefault(partition_of(mid, self.partitions), []).append((mid, seq))
        out: list[str] = []
        for p, items in by_p.items():
            for i in range(0, len(items), chunk):
                part = items[i:i + chunk]
                keys = [seq_key(p), idx_key(p), owner_key(p), pt_key(p), floor_key(p),
                        *(market_key(p, mid) for mid, _ in part)]
                args: list[str] = []
                for mid, seq in part:
                    args += [mid, str(seq)]
                res = await self._prune(keys=keys, args=args)
                out += [reply_text(x) for x in res]
        return out

    async def seq_floor(self) -> int:
        """The highest seq floor of all partitions (0: nothing pruned yet): a
        writer that starts every market new to it above this one never needs a
        rebase (:meth:`apply`). Raises StoreError."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.get(floor_key(p))
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return max((int(v) for v in replies if v is not None), default=0)

    async def stored_marks(self, market_ids: Iterable[str], event_ids: Iterable[str] = (), *,
                           writer: str = "", marks: Iterable[int] = (), state_mark: bool = False,
                           chunk: int = 1000) -> StoredMarks:
        """The epoch now in Redis and, for each of ``market_ids``, its stored seq,
        owner and provider time, and for each of ``event_ids`` its stored event
        state's version, owner and provider time (:class:`StoredMarks`) — what a
        writer compares with its book and held event states to find what the
        store lost acknowledged writes of (docs/architecture.md §79) — and
        ``writer``'s mark in each partition of ``marks`` and, with
        ``state_mark``, on the event-state log (:attr:`ApplyResult.marks`: a
        mark older than the writer knows it added means the store went back in
        time, §81). One pipelined round trip: a GET of ``of:epoch``, per
        partition HMGETs of the seq, owner and provider-time hashes, HMGETs of
        the event states' version, owner and provider-time hashes
        (``of:{es}:v``, ``:owner``, ``:pt``), ``chunk`` ids per command, and an
        HGET per mark asked for. Read only. Raises StoreError."""
        by_p: dict[int, list[str]] = {}
        for mid in market_ids:
            by_p.setdefault(partition_of(mid, self.partitions), []).append(mid)
        eids = list(event_ids)
        parts: list[list[str]] = []
        eparts: list[list[str]] = []
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(EPOCH_KEY)
            for p, mids in by_p.items():
                for i in range(0, len(mids), chunk):
                    part = mids[i:i + chunk]
                    pipe.hmget(seq_key(p), part)
                    pipe.hmget(owner_key(p), part)
                    pipe.hmget(pt_key(p), part)
                    parts.append(part)
            for i in range(0, len(eids), chunk):
                part = eids[i:i + chunk]
                pipe.hmget(ES_VERSION_KEY, part)
                pipe.hmget(ES_OWNER_KEY, part)
                pipe.hmget(ES_PT_KEY, part)
                eparts.append(part)
            logs = list(marks) if writer else []
            state_mark = state_mark and bool(writer)
            for p in logs:
                pipe.hget(writers_key(p), writer)
            if state_mark:
                pipe.hget(ES_WRITERS_KEY, writer)
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        tail = len(replies) - len(logs) - (1 if state_mark else 0)
        newest = [_mark_text(v) for v in replies[tail:]]
        k = 1
        out: list[dict[str, tuple[int, str | None, int]]] = []
        for chunks in (parts, eparts):
            got: dict[str, tuple[int, str | None, int]] = {}
            for part in chunks:
                nums, owners, pts = replies[k], replies[k + 1], replies[k + 2]
                k += 3
                for key, n, o, t in zip(part, nums, owners, pts, strict=True):
                    got[key] = (int(n) if n is not None else 0, reply_text_or_none(o), int(t) if t is not None else 0)
            out.append(got)
        return StoredMarks(reply_text_or_none(replies[0]), out[0], out[1], dict(zip(logs, newest)),
                           newest[-1] if state_mark else None)

    async def sources(self) -> list[SourceHealth]:
        names = sorted(reply_text(n) for n in await self.redis.smembers(SOURCES_KEY))
        out = []
        for name in names:
            v = await self.redis.get(source_key(name))
            if v is not None:
                out.append(HEALTH_DECODER.decode(v))
        return out

    async def log_heads(self) -> list[str]:
        """The id of the newest entry of each partition's delta log (``"0-0"``
        when empty), in partition order. Raises StoreError."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.xrevrange(log_key(p), count=1)
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return [reply_text(r[0][0]) if r else "0-0" for r in replies]

    # -- event records and links (feed.matching / feed.linker) --------------------------------

    async def register_events(self, records: Mapping[str, bytes], seen_ms: int) -> None:
        """Store new or changed event records (record id → msgspec JSON of
        :class:`feed.matching.EventRecord`) with their first-seen time
        ``seen_ms`` (kept from the first registration) and bump the events
        version, in one transaction. Raises StoreError."""
        if not records:
            return
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(EVENTS_KEY, mapping=dict[KeyT, bytes](records))  # type: ignore[arg-type]
            for rid in records:
                pipe.hsetnx(EVENTS_SEEN_KEY, rid, seen_ms)
            pipe.incr(EVENTS_VER_KEY)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None

    async def events_version(self) -> int:
        """The events version (0: none registered). Raises StoreError."""
        try:
            v = await self.redis.get(EVENTS_VER_KEY)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return int(v) if v is not None else 0

    async def load_events(self) -> list[tuple[int, str, bytes]]:
        """Every event record: [(first seen ms, record id, JSON)], first seen
        first. Raises StoreError."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(EVENTS_KEY)
            pipe.hgetall(EVENTS_SEEN_KEY)
            records, seen = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        first = {reply_text(k): int(v) for k, v in seen.items()}
        out = [(first.get(reply_text(k), 0), reply_text(k), bytes(v)) for k, v in records.items()]
        out.sort()
        return out

    async def save_links(self, links: Mapping[str, StoredLink], canon: Mapping[str, bytes],
                         owner: str | None = None) -> int:
        """Replace every link (record id → :class:`StoredLink`) and canonical
        event summary (canonical id → JSON) at once; bumps and returns the
        links version. With ``owner`` (the linker's lease owner), only while
        that owner holds the linker lease (:meth:`take_lease`): otherwise
        nothing is written and -1 is returned. Raises StoreError."""
        try:
            if owner is not None:
                args: list[str | bytes] = [owner, str(len(links))]
                for k, v in links.items():
                    args += (k, ENCODER.encode(v))
                for k, c in canon.items():
                    args += (k, c)
                return int(await self._save_links(keys=[LINK_LEASE_KEY, LINKS_KEY, CANON_KEY, LINKS_VER_KEY],
                                                  args=args))
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(LINKS_KEY, CANON_KEY)
            if links:
                pipe.hset(LINKS_KEY, mapping={k: ENCODER.encode(v) for k, v in links.items()})
            if canon:
                pipe.hset(CANON_KEY, mapping=dict[KeyT, bytes](canon))  # type: ignore[arg-type]
            pipe.incr(LINKS_VER_KEY)
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return int(replies[-1])

    async def links_version(self) -> int:
        """The links version (0: never written). Raises StoreError."""
        try:
            v = await self.redis.get(LINKS_VER_KEY)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return int(v) if v is not None else 0

    async def load_links(self) -> tuple[int, dict[str, StoredLink], dict[str, bytes]]:
        """(links version, record id → link, canonical id → summary JSON), read
        in one transaction. Raises StoreError."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.get(LINKS_VER_KEY)
            pipe.hgetall(LINKS_KEY)
            pipe.hgetall(CANON_KEY)
            ver, links, canon = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from None
        return (int(ver) if ver is not None else 0,
                {reply_text(k): _LINK_DECODER.decode(v) for k, v in links.items()},
                {reply_text(k): bytes(v) for k, v in canon.items()})

    async def take_lease(self, owner: str, ttl_ms: int) -> bool:
        """Take or renew the linker lease for ``owner`` for ``ttl_ms``; False
        while another owner holds it. Raises StoreError."""
        try:
            got = await self._lease(keys=[LINK_LEASE_KEY], args=[owner, ttl_ms])
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from None
        return bool(got)

    async def quarantine_counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: count}} of rejected messages."""
        raw = await self.redis.hgetall(QUARANTINE_COUNT_KEY)
        out: dict[str, dict[str, int]] = {}
        for k, v in raw.items():
            source, _, reason = reply_text(k).rpartition(":")
            out.setdefault(source, {})[reason] = int(v)
        return out

    async def quarantined(self, count: int = 100) -> list[dict[str, object]]:
        """The newest quarantined messages, newest first."""
        rows = reply_entries(await self.redis.xrevrange(QUARANTINE_KEY, count=count))
        return [{"id": i, **{reply_text(k): (v if k == b"raw" else reply_text(v)) for k, v in f.items()}}
                for i, f in rows]


@dataclass(frozen=True, slots=True)
class LogCheck:
    """What guards a reader of one partition's log, read in one round trip.

    epoch: ``of:epoch`` (None: the store was wiped); partition_epoch:
    ``of:{p}:epoch`` (None: missing); first_id: id of the oldest retained
    log entry (None: the log is empty or gone); last_id: id of the newest
    (None: empty or gone) — a reader whose position is past it applied an entry
    the log does not hold (a forged push, or Redis went back under the same epoch).
    """

    epoch: str | None
    partition_epoch: str | None
    first_id: str | None
    last_id: str | None = None


LogEntries = list[tuple[str, list[Delta]]]
"""Log entries of one partition, oldest first: [(entry id, deltas)]."""


class _RespProtocol(asyncio.Protocol):
    """The socket side of :class:`RespConnection`: replies parsed by ``hiredis.Reader`` as they
    arrive, handed to the one waiting reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader = hiredis.Reader()
        self.replies: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        #: loop time by which the awaited reply must be in; one lazy timer enforces it (see arm())
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def arm(self, deadline: float) -> None:
        """The next awaited reply must arrive by loop time ``deadline``. One timer per
        connection, not one per read: it is (re)scheduled only when none is pending or the
        pending one is later than ``deadline``; when it fires early (the deadline moved on)
        it goes back to sleep until the current one — a read that answers in a millisecond
        costs no timer."""
        self.deadline = deadline
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nothing awaited: the next arm() schedules again
        if self.loop.time() >= self.deadline:
            self._expired(waiter)
        else:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _expired(self, waiter: "asyncio.Future[None]") -> None:
        """The deadline passed with ``waiter`` still waiting."""
        waiter.set_exception(TimeoutError("no reply from redis within the deadline"))

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def wait_reply(self) -> None:
        """Until a reply is held (raises the connection's loss, or what the deadline sets)."""
        while not self.replies:
            if self.lost is not None:
                raise self.lost
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def pop_reply(self) -> Any:
        """The oldest held reply; an error reply raises ``ResponseError``."""
        reply = self.replies.popleft()
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            self.replies.append(reply)
        if self.replies and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("redis closed the connection")
        self.disarm()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)


class RespConnection:
    """A bare RESP2 connection for the log tails' hot path: what they use of redis-py's
    connection (``pack_command``, ``pack_commands``, ``send_packed_command``,
    ``read_response``, ``disconnect``), without its per-command layers, plus
    :meth:`reply` — the next reply under a deadline kept by one lazy timer per connection.
    A read round trip costs the node ~27–31 µs of CPU instead of ~50–57 through redis-py
    (``benchmarks/xread_path.py``).

    Built from a plain ``redis://`` or ``unix://`` pool's connection kwargs (host/port or
    path, username/password → ``AUTH``, db → ``SELECT``, ``socket_connect_timeout``);
    :meth:`for_pool` gives None for anything else (TLS, RESP3, credential providers),
    which then keeps redis-py's connection. Connects on the first send; after
    :meth:`disconnect` the next send connects again. An error reply raises
    ``redis.exceptions.ResponseError``; a lost connection ``ConnectionError``.
    """

    _PLAIN = ("Connection", "UnixDomainSocketConnection")
    _KNOWN = frozenset({"host", "port", "path", "username", "password", "db", "socket_timeout",
                        "socket_connect_timeout", "retry", "orig_host_address", "orig_socket_timeout",
                        "orig_socket_connect_timeout", "himport_registry", "maint_notifications_pool_handler",
                        "maint_notifications_config", "encoder_class", "health_check_interval"})

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self._transport: asyncio.Transport | None = None
        self._proto: _RespProtocol | None = None

    @classmethod
    def for_pool(cls, pool: aioredis.ConnectionPool, kwargs: dict[str, Any]) -> "RespConnection | None":
        if pool.connection_class.__name__ not in cls._PLAIN or set(kwargs) - cls._KNOWN:
            return None
        if kwargs.get("protocol") not in (None, 2, "2"):
            return None
        return cls(kwargs)

    @staticmethod
    def pack_command(*args: Any) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def pack_commands(self, commands: Iterable[Sequence[Any]]) -> bytes:
        return b"".join(self.pack_command(*c) for c in commands)

    async def send_packed_command(self, data: bytes | list[bytes]) -> None:
        if self._transport is None or self._transport.is_closing():
            await self._connect()
        assert self._transport is not None
        self._transport.write(data if isinstance(data, bytes) else b"".join(data))

    async def read_response(self, disable_decoding: bool = True) -> Any:
        """The next reply, with no deadline of its own (the caller keeps one: ``_connect``
        wraps its AUTH / SELECT in ``asyncio.timeout``). Raises as :meth:`reply`."""
        return await self._next(None)

    async def reply(self, timeout_s: float) -> Any:
        """The next reply within ``timeout_s`` seconds: raises TimeoutError after it (the
        caller then drops the connection: the late reply must never be taken for the next
        command's), ``ResponseError`` for an error reply, ``ConnectionError`` when the
        connection is gone. The deadline is kept by the connection's one lazy timer
        (:meth:`_RespProtocol.arm`), not an ``asyncio.timeout`` per read."""
        return await self._next(timeout_s)

    async def _next(self, timeout_s: float | None) -> Any:
        proto = self._proto
        if proto is None:
            raise ConnectionError("not connected")
        if not proto.replies:
            if proto.lost is not None:
                raise proto.lost
            if timeout_s is None:
                proto.disarm()  # a timer left from an earlier read must not end this wait
            else:
                proto.arm(proto.loop.time() + timeout_s)
            await proto.wait_reply()
        return proto.pop_reply()

    async def disconnect(self, nowait: bool = False) -> None:
        transport, proto = self._transport, self._proto
        self._transport = self._proto = None
        if proto is not None:
            proto.disarm()
        if transport is not None:
            transport.abort()

    async def _connect(self) -> None:
        kw = self.kwargs
        loop = asyncio.get_running_loop()
        timeout = kw.get("socket_connect_timeout") or kw.get("socket_timeout") or 5.0
        proto = _RespProtocol(loop)
        async with asyncio.timeout(timeout):
            if kw.get("path"):
                transport, _ = await loop.create_unix_connection(lambda: proto, kw["path"])
            else:
                transport, _ = await loop.create_connection(lambda: proto, kw.get("host") or "localhost",
                                                            int(kw.get("port") or 6379))
        self._transport, self._proto = transport, proto
        try:
            setup: list[tuple[Any, ...]] = []
            if kw.get("password"):
                setup.append(("AUTH", kw["username"], kw["password"]) if kw.get("username")
                             else ("AUTH", kw["password"]))
            if kw.get("db"):
                setup.append(("SELECT", kw["db"]))
            if setup:
                transport.write(self.pack_commands(setup))
                async with asyncio.timeout(timeout):
                    for _ in setup:
                        await self.read_response()
        except BaseException:
            await self.disconnect()
            raise


def _id_key(entry_id: str) -> tuple[int, int]:
    """A stream id ``<ms>-<n>`` as a comparable pair."""
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


class LogPush(_RespProtocol):
    """The subscriber side of one partition's pushed log: ``SUBSCRIBE`` to the channel the
    apply script PUBLISHes every new entry on (``"<epoch> <previous id> <id> <deltas JSON>"``,
    see ``APPLY_SCRIPT``), on a connection of its own, messages parsed by ``hiredis.Reader``
    as they arrive and held raw until :meth:`take`.

    Pub/sub delivers at most once, so a pushed entry is only ever a shortcut: :meth:`take`
    hands out entries only while each one's epoch is the reader's and its previous id is the
    reader's position — an unbroken chain from what the reader holds. Anything else (a
    message lost or a connection dropped, the store reset, the buffer overflowing) is a gap:
    the buffer is cleared and the caller reads the log itself (XREAD), which holds every
    entry. Nothing is waited on but the next message: the deadline of :meth:`wait` is kept by
    the lazy timer of :class:`_RespProtocol` (its expiry wakes the waiter instead of failing it).
    """

    #: entries / bytes held before the buffer is dropped as a gap (the reader then reads the log)
    MAX_ENTRIES = 20_000
    MAX_BYTES = 16 << 20

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: bytes) -> None:
        super().__init__(loop)
        self.channel = channel
        self.entries: collections.deque[bytes] = collections.deque()
        self.nbytes = 0  # of the entries held
        self.transport: asyncio.Transport | None = None
        self.live = False  # subscribed, and the connection is up
        self.overflow = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        entries = self.entries
        while (msg := reader.gets()) is not False:
            if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                entries.append(msg[2])
                self.nbytes += len(msg[2])
            else:  # AUTH / SUBSCRIBE replies
                if type(msg) is list and msg and msg[0] == b"subscribe":
                    self.live = True
                self.replies.append(msg)
        if len(entries) > self.MAX_ENTRIES or self.nbytes > self.MAX_BYTES:
            entries.clear()
            self.nbytes = 0
            self.overflow = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.live = False
        self.lost = exc or ConnectionError("redis closed the connection")
        self.entries.clear()
        self.nbytes = 0
        self.disarm()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expired(self, waiter: "asyncio.Future[None]") -> None:
        waiter.set_result(None)  # nothing pushed within the wait: the reader reads the log

    async def wait(self, timeout_s: float) -> None:
        """Until a message arrives, the connection is lost or ``timeout_s`` s pass."""
        if self.entries or not self.live or self.overflow:
            return
        self.arm(self.loop.time() + timeout_s)
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def _reply(self, timeout_s: float) -> Any:
        async with asyncio.timeout(timeout_s):
            await self.wait_reply()
        return self.pop_reply()

    def take(self, epoch: bytes, after: str, count: int) -> list[tuple[str, bytes]] | None:
        """The held entries that continue the chain from position ``after`` in ``epoch``
        (at most ``count``, oldest first, as ``(entry id, deltas JSON)``; entries at or
        before ``after`` are dropped as already read), or None for a gap anywhere in what
        is held: then the buffer is cleared and the caller must read the log from ``after``
        (every entry whose message was cleared is in the log by then)."""
        if not self.live or self.overflow:
            self.overflow = False
            self.entries.clear()
            self.nbytes = 0
            return None
        entries = self.entries
        out: list[tuple[str, bytes]] = []
        pos = after
        pos_key: tuple[int, int] | None = None
        while entries and len(out) < count:
            try:
                e, prev, eid, payload = entries[0].split(b" ", 3)
                entry_id = eid.decode()
                if e == epoch and prev.decode() == pos:
                    self.nbytes -= len(entries.popleft())
                    out.append((entry_id, payload))
                    pos, pos_key = entry_id, None
                    continue
                if pos_key is None:
                    pos_key = _id_key(pos)
                if e == epoch and _id_key(entry_id) <= pos_key:
                    self.nbytes -= len(entries.popleft())  # read already (through the log, before this came)
                    continue
            except ValueError:  # not a message of ours: a gap like any other (never a failure)
                pass
            entries.clear()
            self.nbytes = 0  # a gap: what came before it is read again from the log with the rest
            return None
        return out

    def close(self) -> None:
        self.live = False
        self.disarm()
        if self.transport is not None:
            self.transport.abort()


class StreamTail:
    """Follows one Redis stream with ``XREAD BLOCK`` on a connection of its own
    (see :class:`LogTail`, which adds the delta log's guards): each entry's
    ``d`` field decoded once with ``decoder``; every reply awaited with a
    deadline; a cancel, timeout or error drops the connection (the next call
    opens a new one), so a cancelled blocking read never leaves a reply behind
    or holds a pooled connection. Raises RedisError/OSError, StoreError on an
    unexpected reply, msgspec.DecodeError/ValidationError on an undecodable entry."""

    def __init__(self, store: "Store", key: str, decoder: Any) -> None:
        self.store = store
        self.key = key
        self._decode = decoder.decode
        r = store.redis
        self._pool: aioredis.ConnectionPool | None = None
        self._conn: aioredis.connection.AbstractConnection | None = None
        self.timeout_s = 5.0
        if not isinstance(r, RedisCluster):
            pool = r.connection_pool
            kwargs = dict(pool.connection_kwargs)
            self.timeout_s = float(kwargs.get("socket_timeout") or 5.0)
            kwargs["socket_timeout"] = None
            kwargs.pop("orig_socket_timeout", None)
            kwargs["retry"] = Retry(NoBackoff(), 0)  # the caller backs off (with jitter) and reports
            self._pool = aioredis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
            # the hot path's connection: a bare RESP one where the URL allows (else redis-py's)
            self._conn = RespConnection.for_pool(pool, dict(pool.connection_kwargs))  # type: ignore[assignment]
        self._xread_for: tuple[int, int | None] | None = None
        self._xread_head = b""

    def _xread(self, after: str, block_ms: int | None, count: int) -> bytes:
        """``XREAD COUNT count [BLOCK block_ms] STREAMS key after``, packed (RESP; no BLOCK
        when ``block_ms`` is None); all but ``after`` packed once per (count, block_ms)."""
        if self._xread_for != (count, block_ms):
            self._xread_for = (count, block_ms)
            # the command's first arguments packed under a header for all of them and the position
            head: tuple[Any, ...] = (("XREAD", "COUNT", count, "STREAMS", self.key) if block_ms is None
                                     else ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", self.key))
            self._xread_head = b"*%d\r\n" % (len(head) + 1) + RespConnection.pack_command(*head).partition(b"\r\n")[2]
        a = after.encode()
        return b"%s$%d\r\n%s\r\n" % (self._xread_head, len(a), a)

    async def aclose(self) -> None:
        """Drop the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if isinstance(conn, RespConnection):
            await conn.disconnect()
        if self._pool is not None:
            await self._pool.disconnect()

    async def read_entries(self, after: str, *, block_ms: int, count: int) -> list[tuple[str, Any]]:
        """Entries after id ``after`` (at most ``count``; waits up to ``block_ms`` ms for the first)."""
        if self._pool is None:
            return self._entries(await self.store.redis.xread({self.key: after}, count=count, block=block_ms))
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command(self._xread(after, block_ms, count))
            return self._entries(await _reply(conn, max(self.timeout_s, block_ms / 1000 + 1.0)))
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    def _entries(self, res: object) -> list[tuple[str, Any]]:
        """An XREAD reply (raw or through redis-py's callback; RESP2 or 3) → entries, each decoded once."""
        if res is None:
            return []
        if isinstance(res, dict):  # RESP3: {key: rows}
            streams = list(res.values())
        elif isinstance(res, list):  # RESP2: [[key, rows]]
            streams = [pair[1] for pair in res]
        else:
            raise StoreError(f"unexpected redis XREAD reply {res!r:.80}")
        decode = self._decode
        out: list[tuple[str, Any]] = []
        for rows in streams:
            for entry_id, fields in rows:
                if isinstance(fields, list) and len(fields) == 2 and fields[0] == b"d":
                    payload = fields[1]
                elif isinstance(fields, dict):  # parsed by redis-py
                    payload = fields[b"d"]
                else:
                    raise StoreError(f"unexpected redis stream entry {fields!r:.80}")
                out.append((reply_text(entry_id), decode(payload)))
        return out


class LogTail(StreamTail):
    """Follows one partition's delta log: new entries from the pushed log
    (:class:`LogPush`, see :meth:`read`) or ``XREAD [BLOCK]``, and, on request,
    the guards (:class:`LogCheck`) in the same round trip as an XREAD, or the
    guards alone.

    On a plain Redis it holds a connection of its own (XREAD BLOCK holds one) —
    a bare :class:`RespConnection` where the URL allows, else redis-py's —
    and talks to it directly: one command, or one pipelined write of five, per
    call, replies parsed once (no redis-py response callbacks, no per-entry
    field dicts) and each entry's payload decoded once into
    :class:`~feed.models.Delta`. The connection has no socket timeout of its
    own (redis-py would wrap every send in ``asyncio.wait_for``, a task per
    call): every reply is awaited with a deadline instead — the client's
    socket timeout, or ``block_ms`` + 1 s when longer — and one call is in
    flight at a time, so a send cannot fill the socket buffer and stall. On Redis Cluster it goes through the
    shared client. Not safe for concurrent use; raises RedisError/OSError
    (the connection is then dropped and re-opened by the next call),
    StoreError on an unexpected reply, msgspec.DecodeError/ValidationError on
    an undecodable entry.
    """

    #: longest wait between two tries of a failing pushed log, s
    PUSH_BACKOFF_MAX_S = 30.0
    #: a subscription delivering this long after it was made resets the backoff, s
    PUSH_TRUSTED_AFTER_S = 30.0

    def __init__(self, store: Store, p: int) -> None:
        super().__init__(store, log_key(p), DELTAS_DECODER)
        self.partition = p
        self._pepoch_key = pepoch_key(p)
        self._check_cmd = (("GET", EPOCH_KEY), ("GET", self._pepoch_key), ("XRANGE", self.key, "-", "+", "COUNT", 1),
                           ("XREVRANGE", self.key, "+", "-", "COUNT", 1))
        self._check_packed = b"".join(RespConnection.pack_command(*c) for c in self._check_cmd)
        #: the pushed log (a plain Redis with a bare connection only; see :meth:`read`)
        self._push: LogPush | None = None
        self._push_kwargs: dict[str, Any] | None = (
            self._conn.kwargs if isinstance(self._conn, RespConnection) and store.push else None)
        self._push_retry_at = 0.0
        self._push_backoff_s = 0.0
        self._push_trusted_at = 0.0  # loop time after which a delivering subscription resets the backoff
        self._epoch_b = (b"", "")  # (encoded, str) of the last epoch asked for
        #: entries taken from pushes; gaps (a pushed entry that did not follow the position, or the
        #: subscription lost), after which the log itself was read
        self.pushed = 0
        self.push_gaps = 0

    async def read(self, after: str, *, block_ms: int, count: int, check: bool = False,
                   epoch: str | None = None) -> tuple[LogEntries, LogCheck | None]:
        """Entries after id ``after`` (at most ``count``; waits up to
        ``block_ms`` ms for the first), and with ``check`` the guards read
        right after the XREAD returns (None without ``check``).

        With ``epoch`` (the store epoch the caller's position belongs to) on a plain Redis,
        entries come from the pushed log (:class:`LogPush`) while they continue the caller's
        position unbroken — no round trip. The log is read (XREAD, without waiting) after a
        gap, on a checked read, right after (re)subscribing, and when nothing was pushed
        within ``block_ms``; if that read finds entries, pushes are not arriving (a dead
        link, a refused PUBLISH): the subscription is dropped and reads block on the log
        (XREAD BLOCK, as without ``epoch``) until subscribing is retried — 1 s, doubling to
        30 s while it keeps failing. So a lost message costs at most ``block_ms``, once."""
        if self._pool is None:
            return await self._read_cluster(after, block_ms, count, check)
        block: int | None = block_ms
        quiet = False  # waited block_ms on a live subscription and nothing came
        if epoch is not None and self._push_kwargs is not None:
            push = self._push
            if push is not None and push.live:
                if not check:
                    if self._epoch_b[1] != epoch:
                        self._epoch_b = (epoch.encode(), epoch)
                    got = push.take(self._epoch_b[0], after, count)
                    if got == []:
                        await push.wait(block_ms / 1000)
                        got = push.take(self._epoch_b[0], after, count)
                        quiet = got == []
                    if got:
                        self.pushed += len(got)
                        if self._push_backoff_s and push.loop.time() >= self._push_trusted_at:
                            self._push_backoff_s = 0.0  # delivering for a while: failures start over at 1 s
                        decode = self._decode
                        return [(entry_id, decode(payload)) for entry_id, payload in got], None
                    if got is None:
                        self.push_gaps += 1
                block = None  # read what the log holds now; pushes carry on after it
            elif await self._subscribe():
                block = None  # subscribed: read the log up to now, then pushes continue it
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._pool.get_connection()
        xread = self._xread(after, block, count)
        deadline_s = max(self.timeout_s, (block or 0) / 1000 + 1.0)  # the socket timeout covers the block
        try:
            if not check:
                await conn.send_packed_command(xread)
                entries = self._entries(await _reply(conn, deadline_s))
                if quiet and entries:
                    self.push_gaps += 1
                    self._push_failed(f"{len(entries)} log entries came without their pushes")
                return entries, None
            await conn.send_packed_command(xread + self._check_packed)
            res = await _reply(conn, deadline_s)
            replies = [await _reply(conn, self.timeout_s) for _ in self._check_cmd]
            return self._entries(res), _log_check(*replies)
        except BaseException:
            # never leave a reply unread on the connection (or read one that belongs to another
            # command): after a timeout, an error or a reply we cannot read, start a new connection
            await conn.disconnect(nowait=True)
            self._close_push()  # and subscribe again with it (it may have moved to another server)
            raise

    def _close_push(self) -> None:
        push, self._push = self._push, None
        if push is not None:
            push.close()

    def _push_failed(self, why: str) -> None:
        """Drop the subscription; reads block on the log until the next try (backoff)."""
        self._close_push()
        self._push_backoff_s = min(self.PUSH_BACKOFF_MAX_S, max(1.0, self._push_backoff_s * 2))
        self._push_retry_at = asyncio.get_running_loop().time() + self._push_backoff_s
        logger.warning("log of partition %d: pushed log not usable (%s); reading the log alone, retry in %.0f s",
                       self.partition, why, self._push_backoff_s)

    async def _subscribe(self) -> bool:
        """(Re)subscribe to the pushed log unless a retry is not due yet; True when
        subscribed now. Never raises but CancelledError: a failure is logged, and reads
        go on blocking on the log until the next try."""
        loop = asyncio.get_running_loop()
        kw = self._push_kwargs
        if kw is None or loop.time() < self._push_retry_at:
            return False
        self._close_push()  # one that died (its loss was counted as a gap by the read that saw it)
        channel = push_channel(self.partition, int(kw.get("db") or 0)).encode()
        proto = LogPush(loop, channel)
        timeout = self.timeout_s
        try:
            async with asyncio.timeout(timeout):
                if kw.get("path"):
                    await loop.create_unix_connection(lambda: proto, kw["path"])
                else:
                    await loop.create_connection(lambda: proto, kw.get("host") or "localhost",
                                                 int(kw.get("port") or 6379))
            assert proto.transport is not None
            cmds: list[tuple[Any, ...]] = []
            if kw.get("password"):
                cmds.append(("AUTH", kw["username"], kw["password"]) if kw.get("username")
                            else ("AUTH", kw["password"]))
            cmds.append(("SUBSCRIBE", channel))
            proto.transport.write(b"".join(RespConnection.pack_command(*c) for c in cmds))
            for _ in cmds:
                await proto._reply(timeout)
            if not proto.live:
                raise StoreError("redis did not confirm the subscription")
        except asyncio.CancelledError:
            proto.close()
            raise
        except Exception as exc:  # whatever it was, the log itself is still there to read
            proto.close()
            self._push_failed(f"cannot subscribe: {type(exc).__name__}: {exc}")
            return False
        self._push = proto
        self._push_trusted_at = loop.time() + self.PUSH_TRUSTED_AFTER_S
        return True

    async def aclose(self) -> None:
        """Drop the connections (idempotent)."""
        self._close_push()
        await super().aclose()

    async def check(self) -> LogCheck:
        """The guards alone (one round trip)."""
        if self._pool is None:
            pipe = self.store.redis.pipeline(transaction=False)
            for cmd in self._check_cmd:
                pipe.execute_command(*cmd)
            return _log_check(*await pipe.execute())
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._pool.get_connection()
        try:
            await conn.send_packed_command(self._check_packed)
            replies = [await _reply(conn, self.timeout_s) for _ in self._check_cmd]
            return _log_check(*replies)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def _read_cluster(self, after: str, block_ms: int, count: int,
                            check: bool) -> tuple[LogEntries, LogCheck | None]:
        r = self.store.redis
        if not check:
            return self._entries(await r.xread({self.key: after}, count=count, block=block_ms)), None
        # a cluster pipeline groups commands by node: read first, then the guards
        res = await r.xread({self.key: after}, count=count, block=block_ms)
        return self._entries(res), await self.check()


async def _reply(conn: Any, timeout_s: float) -> Any:
    """The next reply on ``conn`` within ``timeout_s`` (raises TimeoutError).

    Not redis-py's ``read_response(timeout=…)``: on a timeout that returns
    None — the same as XREAD's "nothing came" — and leaves the late reply on
    the connection, where the next read would take it for its own."""
    if isinstance(conn, RespConnection):
        return await conn.reply(timeout_s)
    async with asyncio.timeout(timeout_s):
        return await conn.read_response(disable_decoding=True)


def _log_check(epoch: object, pepoch: object, first: object, last: object) -> LogCheck:
    if not isinstance(first, list) or not isinstance(last, list):
        raise StoreError(f"unexpected redis XRANGE/XREVRANGE reply {first!r:.80} {last!r:.80}")
    first_id = reply_text(first[0][0]) if first else None
    last_id = reply_text(last[0][0]) if last else None
    return LogCheck(reply_text_or_none(epoch), reply_text_or_none(pepoch), first_id, last_id)


class StoredLink(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event record's link as stored: canonical id ``c``, confidence
    ``p``, method ``m``, ``r``: the record names the sides the other way
    round from the canonical event."""

    c: str
    p: float
    m: str
    r: bool = False


_LINK_DECODER = msgspec.json.Decoder(StoredLink)


def provider_ts(d: Delta) -> int:
    """The provider's time of a delta, ms: a replay's own clock
    (``source_ts_original``) when set, else ``source_ts``."""
    o = d.source_ts_original
    return d.source_ts if o is None else o


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def encode(obj: msgspec.Struct) -> bytes:
    return ENCODER.encode(obj)
