"""Per-user and per-entity state in Redis: one round trip to read a batch, one atomic script to write it.

Keys are pseudonymised with a keyed hash (HMAC-SHA256), so neither Redis nor the logs ever hold a
raw user id, device id, IP or event id:

    sg:u:<hmac(user)>     the user's record: one binary string (gateway/codec.py), whose first 8
                          bytes are the compare-and-set version
    sg:d: / sg:i: / sg:p:<hmac(device | ip | ip prefix)>   EntityContext bytes
    sg:e:<hmac(user_id, event_id)> the response already given for that event of that user
                          (idempotency window; scoped to the user, so one user's event id can
                          never answer for another user's event)
    sg:seq                global apply counter: the order in which events changed state
    sg:o:<hmac(event)>    a reported outcome (label); sg:outcomes, sg:alerts: their streams
    sg:sh:<hmac(user)>    shadow mode's candidate state; sg:shadow: its stream (gateway/shadow.py)

This store is the only place that builds these key strings; other modules ask it for keys and
pseudonyms.

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
import time
from typing import NamedTuple

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from seqguard.featurizer import ENTITY_IDLE_RESET_MS, EntityContext, UserContext, ip_prefix
from seqguard.schema import Event

from .codec import RingCipher, UserState, pack_user, unpack_user, version_head
from .observer import PipelineObserver

KEY_PREFIX = "sg:"               # every key starts with it; "{sg}:" on Redis Cluster (see RedisStateStore)

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
  local cur = redis.call('GETRANGE', KEYS[1 + i], 0, 7)
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
    """Keyed hash of an id. Remembers recent answers: a batch hashes several ids per event (the event
    id twice: read and write) and users', devices' and IPs' ids recur across batches, so most HMAC
    calls on the request path are saved."""

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


class RedisStateStore:
    def __init__(self, client: aioredis.Redis, pseudonymize: Pseudonymizer, hidden: int, ttl_s: int,
                 ring_size: int = 8, dedupe_ttl_s: int = 600, rebuild_steps: int = 3,
                 key_prefix: str = KEY_PREFIX, alerts_max: int = 1_000_000, observer: PipelineObserver | None = None):
        self.client = client
        self.observer = observer            # timing hooks (gateway/observer.py); None: not observed
        self.prefix = key_prefix
        self.seq_key = key_prefix + "seq"
        self.outcome_stream = key_prefix + "outcomes"
        self.alerts_stream = key_prefix + "alerts"
        self.shadow_stream = key_prefix + "shadow"
        self.alerts_max = alerts_max
        self.rebuild_steps = min(rebuild_steps, ring_size)
        self.pseudonymize = pseudonymize
        # a store built on already-hashed ids (the review app records labels with them) has no key and
        # never reads a user's ring; every store that reads or writes users seals rings with the key
        key = getattr(pseudonymize, "key", None)
        self.ring_cipher = RingCipher(key) if key is not None else None
        self.hidden = hidden
        self.ttl_s = ttl_s
        self.ring_size = ring_size
        self.dedupe_ttl_s = dedupe_ttl_s
        self._save_script = client.register_script(_SAVE_LUA)

    @classmethod
    def from_settings(cls, s, hidden: int, observer: PipelineObserver | None = None) -> "RedisStateStore":
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
                   s.rebuild_steps, key_prefix=prefix, alerts_max=s.alerts_stream_max, observer=observer)

    def user_pseudonym(self, user_id: str) -> str:
        """hmac(user id): the suffix of its keys, and how alerts, outcomes and streams name the user."""
        return self.pseudonymize("user", user_id)

    def event_pseudonym(self, event_id: str) -> str:
        """hmac(event id): how alerts, outcomes and streams name the event."""
        return self.pseudonymize("event", event_id)

    def user_key(self, user_id: str) -> str:
        return self.prefix + "u:" + self.user_pseudonym(user_id)

    def shadow_state_key(self, user_id: str) -> str:
        """Where shadow mode keeps the user's candidate state (gateway/shadow.py)."""
        return self.prefix + "sh:" + self.user_pseudonym(user_id)

    def answer_ref(self, user_id: str, event_id: str) -> str:
        """The pseudonymised (user, event id) pair: the suffix of its idempotency key."""
        # length-prefixed so that no (user, event) pair can collide with another
        return self.pseudonymize("event", f"{len(user_id)}:{user_id}{event_id}")

    def event_key(self, user_id: str, event_id: str) -> str:
        return self.prefix + "e:" + self.answer_ref(user_id, event_id)

    def entity_keys(self, ev: Event) -> tuple[str | None, str | None, str | None]:
        pre = self.prefix
        return (pre + "d:" + self.pseudonymize("device", ev.device_id) if ev.device_id else None,
                pre + "i:" + self.pseudonymize("ip", ev.ip) if ev.ip else None,
                pre + "p:" + self.pseudonymize("prefix", ip_prefix(ev.ip)) if ev.ip else None)

    async def load(self, user_ids: list[str], entity_keys: list[str], event_refs: list[tuple[str, str]] = (),
                   extra_keys: list[str] = ()) -> BatchRead:
        """Users (by id), entities (by key), already-answered events (by (user id, event id)) and the
        raw values of `extra_keys` (e.g. holds) in one round trip."""
        t0 = time.perf_counter()
        try:
            return await self._load(user_ids, entity_keys, event_refs, extra_keys)
        finally:
            if self.observer is not None:
                self.observer.redis_round_trip("load", time.perf_counter() - t0)

    async def _load(self, user_ids, entity_keys, event_refs=(), extra_keys=()) -> BatchRead:
        # one MGET for every key (all of them are strings): one round trip, and less client work
        # than a pipeline of GETs
        ukeys = [self.user_key(u) for u in user_ids]
        keys = ukeys + list(entity_keys) + [self.event_key(u, e) for u, e in event_refs] + list(extra_keys)
        try:
            res = await self.client.mget(keys) if keys else []
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
        t0 = time.perf_counter()
        try:
            return await self._save(users, entities, expected_entities, responses, rewrites, alerts)
        finally:
            if self.observer is not None:
                self.observer.redis_round_trip("save", time.perf_counter() - t0)

    async def _save(self, users, entities, expected_entities, responses, rewrites=(), alerts=()) -> int:
        keys = [self.seq_key] + [u.key for u in users] + list(entities) + [
            self.event_key(*ref) for ref, _ in responses] + [self.prefix + "e:" + ref for ref, _ in rewrites] + [
            self.alerts_stream]
        argv: list = [len(users), len(entities), len(responses), self.ttl_s, self.dedupe_ttl_s, len(rewrites),
                      self.alerts_max, min(self.ttl_s, ENTITY_TTL_S)]
        for st in users:
            # the expectation is the head as read; a key that was absent must still be absent
            argv += [version_head(st.version) if st.existed else b"",
                     pack_user(st, self.ring_size, self.rebuild_steps, self.ring_cipher)]
        for k, e in entities.items():
            argv += [expected_entities.get(k, b""), e.to_bytes()]
        argv += [resp for _, resp in responses]
        argv += [resp for _, resp in rewrites]
        argv += list(alerts) if alerts else [""] * len(responses)
        try:
            seq = await self._save_script(keys=keys, args=argv)
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis write failed: {type(e).__name__}: {e}") from None
        if seq == -1:
            raise StateConflict("state changed since it was read")
        return int(seq)

    async def read_values(self, keys: list[str]) -> list:
        """The raw values of keys this store named (e.g. shadow_state_key), None where absent."""
        return await self.client.mget(keys)

    async def write_shadow(self, states: dict[str, bytes], ttl_s: int, entries: list[dict], stream_max: int) -> None:
        """Shadow mode's candidate states (by shadow_state_key) and its stream entries, one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value in states.items():
                pipe.set(key, value, ex=ttl_s)
            for entry in entries:
                pipe.xadd(self.shadow_stream, entry, maxlen=stream_max, approximate=True)
            await pipe.execute()

    async def get_user(self, user_id: str) -> UserState:
        """One user's state, for GetUserState: not a batch round trip, so not observed."""
        return (await self._load([user_id], [])).users[user_id]

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose()

    async def record_outcome(self, event_id: str, label: str, family: str, reported_ms: int, ttl_s: int,
                             stream_max: int, user_id: str = "") -> dict | None:
        """Store a reported label at sg:o:<hmac(event_id)> (TTL) and append it to the sg:outcomes stream.

        With the user id, returns the answer the gateway gave for that user's event if it is
        still in the idempotency window (so the label can be joined with the score), else None.
        Keys and the stream carry only the pseudonymised event id; export jobs hash their log's
        event ids the same way.
        """
        h = self.event_pseudonym(event_id)
        try:
            answered = await self.client.get(self.event_key(user_id, event_id)) if user_id else None
            prev = json.loads(answered) if answered else None
            rec = {"label": label, "family": family, "ts": reported_ms}
            if prev:
                rec.update(risk=prev["risk"], mv=prev["model_version"])
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.prefix + "o:" + h, json.dumps(rec, separators=(",", ":")), ex=ttl_s)
                pipe.xadd(self.outcome_stream, {"event": h, **{k: str(v) for k, v in rec.items()}},
                          maxlen=stream_max, approximate=True)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis outcome write failed: {type(e).__name__}: {e}") from None
        return prev
