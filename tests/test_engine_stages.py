"""The engine's batch stages run one at a time: featurise -> encode -> detect on batches built in
memory (no Redis, the artifact's model.onnx in process instead of Triton) give the scores of
`seqguard score-file`, and commit against a real Redis applies a batch once and refuses a stale one."""
import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.featurizer import EntityContext, UserContext
from seqguard.gateway.engine import ScoringEngine
from seqguard.gateway.local_encoder import LocalStepEncoder
from seqguard.gateway.codec import UserState
from seqguard.gateway.state import BatchRead, Pseudonymizer, RedisStateStore, StateConflict

KEY = b"stage-test-key-0123456789abcdef"


def _engine(model_dir, client) -> ScoringEngine:
    art = ModelArtifact.load(model_dir)
    store = RedisStateStore(client, Pseudonymizer(KEY), art.hidden, ttl_s=600)
    return ScoringEngine(art, store, LocalStepEncoder(str(art.onnx_path)))


def test_featurise_encode_detect_without_redis_equal_offline(small_model, small_log):
    """The stages alone, over user and entity states kept in dicts between batches, score a log's
    first events exactly as the offline replay does (a prefix of a log scores as in the whole log)."""
    events = list(read_events_sorted(small_log[0]))[:1500]
    offline, _, _ = score_events(ModelArtifact.load(small_model), events)
    # never connects: the stages under test do not touch Redis
    engine = _engine(small_model, aioredis.Redis(port=1))
    users: dict[str, UserState] = {}
    entities: dict[str, EntityContext] = {}
    online = []

    async def run():
        for a in range(0, len(events), 250):
            chunk = events[a:a + 250]
            ent_keys = [engine.store.entity_keys(e) for e in chunk]
            for u in dict.fromkeys(e.user_id for e in chunk):
                users.setdefault(u, UserState(engine.store.user_key(u), np.zeros(engine.hidden, np.float32),
                                              np.zeros(engine.hidden, np.float32), UserContext()))
            keys = list(dict.fromkeys(k for ks in ent_keys for k in ks if k))
            read = BatchRead({e.user_id: users[e.user_id] for e in chunk},
                             {k: entities.setdefault(k, EntityContext()) for k in keys}, {k: b"" for k in keys}, {}, [])
            batch = engine.prepare(chunk, ent_keys, [[] for _ in chunk], read, {})
            engine.featurise(batch)
            assert batch.feats.shape == (len(chunk), engine.n_features)
            await engine.encode(batch, lambda: None)
            assert batch.encoded is not None and batch.rows == list(range(len(chunk)))
            decided = engine.detect(batch)
            online.extend(decided.out[i].risk for i in range(len(chunk)))
            assert all(decided.out[i].status == "OK" for i in range(len(chunk)))
    asyncio.run(run())
    assert np.abs(np.asarray(online) - offline).max() <= 1e-5
    assert sum(st.n for st in users.values()) == len(events)


def read_events_sorted(path):
    from seqguard.schema import read_events
    evs = list(read_events(str(path)))
    return [evs[i] for i in sorted(range(len(evs)), key=lambda i: (evs[i].ts, i))]


def test_commit_applies_a_batch_once_and_refuses_a_stale_one(small_model, small_log, redis_server):
    log = read_events_sorted(small_log[0])
    first = log[:20]
    stale_events = [e for e in log[20:] if e.user_id in {f.user_id for f in first}][:20]   # shares users

    async def run():
        client = aioredis.Redis(port=redis_server.port)
        await client.flushall()
        engine = _engine(small_model, client)

        async def scored(evs):
            batch = await engine.load(evs)
            engine.featurise(batch)
            await engine.encode(batch, lambda: None)
            return batch, engine.detect(batch)

        stale = await scored(stale_events)           # read before the first batch is written
        batch, decided = await scored(first)
        await engine.commit(batch, decided)
        assert [decided.out[i].sequence for i in range(20)] == list(range(1, 21))
        again = await engine.load(first)                 # now remembered: nothing to apply
        assert again.fresh == [] and len(again.read.answered) == 20
        assert {u: st.n for u, st in again.users.items()} == {u: st.n for u, st in batch.users.items()}
        with pytest.raises(StateConflict):
            await engine.commit(*stale)
        assert int(await client.get(engine.store.seq_key)) == 20    # the refused write used no sequence number
        await client.aclose()
    asyncio.run(run())
