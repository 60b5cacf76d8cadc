"""Per-user and per-entity state in Redis, one round trip to read a batch and one to write it.

Keys are pseudonymised with a keyed hash (HMAC-SHA256) of the identifier, so neither Redis nor
the logs ever hold a raw user id, device id or IP:

    sg:u:<hmac(user)>    hash: h, c (float32 LSTM state), ctx (UserContext bytes),
                         ring (recent events), mv (model version), n (events applied)
    sg:d:/sg:i:/sg:p:<hmac(device | ip | ip prefix)>   EntityContext bytes

Every key has a TTL, refreshed on write.
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


class StateUnavailable(RuntimeError):
    """Redis could not be read or written in time; the caller degrades explicitly."""


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
    model_version: str = ""
    n: int = 0
    existed: bool = False


class RedisStateStore:
    def __init__(self, client: aioredis.Redis, pseudonymize: Pseudonymizer, hidden: int, ttl_s: int,
                 ring_size: int = 8):
        self.r = client
        self.p = pseudonymize
        self.hidden = hidden
        self.ttl_s = ttl_s
        self.ring_size = ring_size

    @classmethod
    def from_settings(cls, s, hidden: int) -> "RedisStateStore":
        client = aioredis.Redis(host=s.redis_host, port=s.redis_port, db=s.redis_db,
                                username=s.redis_username or None, password=s.redis_password or None,
                                socket_timeout=s.redis_timeout_ms / 1000, socket_connect_timeout=s.redis_timeout_ms / 1000,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)  # fail fast: we degrade
        return cls(client, Pseudonymizer(s.key_bytes()), hidden, s.state_ttl_s, s.recent_events)

    def user_key(self, user_id: str) -> str:
        return "sg:u:" + self.p("user", user_id)

    def entity_keys(self, ev: Event) -> tuple[str | None, str | None, str | None]:
        return ("sg:d:" + self.p("device", ev.device_id) if ev.device_id else None,
                "sg:i:" + self.p("ip", ev.ip) if ev.ip else None,
                "sg:p:" + self.p("prefix", ip_prefix(ev.ip)) if ev.ip else None)

    async def load(self, user_ids: list[str], entity_keys: list[str]) -> tuple[dict, dict]:
        """Read users (by id) and entities (by key) in one pipelined round trip."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for u in user_ids:
                    pipe.hmget(self.user_key(u), "h", "c", "ctx", "ring", "mv", "n")
                if entity_keys:
                    pipe.mget(entity_keys)
                res = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis read failed: {type(e).__name__}: {e}") from None
        users = {}
        for u, vals in zip(user_ids, res):
            users[u] = self._decode_user(self.user_key(u), vals)
        entities = {}
        if entity_keys:
            for k, raw in zip(entity_keys, res[len(user_ids)]):
                entities[k] = EntityContext.from_bytes(raw) if raw else EntityContext()
        return users, entities

    def _decode_user(self, key: str, vals) -> UserState:
        h, c, ctx, ring, mv, n = vals
        H = self.hidden
        if h is None or ctx is None:
            z = np.zeros(H, np.float32)
            return UserState(key, z, z.copy(), UserContext())
        return UserState(key, np.frombuffer(h, np.float32).copy(), np.frombuffer(c, np.float32).copy(),
                         UserContext.from_bytes(ctx), json.loads(ring) if ring else [],
                         mv.decode() if mv else "", int(n or 0), True)

    async def save(self, users: list[UserState], entities: dict[str, EntityContext]) -> None:
        """Write users and entities back in one pipelined round trip (MULTI/EXEC: all or nothing)."""
        try:
            async with self.r.pipeline(transaction=True) as pipe:
                for st in users:
                    pipe.hset(st.key, mapping={
                        "h": st.h.astype(np.float32).tobytes(), "c": st.c.astype(np.float32).tobytes(),
                        "ctx": st.ctx.to_bytes(), "ring": json.dumps(st.ring[-self.ring_size:], separators=(",", ":")),
                        "mv": st.model_version, "n": st.n})
                    pipe.expire(st.key, self.ttl_s)
                for k, e in entities.items():
                    pipe.set(k, e.to_bytes(), ex=self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis write failed: {type(e).__name__}: {e}") from None

    async def get_user(self, user_id: str) -> UserState:
        users, _ = await self.load([user_id], [])
        return users[user_id]

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.r.aclose()
