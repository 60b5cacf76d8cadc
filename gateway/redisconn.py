"""A Redis client and key prefix for the gateway's side services (alert sink, holds, review app).

The scoring path builds its own client (gateway/state.py: 50 ms timeouts, no retries, because it
degrades instead of waiting). The side services block on streams and serve people, so they get
longer timeouts, but the same connection settings and the same key prefix ("{sg}:" on Redis
Cluster, so their keys land in the one slot the gateway's atomic write uses).
"""
from __future__ import annotations

import redis.asyncio as aioredis

from .state import KEY_PREFIX


def key_prefix(settings) -> str:
    return "{sg}:" if settings.redis_cluster else KEY_PREFIX


def connect_redis(settings, timeout_s: float):
    """redis.asyncio client for `settings` (gateway.settings.Settings); `timeout_s` per command."""
    auth = dict(username=settings.redis_username or None, password=settings.redis_password or None)
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster
        return RedisCluster(host=settings.redis_host, port=settings.redis_port, **auth,
                            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return aioredis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db, **auth,
                          socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
