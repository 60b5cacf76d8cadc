"""Per-user and per-entity state in Redis: one round trip to read a batch, one atomic script to write it.

Keys are pseudonymised with a keyed hash (HMAC-SHA256), so neither Redis nor the logs ever hold a
raw user id, device id, IP or event id:

    sg:u:<hmac(user)>     one binary string (see pack_user): n (events applied: the optimistic-
                          concurrency version, the first 8 bytes so the write script compares it
                          with GETRANGE), mv (model version), h, c (float32 LSTM state), sess
                          (float64 session average of the detector, seqguard/detector.py), ctx
                          (UserContext bytes), pend (featurised events whose LSTM step is deferred),
                          ring (recent events; the newest `rebuild_steps` carry their feature row so
                          a new model version can rebuild h, c). One string instead of a hash: a
                          hash with 1 KB of h/c is hashtable-encoded (~70 B per field overhead);
                          the JSON ring cost ~40 B per event.
    sg:d: / sg:i: / sg:p:<hmac(device | ip | ip prefix)>   EntityContext bytes
    sg:e:<hmac(user_id, event_id)> the response already given for that event of that user
                          (idempotency window; scoped to the user, so one user's event id can
                          never answer for another user's event)
    sg:seq                global apply counter: the order in which events changed state

On Redis Cluster (`redis_cluster`) the prefix is the hash tag "{sg}:": every key of a deployment
lands in ONE slot, so the batch write stays one atomic script over users, entities and the
counter (Cluster refuses multi-slot scripts). That makes seqguard run on cluster-mode Redis
(managed offerings that only speak the cluster protocol), but it does not shard: one primary holds
all seqguard keys. Sharding by user would split the atomic write, because entity contexts are
shared across users (docs/operations.md).

Writes are compare-and-set: the Lua script applies a batch only if every user's `n` and every
entity's bytes are still what the batch read; otherwise nothing is written and the caller
retries from a fresh read. Two gateway processes can therefore never lose or double an update.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from seqguard.featurizer import ENTITY_IDLE_RESET_MS, N_FEATURES, EntityContext, UserContext, ip_prefix
from seqguard.schema import Event

KEY_PREFIX = "sg:"               # every key starts with it; "{sg}:" on Redis Cluster (see RedisStateStore)
USER_FORMAT = 5                 # 1 was the hash layout (h, c, ctx, ring as JSON, pend, mv, n);
                                # 2 had no session average (read as 0.0); 2 and 3 hold feature
                                # rows of featuriser version 1 (LEGACY_FEATURE_WIDTH wide); 5 added
                                # each deferred step's answer key and seals the ring (RingCipher)
LEGACY_FEATURE_WIDTH = 40       # read rows are padded with zeros to N_FEATURES (the new columns
                                # are detector-only ring counters: 0 = no evidence)

# An entity context is reset by the featuriser once idle past its windows (ENTITY_IDLE_RESET_MS), so
# its key need not outlive that: a key gone is read as empty, which is what the reset gives. The extra
# day covers the gateway's clock-skew bound on event times.
ENTITY_TTL_S = ENTITY_IDLE_RESET_MS // 1000 + 86_400

# KEYS: seq, users..., entities..., events..., rewritten events..., the alerts stream
# ARGV: U, E, M, ttl, dedupe_ttl, R, alerts stream max length, entity ttl, then per user: expected first 8 bytes
#       ('' for an absent key), blob; per entity: expected, value; per event: response; per rewrite:
#       the new response; per event: its alert as a JSON list [field, value, ...] ('' for none)
_SAVE_LUA = """
local U, E, M = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, dttl, R, amax = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ettl = tonumber(ARGV[8])
local a = 9
for i = 1, U do
  local cur = redis.pcall('GETRANGE', KEYS[1 + i], 0, 7)
  if type(cur) ~= 'string' then cur = '' end      -- a legacy (hash) state key: replaced below
  if cur ~= ARGV[a] then return -1 end
  a = a + 2
end
local b = a
for j = 1, E do
  local cur = redis.call('GET', KEYS[1 + U + j])
  if not cur then cur = '' end
  if cur ~= ARGV[b] then return -1 end
  b = b + 2
end
a = 9
for i = 1, U do
  redis.call('SET', KEYS[1 + i], ARGV[a + 1], 'EX', ttl)
  a = a + 2
end
for j = 1, E do
  redis.call('SET', KEYS[1 + U + j], ARGV[a + 1], 'EX', ettl)
  a = a + 2
end
local seq = redis.call('INCRBY', KEYS[1], M)
for m = 1, M do
  local resp = ARGV[a]
  if resp ~= '' then
    redis.call('SET', KEYS[1 + U + E + m], string.gsub(resp, '"seq":0', '"seq":' .. (seq - M + m)), 'EX', dttl)
  end
  a = a + 1
end
-- rewrites: a deferred event's remembered answer replaced by its real score, keeping its sequence
for r = 1, R do
  local key = KEYS[1 + U + E + M + r]
  local old = redis.call('GET', key)
  if old then
    local s = string.match(old, '"seq":(%d+)')
    if s then
      redis.call('SET', key, string.gsub(ARGV[a], '"seq":0', '"seq":' .. s), 'KEEPTTL')
    end
  end
  a = a + 1
end
-- alerts: a stream entry per applied decision that needs one (in this same atomic write, so an alert
-- exists if and only if its decision was applied); its alert_id is the event's sequence number
local akey = KEYS[2 + U + E + M + R]
for m = 1, M do
  if ARGV[a] ~= '' then
    local f = cjson.decode(ARGV[a])
    f[2] = tostring(seq - M + m)
    redis.call('XADD', akey, 'MAXLEN', '~', amax, '*', unpack(f))
  end
  a = a + 1
end
return seq
"""


class BatchRead(NamedTuple):
    """What one MGET returned for a batch."""
    users: dict                 # user id -> UserState
    entities: dict              # entity key -> EntityContext
    raw_entities: dict          # entity key -> the bytes read (the compare-and-set expectation)
    answered: dict              # (user id, event id) -> the remembered answer (dict)
    extra: list                 # raw values of the extra keys, in order (None where absent)


def alert_fields(fields: dict[str, str]) -> str:
    """An alert stream entry for save(): [field, value, ...] as JSON, the alert_id (second) filled in
    by the write script with the event's sequence number."""
    flat = []
    for k, v in fields.items():
        flat += [k, v]
    return json.dumps(flat, separators=(",", ":"))


class StateUnavailable(RuntimeError):
    """Redis could not be read or written in time; the caller degrades explicitly."""


class StateConflict(RuntimeError):
    """Another writer changed a user or entity this batch read: retry from a fresh read."""


class Pseudonymizer:
    """Keyed hash of an id. Remembers recent answers: a batch hashed ~7 ids per event (the event id
    twice: read and write), users', devices' and IPs' ids recur, and one HMAC costs 3-6 us here."""

    CACHE = 32768               # entries (~5 MB); cleared when full

    def __init__(self, key: bytes):
        self._key = key
        self._cache: dict = {}

    @property
    def key(self) -> bytes:
        return self._key

    def __call__(self, kind: str, value: str) -> str:
        c = self._cache
        out = c.get((kind, value))
        if out is None:
            out = hmac.new(self._key, f"{kind}:{value}".encode("utf-8", "surrogatepass"),
                           hashlib.sha256).hexdigest()[:32]
            if len(c) >= self.CACHE:
                c.clear()
            c[(kind, value)] = out
        return out


class RingEntry(NamedTuple):
    """One recent event. `feat`: its packed feature row (pack_features; a float32 array until the
    entry is first written) or b"" beyond rebuild_steps."""
    event_id: str
    event_type: str
    ts: int
    feat: bytes = b""
    head: bytes = b""           # its encoded id/type/ts (cached: a ring is re-encoded on every write)


@dataclass
class UserState:
    key: str
    h: np.ndarray
    c: np.ndarray
    ctx: UserContext
    ring: list = field(default_factory=list)        # [RingEntry, ...] oldest first
    pending: list = field(default_factory=list)     # [(type_id, features float32 [F], answer key), ...] not yet
                                                    # stepped; the key names the remembered DEGRADED answer
                                                    # that the real score replaces once the step runs
    model_version: str = ""
    n: int = 0
    version: int = 0                                # n as read: the compare-and-set expectation
    existed: bool = False                           # a key was read: "absent" and "n = 0" are different versions
    session: float = 0.0                            # the detector's session average m (stage 2)
    dirty: bool = False                             # changed by this batch: only these users are written


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        if x < 0x80:
            return n, i
        shift += 7


def pack_features(row: np.ndarray) -> bytes:
    """Lossless float32 row: bitmask of non-zero values, bitmask of those == 1.0, then the others.

    Most features are 0/1 flags or zero (no amount, no entity), so a 40-feature row is ~60-90 B
    instead of 160 B, and the unpacked row is bit-identical (the offline replay must match).
    """
    row = np.ascontiguousarray(row, np.float32)
    bits = row.view(np.uint32)
    nz = bits != 0                      # by bits: -0.0 is kept as a value, not dropped as zero
    one = bits == 0x3F800000
    return (np.packbits(nz, bitorder="little").tobytes() + np.packbits(one, bitorder="little").tobytes()
            + row[nz & ~one].tobytes())


def unpack_features(raw: bytes, n_features: int) -> np.ndarray:
    m = (n_features + 7) // 8
    nz = np.unpackbits(np.frombuffer(raw[:m], np.uint8), count=n_features, bitorder="little").astype(bool)
    one = np.unpackbits(np.frombuffer(raw[m:2 * m], np.uint8), count=n_features, bitorder="little").astype(bool)
    row = np.zeros(n_features, np.float32)
    row[one] = 1.0
    row[nz & ~one] = np.frombuffer(raw[2 * m:], np.float32)
    return row


def ring_entry(event_id: str, event_type: str, ts: int, feats: np.ndarray | None = None) -> RingEntry:
    """A new ring entry. Its feature row stays an array until a write packs it (pack_ring), and only
    if it is still among the newest `rebuild_steps` then: most rows are pushed out unpacked."""
    e, t = event_id.encode("utf-8", "surrogatepass"), event_type.encode("utf-8", "surrogatepass")
    head = _varint(len(e)) + e + _varint(len(t)) + t + _varint(ts)
    return RingEntry(event_id, event_type, ts, feats if feats is not None else b"", head)


def pack_ring(ring: list, rebuild_steps: int) -> bytes:
    """[count] then per entry: varint-prefixed id and type, varint ts, varint feature-length, features.

    Only the newest `rebuild_steps` entries keep their feature rows (what a rebuild replays).
    """
    parts = [bytes([len(ring)])]
    keep_from = len(ring) - rebuild_steps
    for k, e in enumerate(ring):
        head = e.head or ring_entry(e.event_id, e.event_type, e.ts).head
        f = e.feat if k >= keep_from else b""
        if isinstance(f, np.ndarray):
            f = pack_features(f)
        parts += (head, _varint(len(f)), f)
    return b"".join(parts)


def unpack_ring(raw: bytes) -> list:
    if not raw:
        return []
    out, i = [], 1
    for _ in range(raw[0]):
        start = i
        n, i = _read_varint(raw, i)
        eid = raw[i:i + n].decode("utf-8", "surrogatepass")
        i += n
        n, i = _read_varint(raw, i)
        et = raw[i:i + n].decode("utf-8", "surrogatepass")
        i += n
        ts, i = _read_varint(raw, i)
        head = raw[start:i]
        n, i = _read_varint(raw, i)
        out.append(RingEntry(eid, et, ts, raw[i:i + n], head))
        i += n
    return out


NO_ANSWER = ""                  # a deferred step whose answer is not remembered (a rebuild step)
_REF_BYTES = 16                 # a deferred step's answer key: the 32 hex digits after "e:", as bytes


def _pack_pending(pending: list) -> bytes:
    """[n, F] int32, n type ids int64, n x F features float32, n answer keys (16 bytes; zeros: none)."""
    if not pending:
        return b""
    types = np.array([p[0] for p in pending], np.int64)
    feats = np.stack([p[1] for p in pending]).astype(np.float32)
    refs = b"".join(bytes.fromhex(p[2]) if p[2] else bytes(_REF_BYTES) for p in pending)
    return (np.int32(len(pending)).tobytes() + np.int32(feats.shape[1]).tobytes() + types.tobytes()
            + feats.tobytes() + refs)


def _unpack_pending(raw: bytes | None, with_refs: bool = True) -> list:
    if not raw:
        return []
    n, f = int(np.frombuffer(raw[:4], np.int32)[0]), int(np.frombuffer(raw[4:8], np.int32)[0])
    types = np.frombuffer(raw[8:8 + 8 * n], np.int64)
    end = 8 + 8 * n + 4 * n * f
    feats = np.frombuffer(raw[8 + 8 * n:end], np.float32).reshape(n, f)
    refs = [raw[end + _REF_BYTES * i:end + _REF_BYTES * (i + 1)] for i in range(n)] if with_refs else []
    return [(int(types[i]), _to_width(feats[i]),
             refs[i].hex() if with_refs and any(refs[i]) else NO_ANSWER) for i in range(n)]


def _to_width(row: np.ndarray, width: int = N_FEATURES) -> np.ndarray:
    """A feature row written by an older featuriser, zero-padded to this one's width (a copy)."""
    out = np.zeros(max(width, len(row)), np.float32)
    out[:len(row)] = row
    return out


def _upgrade_ring(ring: list) -> list:
    """Ring rows of user formats 2-3 (featuriser v1): repacked at this featuriser's width."""
    return [e._replace(feat=pack_features(_to_width(unpack_features(e.feat, LEGACY_FEATURE_WIDTH))))
            if e.feat else e for e in ring]


_BLOB_HEAD = struct.Struct("<QB")           # n (compare-and-set version, first 8 bytes), format


class RingCipher:
    """Keeps raw event ids (and the recent events' types and times) out of Redis.

    The ring is the only part of a user's record that holds caller identifiers in the clear (its
    event ids name the events behind a reason). Its bytes are XORed with SHAKE-256(ring key ||
    user key || nonce), a keyed extendable-output stream, with a fresh random nonce per write, so
    equal rings never look equal and nothing is readable without the deployment's pseudonymisation
    key. About 1.5 us per user and write here: one hash call, not one per entry. Integrity is not
    its job: whoever can write Redis can already write any state.
    """

    NONCE_BYTES = 8

    def __init__(self, key: bytes):
        self._key = hmac.new(key, b"seqguard ring cipher v1", hashlib.sha256).digest()

    def seal(self, user_key: str, plain: bytes) -> bytes:
        if not plain:
            return b""
        nonce = os.urandom(self.NONCE_BYTES)
        return nonce + _xor(plain, self._stream(user_key, nonce, len(plain)))

    def open(self, user_key: str, sealed: bytes) -> bytes:
        if not sealed:
            return b""
        nonce, body = sealed[:self.NONCE_BYTES], sealed[self.NONCE_BYTES:]
        return _xor(body, self._stream(user_key, nonce, len(body)))

    def _stream(self, user_key: str, nonce: bytes, n: int) -> bytes:
        return hashlib.shake_256(self._key + user_key.encode() + nonce).digest(n)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def pack_user(st: UserState, ring_size: int, rebuild_steps: int, cipher: RingCipher | None = None) -> bytes:
    """The user's record. With `cipher` (always, in the gateway) the ring section is sealed; the
    same cipher must open it (unpack_user)."""
    mv = st.model_version.encode()
    h = np.asarray(st.h, np.float32).tobytes()
    c = np.asarray(st.c, np.float32).tobytes()
    ctx = st.ctx.to_bytes()
    pend = _pack_pending(st.pending)
    ring = pack_ring(st.ring[-ring_size:], rebuild_steps)
    if cipher is not None:
        ring = cipher.seal(st.key, ring)
    return b"".join((_BLOB_HEAD.pack(st.n, USER_FORMAT), bytes([len(mv)]), mv,
                     struct.pack("<H", len(h) // 4), h, c, struct.pack("<d", st.session),
                     struct.pack("<H", len(ctx)), ctx,
                     struct.pack("<I", len(pend)), pend, ring))


def unpack_user(key: str, raw: bytes, cipher: RingCipher | None = None) -> UserState:
    n, fmt = _BLOB_HEAD.unpack_from(raw, 0)
    if fmt not in (2, 3, 4, USER_FORMAT):
        raise ValueError(f"user state format {fmt} is not one of 2, 3, 4, {USER_FORMAT}")
    i = _BLOB_HEAD.size
    m = raw[i]
    mv = raw[i + 1:i + 1 + m].decode()
    i += 1 + m
    (H,) = struct.unpack_from("<H", raw, i)
    i += 2
    h = np.frombuffer(raw, np.float32, H, i).copy()
    c = np.frombuffer(raw, np.float32, H, i + 4 * H).copy()
    i += 8 * H
    session = 0.0
    if fmt >= 3:
        (session,) = struct.unpack_from("<d", raw, i)
        i += 8
    (lc,) = struct.unpack_from("<H", raw, i)
    ctx = UserContext.from_bytes(raw[i + 2:i + 2 + lc])
    i += 2 + lc
    (lp,) = struct.unpack_from("<I", raw, i)
    pend = _unpack_pending(raw[i + 4:i + 4 + lp], with_refs=fmt >= 5)
    i += 4 + lp
    ring = unpack_ring(cipher.open(key, raw[i:]) if cipher is not None and fmt >= 5 else raw[i:])
    if fmt < 4:
        ring = _upgrade_ring(ring)
    return UserState(key, h, c, ctx, ring, pend, mv, n, n, True, session)


class RedisStateStore:
    def __init__(self, client: aioredis.Redis, pseudonymize: Pseudonymizer, hidden: int, ttl_s: int,
                 ring_size: int = 8, dedupe_ttl_s: int = 600, rebuild_steps: int = 3,
                 key_prefix: str = KEY_PREFIX, alerts_max: int = 1_000_000):
        self.r = client
        self.prefix = key_prefix
        self.seq_key = key_prefix + "seq"
        self.outcome_stream = key_prefix + "outcomes"
        self.alerts_stream = key_prefix + "alerts"
        self.alerts_max = alerts_max
        self.rebuild_steps = min(rebuild_steps, ring_size)
        self.p = pseudonymize
        # a store built on already-hashed ids (the review app records labels with them) has no key and
        # never reads a user's ring; every store that reads or writes users seals rings with the key
        key = getattr(pseudonymize, "key", None)
        self.ring_cipher = RingCipher(key) if key is not None else None
        self.hidden = hidden
        self.ttl_s = ttl_s
        self.ring_size = ring_size
        self.dedupe_ttl_s = dedupe_ttl_s
        self._save = client.register_script(_SAVE_LUA)

    @classmethod
    def from_settings(cls, s, hidden: int) -> "RedisStateStore":
        t = s.redis_timeout_ms / 1000
        auth = dict(username=s.redis_username or None, password=s.redis_password or None)
        if s.redis_cluster:
            from redis.asyncio.cluster import RedisCluster
            client = RedisCluster(host=s.redis_host, port=s.redis_port, **auth, socket_timeout=t,
                                  socket_connect_timeout=t, retry=Retry(NoBackoff(), 0))
            prefix = "{sg}:"
        else:
            client = aioredis.Redis(host=s.redis_host, port=s.redis_port, db=s.redis_db, **auth,
                                    socket_timeout=t, socket_connect_timeout=t,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=0)  # fail fast: we degrade
            prefix = KEY_PREFIX
        return cls(client, Pseudonymizer(s.key_bytes()), hidden, s.state_ttl_s, s.recent_events, s.dedupe_ttl_s,
                   s.rebuild_steps, key_prefix=prefix, alerts_max=s.alerts_stream_max)

    def user_key(self, user_id: str) -> str:
        return self.prefix + "u:" + self.p("user", user_id)

    def answer_ref(self, user_id: str, event_id: str) -> str:
        """The pseudonymised (user, event id) pair: the suffix of its idempotency key."""
        # length-prefixed so that no (user, event) pair can collide with another
        return self.p("event", f"{len(user_id)}:{user_id}{event_id}")

    def event_key(self, user_id: str, event_id: str) -> str:
        return self.prefix + "e:" + self.answer_ref(user_id, event_id)

    def entity_keys(self, ev: Event) -> tuple[str | None, str | None, str | None]:
        pre = self.prefix
        return (pre + "d:" + self.p("device", ev.device_id) if ev.device_id else None,
                pre + "i:" + self.p("ip", ev.ip) if ev.ip else None,
                pre + "p:" + self.p("prefix", ip_prefix(ev.ip)) if ev.ip else None)

    async def load(self, user_ids: list[str], entity_keys: list[str], event_refs: list[tuple[str, str]] = (),
                   extra_keys: list[str] = ()) -> BatchRead:
        """Users (by id), entities (by key), already-answered events (by (user id, event id)) and the
        raw values of `extra_keys` (e.g. holds) in one round trip."""
        # one MGET for every key: all of them are strings (a legacy hash user key reads as nil, i.e. a
        # fresh user, and the write script replaces it); a pipeline of GETs cost ~0.1 ms more in redis-py
        ukeys = [self.user_key(u) for u in user_ids]
        keys = ukeys + list(entity_keys) + [self.event_key(u, e) for u, e in event_refs] + list(extra_keys)
        try:
            res = await self.r.mget(keys) if keys else []
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis read failed: {type(e).__name__}: {e}") from None
        users = {u: self._decode_user(k, raw) for u, k, raw in zip(user_ids, ukeys, res)}
        pos = len(ukeys)
        entities, raw_entities = {}, {}
        for k, raw in zip(entity_keys, res[pos:pos + len(entity_keys)]):
            entities[k] = EntityContext.from_bytes(raw) if raw else EntityContext()
            raw_entities[k] = raw or b""
        pos += len(entity_keys)
        answered = {ref: json.loads(raw) for ref, raw in zip(event_refs, res[pos:pos + len(event_refs)]) if raw}
        return BatchRead(users, entities, raw_entities, answered, res[pos + len(event_refs):])

    def _decode_user(self, key: str, raw) -> UserState:
        if not raw or isinstance(raw, Exception):
            z = np.zeros(self.hidden, np.float32)
            return UserState(key, z, z.copy(), UserContext())
        return unpack_user(key, raw, self.ring_cipher)

    async def save(self, users: list[UserState], entities: dict[str, EntityContext], expected_entities: dict,
                   responses: list[tuple[tuple[str, str], str]], rewrites: list[tuple[str, str]] = (),
                   alerts: list[str] = ()) -> int:
        """Compare-and-set write of a batch; returns the apply sequence number of its last event.

        `users`: the users this batch changed (a user that was only read must not be written: it
        would turn "absent" into "n = 0"). `responses`: per applied event, ((user id, event id),
        the JSON to remember for idempotency), with "seq":0 to be replaced by the event's apply
        sequence number. `rewrites`: (answer key of a deferred step, the JSON of its real score
        with "seq":0) replacing a remembered DEGRADED answer, which keeps its sequence number and
        TTL (skipped if it expired). `alerts`: per response, alert_fields() of its alert or "" for
        none. Raises StateConflict if another writer got there first (nothing written),
        StateUnavailable if Redis fails.
        """
        keys = [self.seq_key] + [u.key for u in users] + list(entities) + [
            self.event_key(*ref) for ref, _ in responses] + [self.prefix + "e:" + ref for ref, _ in rewrites] + [
            self.alerts_stream]
        argv: list = [len(users), len(entities), len(responses), self.ttl_s, self.dedupe_ttl_s, len(rewrites),
                      self.alerts_max, min(self.ttl_s, ENTITY_TTL_S)]
        for st in users:
            # the expectation is the head as read; a key that was absent must still be absent
            argv += [_BLOB_HEAD.pack(st.version, USER_FORMAT)[:8] if st.existed else b"",
                     pack_user(st, self.ring_size, self.rebuild_steps, self.ring_cipher)]
        for k, e in entities.items():
            argv += [expected_entities.get(k, b""), e.to_bytes()]
        argv += [resp for _, resp in responses]
        argv += [resp for _, resp in rewrites]
        argv += list(alerts) if alerts else [""] * len(responses)
        try:
            seq = await self._save(keys=keys, args=argv)
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis write failed: {type(e).__name__}: {e}") from None
        if seq == -1:
            raise StateConflict("state changed since it was read")
        return int(seq)

    async def get_user(self, user_id: str) -> UserState:
        return (await self.load([user_id], [])).users[user_id]

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.r.aclose()


    async def record_outcome(self, event_id: str, label: str, family: str, reported_ms: int, ttl_s: int,
                             stream_max: int, user_id: str = "") -> dict | None:
        """Store a reported label at sg:o:<hmac(event_id)> (TTL) and append it to the sg:outcomes stream.

        With the user id, returns the answer the gateway gave for that user's event if it is
        still in the idempotency window (so the label can be joined with the score), else None.
        Keys and the stream carry only the pseudonymised event id; export jobs hash their log's
        event ids the same way.
        """
        h = self.p("event", event_id)
        try:
            answered = await self.r.get(self.event_key(user_id, event_id)) if user_id else None
            prev = json.loads(answered) if answered else None
            rec = {"label": label, "family": family, "ts": reported_ms}
            if prev:
                rec.update(risk=prev["risk"], mv=prev["mv"])
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.set(self.prefix + "o:" + h, json.dumps(rec, separators=(",", ":")), ex=ttl_s)
                pipe.xadd(self.outcome_stream, {"event": h, **{k: str(v) for k, v in rec.items()}},
                          maxlen=stream_max, approximate=True)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis outcome write failed: {type(e).__name__}: {e}") from None
        return prev
