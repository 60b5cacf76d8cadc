"""Issue #18 part 1: a user must never get stuck in DEGRADED because of how its state was written.

The reproduction (real Redis + real Triton): e1 scored for user A; a ScoreBatch with e1 under user B
plus a fresh event of user C; then any new event of B. Before the fix, B was written with an empty
head (n = 0) although none of its events was applied, the next compare-and-set expected "no key",
read eight zero bytes and was refused on every attempt until the deadline, for up to the state TTL.
Idempotency keys are scoped to the user: an event id answers only for the user it was sent for, so
e1 under B is B's own event and gets its own score (README, "The gRPC API").
"""
import pytest

from seqguard.gateway.proto import risk_pb2

pytestmark = pytest.mark.slow

T0 = 1767225600000


@pytest.fixture(scope="module")
def gateway(small_model, redis_server, triton, gateway_factory):
    return gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                           deadline_ms=1500, triton_timeout_ms=1000)


def _ev(event_id, user, k, event_type="login"):
    return risk_pb2.Event(event_id=event_id, user_id=user, ts=T0 + k * 60_000, event_type=event_type,
                          device_id=f"dev-{user}", ip="10.9.8.7", country="DE")


def _engine(gateway):
    engine = gateway.gateway.coalescer.engine
    return getattr(engine, "_inner", engine)            # the ScoringEngine behind the metrics proxy


def test_cross_user_duplicate_id_does_not_wedge_the_other_user(stub, gateway, redis_server):
    redis_server.client().flushall()
    conflicts_before = _engine(gateway).conflicts
    a = stub.Score(risk_pb2.ScoreRequest(event=_ev("e1", "user-a", 0)), timeout=5)
    assert a.status == risk_pb2.OK
    batch = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[_ev("e1", "user-b", 1), _ev("c-1", "user-c", 1)]),
                            timeout=5)
    assert [r.status for r in batch.results] == [risk_pb2.OK, risk_pb2.OK]
    # e1 under B is B's own event: scored and applied, not A's answer replayed
    assert "duplicate" not in batch.results[0].status_detail
    assert batch.results[0].sequence not in (0, a.sequence)
    for k in range(2, 5):
        r = stub.Score(risk_pb2.ScoreRequest(event=_ev(f"b-{k}", "user-b", k)), timeout=5)
        assert r.status == risk_pb2.OK, r.status_detail
    assert stub.GetUserState(risk_pb2.UserStateRequest(user_id="user-b"), timeout=5).n_events == 4
    assert _engine(gateway).conflicts == conflicts_before          # no write was refused on the way
    # the same id for the same user IS a retry: the original answer, nothing applied again
    again = stub.Score(risk_pb2.ScoreRequest(event=_ev("e1", "user-b", 1)), timeout=5)
    assert again.sequence == batch.results[0].sequence and "duplicate" in again.status_detail
    assert stub.GetUserState(risk_pb2.UserStateRequest(user_id="user-b"), timeout=5).n_events == 4


def test_user_seen_only_through_retries_is_not_written(stub, redis_server):
    """A batch that applies nothing for a user (only retried ids) must not store that user at all."""
    r = redis_server.client()
    r.flushall()
    first = stub.Score(risk_pb2.ScoreRequest(event=_ev("r-1", "user-r", 0)), timeout=5)
    user_keys = set(r.keys("sg:u:*"))
    r.delete(*user_keys)                                   # evicted (maxmemory) or deleted by hand
    # a retry of the evicted user's event together with another user's fresh event
    rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[_ev("r-1", "user-r", 0), _ev("s-1", "user-s", 0)]),
                          timeout=5)
    assert rep.results[0].sequence == first.sequence and rep.results[1].status == risk_pb2.OK
    assert not (set(r.keys("sg:u:*")) & user_keys)         # the retried user was not written back empty
    nxt = stub.Score(risk_pb2.ScoreRequest(event=_ev("r-2", "user-r", 1)), timeout=5)
    assert nxt.status == risk_pb2.OK, nxt.status_detail


def test_evicted_user_key_recovers(stub, redis_server):
    """A user key that disappears between two events (eviction, DEL) starts afresh, never wedges."""
    r = redis_server.client()
    r.flushall()
    for k in range(3):
        assert stub.Score(risk_pb2.ScoreRequest(event=_ev(f"v-{k}", "user-v", k)), timeout=5).status == risk_pb2.OK
    r.delete(*r.keys("sg:u:*"))
    for k in range(3, 6):
        res = stub.Score(risk_pb2.ScoreRequest(event=_ev(f"v-{k}", "user-v", k)), timeout=5)
        assert res.status == risk_pb2.OK, res.status_detail
    assert stub.GetUserState(risk_pb2.UserStateRequest(user_id="user-v"), timeout=5).n_events == 3
