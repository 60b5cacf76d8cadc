"""RedisStateStore against a real Redis: the one-MGET read maps users, entities and answered events back
correctly, and the compare-and-set write refuses stale batches."""
import asyncio

import numpy as np
import redis.asyncio as aioredis

from seqguard.gateway.codec import ring_entry
from seqguard.gateway.state import Pseudonymizer, RedisStateStore
from seqguard.featurizer import EntityContext
from seqguard.schema import Event


def test_load_save_roundtrip(redis_server):
    async def run():
        r = aioredis.Redis(port=redis_server.port)
        store = RedisStateStore(r, Pseudonymizer(b"t" * 32), hidden=4, ttl_s=60, ring_size=4, rebuild_steps=2)
        ev = Event(event_id="ss-e1", user_id="ss-u1", event_type="login", ts=1, device_id="ss-d", ip="10.1.2.3")
        await r.flushall()
        ents = [k for k in store.entity_keys(ev) if k]
        users, entities, raw, answered, _ = await store.load(["ss-u1", "ss-u2"], ents, [("ss-u1", "ss-e1")])
        assert not users["ss-u1"].existed and not users["ss-u2"].existed and answered == {}
        assert set(entities) == set(ents) and all(v == b"" for v in raw.values())
        for st in users.values():
            st.h = np.arange(4, dtype=np.float32)
            st.n, st.model_version = 1, "mv1"
            st.ring.append(ring_entry(ev.event_id, ev.event_type, ev.ts, np.ones(40, np.float32)))
            st.dirty = True
        entities[ents[0]] = EntityContext()
        seq = await store.save(list(users.values()), entities, raw, [(("ss-u1", "ss-e1"), '{"risk":0.5,"seq":0}')])
        users2, entities2, raw2, answered2, _ = await store.load(["ss-u2", "ss-u1"], ents[::-1],
                                                                  [("ss-u1", "nope"), ("ss-u2", "ss-e1"), ("ss-u1", "ss-e1")])
        assert list(users2) == ["ss-u2", "ss-u1"] and all(u.existed and u.n == 1 for u in users2.values())
        assert users2["ss-u2"].key == store.user_key("ss-u2")
        np.testing.assert_array_equal(users2["ss-u1"].h, np.arange(4, dtype=np.float32))
        assert users2["ss-u1"].ring[0].event_id == "ss-e1"
        assert raw2 == {k: entities[k].to_bytes() for k in ents}
        assert answered2 == {("ss-u1", "ss-e1"): {"risk": 0.5, "seq": seq}}   # scoped to its user
        await r.aclose()
    asyncio.run(run())


def test_compare_and_set_refuses_stale_writes_and_writes_nothing(redis_server):
    """The refused-write branch: a user or entity changed since it was read -> StateConflict, no key
    touched, no sequence number used; a key read as absent must still be absent; and a user stored
    with n = 0 is an existing version, not "absent"."""
    from seqguard.gateway.codec import UserState, pack_user
    from seqguard.gateway.state import StateConflict
    from seqguard.featurizer import UserContext

    async def run():
        r = aioredis.Redis(port=redis_server.port)
        await r.flushall()
        store = RedisStateStore(r, Pseudonymizer(b"t" * 32), hidden=4, ttl_s=60, ring_size=4, rebuild_steps=2)

        async def read(user):
            users = (await store.load([user], [])).users
            st = users[user]
            st.n += 1
            st.dirty = True
            return st

        # 1. two writers read the same absent user; the second write is refused
        first, second = await read("cas-u"), await read("cas-u")
        seq = await store.save([first], {}, {}, [(("cas-u", "e1"), '{"seq":0}')])
        try:
            await store.save([second], {}, {}, [(("cas-u", "e2"), '{"seq":0}')])
            raise AssertionError("a stale write was applied")
        except StateConflict:
            pass
        assert int(await r.get("sg:seq")) == seq and not await r.exists(store.event_key("cas-u", "e2"))
        # 2. an entity changed since it was read: refused, the user untouched
        ent = "sg:d:test-device"
        await r.set(ent, EntityContext().to_bytes())
        third = await read("cas-u")
        await r.set(ent, b"changed-by-another-gateway")
        try:
            await store.save([third], {ent: EntityContext()}, {ent: EntityContext().to_bytes()}, [])
            raise AssertionError("a write over a changed entity was applied")
        except StateConflict:
            pass
        assert (await store.get_user("cas-u")).n == 1 and await r.get(ent) == b"changed-by-another-gateway"
        # 3. a record with n = 0 reads as existing and is written over with that expectation
        zero = UserState(store.user_key("zero-u"), np.zeros(4, np.float32), np.zeros(4, np.float32), UserContext())
        await r.set(zero.key, pack_user(zero, 4, 2))
        st = await read("zero-u")
        assert st.existed and st.version == 0
        await store.save([st], {}, {}, [])
        assert (await store.get_user("zero-u")).n == 1
        await r.aclose()
    asyncio.run(run())


def test_no_raw_event_id_in_redis_and_the_ring_reads_back(redis_server):
    """Issue #18 part 6: event ids are caller identifiers: their keys are keyed hashes and the ring that
    names them (for reasons and GetUserState) is sealed with the pseudonymisation key. The same ring
    sealed twice looks different (fresh nonce); another key cannot read it."""
    from seqguard.gateway.codec import RingCipher, pack_user, unpack_user

    async def run():
        r = aioredis.Redis(port=redis_server.port)
        await r.flushall()
        store = RedisStateStore(r, Pseudonymizer(b"k" * 32), hidden=4, ttl_s=60, ring_size=4, rebuild_steps=2)
        st = (await store.load(["raw-user@example.com"], [])).users["raw-user@example.com"]
        for k in range(3):
            st.ring.append(ring_entry(f"order-4711-{k}", "payment", 1767225600000 + k, np.ones(40, np.float32)))
        st.n, st.dirty = 3, True
        await store.save([st], {}, {}, [(("raw-user@example.com", "order-4711-2"), '{"seq":0}')])
        dump = b""
        for k in await r.keys("*"):
            dump += k + ((await r.get(k) or b"") if await r.type(k) == b"string" else b"")
        assert b"order-4711" not in dump and b"raw-user" not in dump and b"payment" not in dump
        back = await store.get_user("raw-user@example.com")
        assert [e.event_id for e in back.ring] == [f"order-4711-{k}" for k in range(3)]
        one = pack_user(back, 4, 2, store.ring_cipher)
        assert one != pack_user(back, 4, 2, store.ring_cipher)            # a fresh nonce per write
        try:                                     # another key reads noise (or fails to parse it)
            other = [e.event_id for e in unpack_user(back.key, one, RingCipher(b"another-key" * 3)).ring]
        except (ValueError, IndexError, UnicodeDecodeError):
            other = None
        assert other != [e.event_id for e in back.ring]
        await r.aclose()
    asyncio.run(run())


def test_entity_keys_expire_with_their_windows_user_keys_with_the_state_ttl(redis_server):
    """Issue #22 part 6: a device/IP/prefix context lives ENTITY_TTL_S (the featuriser's idle reset plus
    a day), not the user TTL: an absent entity reads as the empty context the reset would give anyway."""
    from seqguard.featurizer import ENTITY_IDLE_RESET_MS
    from seqguard.gateway.state import ENTITY_TTL_S

    async def run():
        r = aioredis.Redis(port=redis_server.port)
        month = 30 * 86_400
        store = RedisStateStore(r, Pseudonymizer(b"x" * 32), hidden=4, ttl_s=month, ring_size=4, rebuild_steps=2)
        ev = Event(event_id="tt-e1", user_id="tt-u1", event_type="login", ts=1, device_id="tt-d", ip="10.9.2.3")
        ents = [k for k in store.entity_keys(ev) if k]
        users, entities, raw, _, _ = await store.load(["tt-u1"], ents, [])
        users["tt-u1"].n, users["tt-u1"].dirty = 1, True
        await store.save(list(users.values()), {k: EntityContext() for k in ents}, raw, [])
        assert month - 5 <= await r.ttl(store.user_key("tt-u1")) <= month
        for k in ents:
            assert ENTITY_TTL_S - 5 <= await r.ttl(k) <= ENTITY_TTL_S
        assert ENTITY_IDLE_RESET_MS // 1000 < ENTITY_TTL_S < month
        await r.aclose()
    asyncio.run(run())
