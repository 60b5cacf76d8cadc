"""Bulk RPCs (ScoreBatch, Ingest) run under their own budget, settings.bulk_deadline_ms, not the
online one (deadline_ms, meant for one checkout Score).

The bug: a bulk replay on the Triton stack answered most ScoreBatch events `DEGRADED: deadline of
250 ms exceeded` although every event was applied, and Ingest's summary could not say what was
applied. Here the gateway runs with deadline_ms=1 (no Score can finish in time) and a large bulk
budget, with real Redis and a real Triton: bulk work that takes far longer than deadline_ms answers
OK with every event applied, Score still answers DEGRADED within its own deadline, and an online
Score in the queue never hands its deadline to bulk events (nor they their size to it).
"""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from seqguard.gateway.coalescer import Coalescer
from seqguard.gateway.proto import risk_pb2
from seqguard.gateway.result import ScoreResult
from seqguard.gateway.settings import Settings
from seqguard.gateway.triton_client import TritonStepClient
from seqguard.schema import Event

TYPES = ("login", "search", "view_item", "add_to_cart", "logout")


def _events(tag: str, users: int, per_user: int, t0: int = 1767800000000) -> list[risk_pb2.Event]:
    """per_user events of each of `users` users, interleaved in time (so waves hold many rows)."""
    return [risk_pb2.Event(event_id=f"{tag}-{u}-{k}", user_id=f"{tag}-u{u}", event_type=TYPES[k % len(TYPES)],
                           ts=t0 + k * 60_000 + u, device_id=f"{tag}-d{u}", ip=f"10.{u % 200}.{k % 7}.1")
            for k in range(per_user) for u in range(users)]


# ------------------------------------------------------------------ with real Redis and Triton
@pytest.fixture(scope="module")
def gateway(small_model, redis_server, triton, gateway_factory):
    # deadline_ms=1: every Score misses it; the bulk budget is what ScoreBatch and Ingest get
    return gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                           deadline_ms=1, bulk_deadline_ms=30_000)


def _applied(redis_server) -> int:
    """Redis' apply counter (events applied so far). Not GetUserState: it runs under deadline_ms too."""
    return int(redis_server.client().get("sg:seq") or 0)


@pytest.mark.slow
def test_score_batch_longer_than_deadline_ms_answers_ok(stub, redis_server):
    evs = _events("sb", 40, 10)
    before = _applied(redis_server)
    t = time.perf_counter()
    rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=evs), timeout=60)
    took = time.perf_counter() - t
    assert took > 0.001                                      # far longer than deadline_ms
    assert [r.event_id for r in rep.results] == [e.event_id for e in evs]
    bad = [r.status_detail for r in rep.results if r.status != risk_pb2.OK]
    assert not bad, f"{len(bad)} of {len(evs)} not OK, e.g. {bad[0]}"
    assert all(r.sequence > 0 for r in rep.results)          # every event applied, and the answer says so
    assert _applied(redis_server) - before == len(evs)


@pytest.mark.slow
def test_ingest_longer_than_deadline_ms_accepts_every_event(stub, redis_server):
    evs = _events("ing", 60, 10)                             # 600 events: three chunks of <= 256
    before = _applied(redis_server)
    summary = stub.Ingest(iter(evs), timeout=60)
    assert (summary.accepted, summary.rejected, summary.not_applied) == (len(evs), 0, 0), summary.errors
    assert not summary.not_applied_event_ids and not summary.errors
    assert _applied(redis_server) - before == len(evs)


@pytest.mark.slow
def test_score_still_degrades_within_its_own_deadline(stub, redis_server):
    before = _applied(redis_server)
    ev = risk_pb2.Event(event_id="online-1", user_id="online-user", event_type="login", ts=1767900000000)
    t = time.perf_counter()
    r = stub.Score(risk_pb2.ScoreRequest(event=ev), timeout=5)
    assert time.perf_counter() - t < 0.5
    assert r.status == risk_pb2.DEGRADED and "deadline of 1 ms exceeded" in r.status_detail
    assert r.action == risk_pb2.ALLOW and r.sequence == 0    # the outcome is unknown to the caller ...
    deadline = time.time() + 10                              # ... but its batch still applies it
    while _applied(redis_server) == before and time.time() < deadline:
        time.sleep(0.05)
    assert _applied(redis_server) - before == 1


@pytest.mark.slow
def test_bulk_events_never_take_a_concurrent_scores_deadline(stub):
    """Scores (deadline 1 ms) sent while ScoreBatches run: none of the bulk events is DEGRADED."""
    batches = [_events(f"mix{i}", 30, 4) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stub.ScoreBatch, risk_pb2.ScoreBatchRequest(events=b), timeout=60) for b in batches]
        online = [stub.Score.future(risk_pb2.ScoreRequest(event=risk_pb2.Event(
            event_id=f"mix-online-{k}", user_id=f"mix-online-{k}", event_type="login", ts=1767900000000)), timeout=5)
            for k in range(40)]
        reps = [f.result() for f in futs]
    assert all(o.result().status == risk_pb2.DEGRADED for o in online)
    bad = [r.status_detail for rep in reps for r in rep.results if r.status != risk_pb2.OK]
    assert not bad, f"{len(bad)} bulk answers not OK, e.g. {bad[0]}"


# ------------------------------------------------------------------ settings
def test_bulk_deadline_setting_is_validated():
    assert Settings().bulk_deadline_ms >= 1000                # seconds, not the online 250 ms
    with pytest.raises(ValueError, match="bulk_deadline_ms"):
        Settings.load(bulk_deadline_ms=0)


# ------------------------------------------------------------------ the coalescer keeps the lanes apart
class _Engine:
    class store:                                                # noqa: N801 - the engine's store attribute
        @staticmethod
        def entity_keys(e):
            return (None, None, None)

    def __init__(self):
        self.batches = []                                       # ([event ids], deadline)

    async def score(self, events, deadline=None, explain_reasons=True):
        await asyncio.sleep(0.01)
        self.batches.append(([e.event_id for e in events], deadline))
        return [ScoreResult(e.event_id, 0.0, "ALLOW", "test") for e in events]

    async def stop(self):
        pass


def test_coalescer_never_merges_online_and_bulk_items_and_keeps_fifo():
    ev = lambda i: Event(f"e{i}", f"u{i % 2}", 1767225600000 + i, "view_item")  # noqa: E731 - two users

    async def main():
        eng = _Engine()
        co = Coalescer(eng, max_events=256)
        co.start()
        calls = [co.submit([ev(0)], 1.0), co.submit([ev(1)], 2.0),                       # online
                 co.submit([ev(2), ev(3)], 100.0, bulk=True), co.submit([ev(4)], 90.0, bulk=True),
                 co.submit([ev(5)], 3.0)]                                               # online again
        res = await asyncio.gather(*calls)
        await co.stop()
        return eng, res
    eng, res = asyncio.run(main())
    assert eng.batches == [(["e0", "e1"], 1.0), (["e2", "e3", "e4"], 90.0), (["e5"], 3.0)]
    assert [r.event_id for rs in res for r in rs] == [f"e{i}" for i in range(6)]


# ------------------------------------------------------------------ the Triton call's timeout
@pytest.mark.parametrize("rows, left, expected", [
    (1, None, 0.1), (1, 5.0, 0.1), (1, 0.05, 0.05),            # online: an outage is seen within triton_timeout_ms
    (256, 5.0, 0.4), (1024, 5.0, 1.6), (1024, 0.3, 0.3),       # a wave: scales with its rows, the deadline caps it
])
def test_triton_step_timeout_scales_with_rows_capped_by_deadline(rows, left, expected):
    async def main():
        client = TritonStepClient("127.0.0.1:1", "m", timeout_ms=100)
        try:
            return client.call_timeout(rows, left)
        finally:
            await client.close()
    assert asyncio.run(main()) == pytest.approx(expected)

