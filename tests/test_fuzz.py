"""Hostile input through the real gateway: every request gets a clean status, rejected ones write nothing."""
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.proto import risk_pb2, risk_pb2_grpc

pytestmark = pytest.mark.slow

text = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=250, max_size=400),
                 st.sampled_from(["login", "payment", "\u202e\u0000evil", "💳" * 10]))
amount = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e12))
ts = st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1), st.integers(1_600_000_000_000, 1_900_000_000_000))


@st.composite
def events(draw):
    d = dict(event_id=draw(text), user_id=draw(text), ts=draw(ts), event_type=draw(text))
    for f in ("item_id", "device_id", "ip", "country", "session_id"):
        v = draw(st.one_of(st.none(), text))
        if v is not None:
            d[f] = v
    a = draw(amount)
    if a is not None:
        d["amount"] = a
    return risk_pb2.Event(**d)


@pytest.fixture(scope="module")
def fuzz_gateway(small_model, redis_server, triton_server_factory, gateway_factory):
    tri = triton_server_factory(small_model / "model_repository")
    return gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=tri.grpc_url,
                           deadline_ms=2000, triton_timeout_ms=2000)


def _valid(e: risk_pb2.Event) -> bool:
    ok = all(0 < len(x) <= 256 for x in (e.event_id, e.user_id, e.event_type))
    ok &= 946_684_800_000 <= e.ts <= 4_102_444_800_000
    if e.HasField("amount"):
        ok &= math.isfinite(e.amount) and e.amount >= 0
    for f in ("item_id", "device_id", "ip", "country", "session_id"):
        if e.HasField(f):
            ok &= len(getattr(e, f)) <= 256
    return ok


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(events(), min_size=1, max_size=5))
def test_fuzzed_batches_get_clean_statuses(fuzz_gateway, redis_server, batch):
    r = redis_server.client()
    before = r.dbsize()
    with grpc.insecure_channel(fuzz_gateway.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        try:
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=batch), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert not all(_valid(x) for x in batch)          # only invalid input is rejected
            assert "events[" in e.details()
            assert r.dbsize() == before                       # nothing written for rejected input
            return
    assert all(_valid(x) for x in batch)
    assert [x.event_id for x in rep.results] == [x.event_id for x in batch]
    assert all(x.status in (risk_pb2.OK, risk_pb2.DEGRADED) and 0.0 <= x.risk <= 1.0 for x in rep.results)


def test_oversized_batch_is_rejected(fuzz_gateway):
    evs = [risk_pb2.Event(event_id=f"b{i}", user_id="u", ts=1767225600000, event_type="view_item")
           for i in range(10_000)]
    with grpc.insecure_channel(fuzz_gateway.address) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            risk_pb2_grpc.RiskScoringStub(ch).ScoreBatch(risk_pb2.ScoreBatchRequest(events=evs), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "events" in exc.value.details()
