"""RedisStateStore against a real Redis: the one-MGET read maps users, entities and answered events back
correctly, a legacy (hash) user key reads as a fresh user and is replaced by the compare-and-set write."""
import asyncio

import numpy as np
import redis.asyncio as aioredis

from gateway.state import Pseudonymizer, RedisStateStore, ring_entry
from seqguard.featurizer import EntityContext
from seqguard.schema import Event


def test_load_save_roundtrip_and_legacy_hash_key(redis_server):
    async def run():
        r = aioredis.Redis(port=redis_server.port)
        store = RedisStateStore(r, Pseudonymizer(b"t" * 32), hidden=4, ttl_s=60, ring_size=4, rebuild_steps=2)
        ev = Event(event_id="ss-e1", user_id="ss-u1", event_type="login", ts=1, device_id="ss-d", ip="10.1.2.3")
        legacy = store.user_key("ss-u2")
        await r.hset(legacy, mapping={"n": "7", "mv": "old"})          # format-1 state of another user
        ents = [k for k in store.entity_keys(ev) if k]
        users, (entities, raw), answered = await store.load(["ss-u1", "ss-u2"], ents, ["ss-e1"])
        assert not users["ss-u1"].existed and not users["ss-u2"].existed and answered == {}
        assert set(entities) == set(ents) and all(v == b"" for v in raw.values())
        for st in users.values():
            st.h = np.arange(4, dtype=np.float32)
            st.n, st.model_version = 1, "mv1"
            st.ring.append(ring_entry(ev.event_id, ev.event_type, ev.ts, np.ones(40, np.float32)))
        entities[ents[0]] = EntityContext()
        seq = await store.save(list(users.values()), entities, raw, [("ss-e1", '{"risk":0.5,"seq":0}')])
        users2, (entities2, raw2), answered2 = await store.load(["ss-u2", "ss-u1"], ents[::-1], ["nope", "ss-e1"])
        assert list(users2) == ["ss-u2", "ss-u1"] and all(u.existed and u.n == 1 for u in users2.values())
        assert users2["ss-u2"].key == legacy and await r.type(legacy) == b"string"   # the hash was replaced
        np.testing.assert_array_equal(users2["ss-u1"].h, np.arange(4, dtype=np.float32))
        assert users2["ss-u1"].ring[0].event_id == "ss-e1"
        assert raw2 == {k: entities[k].to_bytes() for k in ents}
        assert answered2 == {"ss-e1": {"risk": 0.5, "seq": seq}}
        await r.aclose()
    asyncio.run(run())
