"""Per-user and per-entity state in Redis: one round trip to read a batch, one atomic script to write it.

Keys are pseudonymised with a keyed hash (HMAC-SHA256), so neither Redis nor the logs ever hold a
raw user id, device id, IP or event id:

    sg:u:<hmac(user)>     hash: h, c (float32 LSTM state), ctx (UserContext bytes), ring (recent
                          events), pend (featurised events whose LSTM step is deferred), mv (model
                          version), n (events applied: the optimistic-concurrency version)
    sg:d: / sg:i: / sg:p:<hmac(device | ip | ip prefix)>   EntityContext bytes
    sg:e:<hmac(event_id)> the response already given for that event (idempotency window)
    sg:seq                global apply counter: the order in which events changed state

Writes are compare-and-set: the Lua script applies a batch only if every user's `n` and every
entity's bytes are still what the batch read; otherwise nothing is written and the caller
retries from a fresh read. Two gateway processes can therefore never lose or double an update.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from seqguard.featurizer import EntityContext, UserContext, ip_prefix
from seqguard.schema import Event

SEQ_KEY = "sg:seq"
USER_FIELDS = ("h", "c", "ctx", "ring", "pend", "mv", "n")

# KEYS: seq, users..., entities..., events...
# ARGV: U, E, M, ttl, dedupe_ttl, then per user: expected_n, h, c, ctx, ring, pend, mv, n;
#       per entity: expected, value; per event: response
_SAVE_LUA = """
local U, E, M = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, dttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local a = 6
for i = 1, U do
  local cur = redis.call('HGET', KEYS[1 + i], 'n')
  if not cur then cur = '0' end
  if cur ~= ARGV[a] then return -1 end
  a = a + 8
end
local b = a
for j = 1, E do
  local cur = redis.call('GET', KEYS[1 + U + j])
  if not cur then cur = '' end
  if cur ~= ARGV[b] then return -1 end
  b = b + 2
end
a = 6
for i = 1, U do
  local k = KEYS[1 + i]
  redis.call('HSET', k, 'h', ARGV[a + 1], 'c', ARGV[a + 2], 'ctx', ARGV[a + 3], 'ring', ARGV[a + 4],
             'pend', ARGV[a + 5], 'mv', ARGV[a + 6], 'n', ARGV[a + 7])
  redis.call('EXPIRE', k, ttl)
  a = a + 8
end
for j = 1, E do
  redis.call('SET', KEYS[1 + U + j], ARGV[a + 1], 'EX', ttl)
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
return seq
"""


class StateUnavailable(RuntimeError):
    """Redis could not be read or written in time; the caller degrades explicitly."""


class StateConflict(RuntimeError):
    """Another writer changed a user or entity this batch read: retry from a fresh read."""


class Pseudonymizer:
    def __init__(self, key: bytes):
        self._key = key

    def __call__(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}:{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


@dataclass
class UserState:
    key: str
    h: np.ndarray
    c: np.ndarray
    ctx: UserContext
    ring: list = field(default_factory=list)        # [[event_id, event_type, ts], ...] oldest first
    pending: list = field(default_factory=list)     # [(type_id, features float32 [F]), ...] not yet stepped
    model_version: str = ""
    n: int = 0
    version: int = 0                                # n as read: the compare-and-set expectation
    existed: bool = False


def _pack_pending(pending: list) -> bytes:
    if not pending:
        return b""
    types = np.array([p[0] for p in pending], np.int64)
    feats = np.stack([p[1] for p in pending]).astype(np.float32)
    return np.int32(len(pending)).tobytes() + np.int32(feats.shape[1]).tobytes() + types.tobytes() + feats.tobytes()


def _unpack_pending(raw: bytes | None) -> list:
    if not raw:
        return []
    n, f = int(np.frombuffer(raw[:4], np.int32)[0]), int(np.frombuffer(raw[4:8], np.int32)[0])
    types = np.frombuffer(raw[8:8 + 8 * n], np.int64)
    feats = np.frombuffer(raw[8 + 8 * n:], np.float32).reshape(n, f)
    return [(int(types[i]), feats[i].copy()) for i in range(n)]


class RedisStateStore:
    def __init__(self, client: aioredis.Redis, pseudonymize: Pseudonymizer, hidden: int, ttl_s: int,
                 ring_size: int = 8, dedupe_ttl_s: int = 600):
        self.r = client
        self.p = pseudonymize
        self.hidden = hidden
        self.ttl_s = ttl_s
        self.ring_size = ring_size
        self.dedupe_ttl_s = dedupe_ttl_s
        self._save = client.register_script(_SAVE_LUA)

    @classmethod
    def from_settings(cls, s, hidden: int) -> "RedisStateStore":
        t = s.redis_timeout_ms / 1000
        client = aioredis.Redis(host=s.redis_host, port=s.redis_port, db=s.redis_db,
                                username=s.redis_username or None, password=s.redis_password or None,
                                socket_timeout=t, socket_connect_timeout=t,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)  # fail fast: we degrade
        return cls(client, Pseudonymizer(s.key_bytes()), hidden, s.state_ttl_s, s.recent_events, s.dedupe_ttl_s)

    def user_key(self, user_id: str) -> str:
        return "sg:u:" + self.p("user", user_id)

    def event_key(self, event_id: str) -> str:
        return "sg:e:" + self.p("event", event_id)

    def entity_keys(self, ev: Event) -> tuple[str | None, str | None, str | None]:
        return ("sg:d:" + self.p("device", ev.device_id) if ev.device_id else None,
                "sg:i:" + self.p("ip", ev.ip) if ev.ip else None,
                "sg:p:" + self.p("prefix", ip_prefix(ev.ip)) if ev.ip else None)

    async def load(self, user_ids: list[str], entity_keys: list[str], event_ids: list[str] = ()
                   ) -> tuple[dict, dict, dict]:
        """Users (by id), entities (by key) and already-answered events (by id) in one round trip."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for u in user_ids:
                    pipe.hmget(self.user_key(u), *USER_FIELDS)
                if entity_keys:
                    pipe.mget(entity_keys)
                if event_ids:
                    pipe.mget([self.event_key(e) for e in event_ids])
                res = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis read failed: {type(e).__name__}: {e}") from None
        users = {u: self._decode_user(self.user_key(u), vals) for u, vals in zip(user_ids, res)}
        pos = len(user_ids)
        entities, raw_entities = {}, {}
        if entity_keys:
            for k, raw in zip(entity_keys, res[pos]):
                entities[k] = EntityContext.from_bytes(raw) if raw else EntityContext()
                raw_entities[k] = raw or b""
            pos += 1
        answered = {}
        if event_ids:
            answered = {e: json.loads(raw) for e, raw in zip(event_ids, res[pos]) if raw}
        return users, (entities, raw_entities), answered

    def _decode_user(self, key: str, vals) -> UserState:
        h, c, ctx, ring, pend, mv, n = vals
        H = self.hidden
        version = int(n or 0)
        if h is None or ctx is None:
            z = np.zeros(H, np.float32)
            return UserState(key, z, z.copy(), UserContext(), version=version)
        return UserState(key, np.frombuffer(h, np.float32).copy(), np.frombuffer(c, np.float32).copy(),
                         UserContext.from_bytes(ctx), json.loads(ring) if ring else [], _unpack_pending(pend),
                         mv.decode() if mv else "", version, version, True)

    async def save(self, users: list[UserState], entities: dict[str, EntityContext], expected_entities: dict,
                   responses: list[str]) -> int:
        """Compare-and-set write of a batch; returns the apply sequence number of its last event.

        `responses`: per event, the JSON to remember for idempotency ("" for none), with "seq":0
        to be replaced by the event's apply sequence number. Raises StateConflict if another writer
        got there first (nothing written), StateUnavailable if Redis fails.
        """
        keys = [SEQ_KEY] + [u.key for u in users] + list(entities) + [
            self.event_key(r_id) for r_id, _ in responses]
        argv: list = [len(users), len(entities), len(responses), self.ttl_s, self.dedupe_ttl_s]
        for st in users:
            argv += [str(st.version), st.h.astype(np.float32).tobytes(), st.c.astype(np.float32).tobytes(),
                     st.ctx.to_bytes(), json.dumps(st.ring[-self.ring_size:], separators=(",", ":")),
                     _pack_pending(st.pending), st.model_version, str(st.n)]
        for k, e in entities.items():
            argv += [expected_entities.get(k, b""), e.to_bytes()]
        argv += [resp for _, resp in responses]
        try:
            seq = await self._save(keys=keys, args=argv)
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis write failed: {type(e).__name__}: {e}") from None
        if seq == -1:
            raise StateConflict("state changed since it was read")
        return int(seq)

    async def get_user(self, user_id: str) -> UserState:
        users, _, _ = await self.load([user_id], [])
        return users[user_id]

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.r.aclose()
