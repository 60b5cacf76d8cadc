"""ReportOutcome with a real Redis: validation names the field, labels are stored pseudonymised with a
TTL and appended to the export stream, joined with the gateway's answer when it still remembers it.
(No Triton: a DEGRADED answer is remembered like any other, which is all this needs.)"""
import json

import grpc
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.gateway.state import Pseudonymizer
from seqguard.services import free_port

KEY = "test-pseudonym-key-0123456789"


@pytest.fixture(scope="module")
def stub(small_model, redis_server, gateway_factory):
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, pseudonym_key=KEY,
                         triton_url=f"127.0.0.1:{free_port()}", triton_timeout_ms=100, outcome_ttl_s=3600)
    with grpc.insecure_channel(gw.address) as ch:
        yield risk_pb2_grpc.RiskScoringStub(ch)


@pytest.mark.parametrize("req, field", [
    (dict(event_id="", label=risk_pb2.FRAUD), "event_id"),
    (dict(event_id="x" * 300, label=risk_pb2.FRAUD), "event_id"),
    (dict(event_id="e1", label=risk_pb2.LABEL_UNSPECIFIED), "label"),
    (dict(event_id="e1", label=7), "label"),
    (dict(event_id="e1", label=risk_pb2.FRAUD, family="f" * 65), "family"),
    (dict(event_id="e1", label=risk_pb2.FRAUD, family="bad\nline"), "family"),
])
def test_invalid_outcome_is_rejected_and_writes_nothing(stub, redis_server, req, field):
    r = redis_server.client()
    r.flushall()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ReportOutcome(risk_pb2.OutcomeRequest(**req), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"field '{field}'" in exc.value.details()
    assert r.dbsize() == 0


def test_outcome_stored_with_ttl_and_streamed(stub, redis_server):
    r = redis_server.client()
    r.flushall()
    ev = risk_pb2.Event(event_id="pay-42", user_id="alice", event_type="payment", ts=1767225600000, amount=99.0)
    scored = stub.Score(risk_pb2.ScoreRequest(event=ev), timeout=10)
    ack = stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id="pay-42", label=risk_pb2.FRAUD, family="card_testing",
                                                     user_id="alice"), timeout=10)
    assert ack.scored and ack.model_version == scored.model_version and ack.risk == pytest.approx(scored.risk)
    unknown = stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id="never-scored", label=risk_pb2.GENUINE), timeout=10)
    assert not unknown.scored

    h = Pseudonymizer(KEY.encode())("event", "pay-42")
    stored = json.loads(r.get(f"sg:o:{h}"))
    assert stored["label"] == "FRAUD" and stored["family"] == "card_testing" and stored["mv"] == scored.model_version
    assert 3500 < r.ttl(f"sg:o:{h}") <= 3600
    entries = r.xrange("sg:outcomes")
    assert [e[1][b"label"] for e in entries] == [b"FRAUD", b"GENUINE"]
    assert entries[0][1][b"event"] == h.encode()
    # pseudonymised: the raw event id appears in no key and no stream entry
    assert not [k for k in r.keys("*") if b"pay-42" in k]
    assert not [e for e in entries if b"pay-42" in b"".join(e[1].values())]
    # reporting again overwrites the label and appends to the stream
    stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id="pay-42", label=risk_pb2.GENUINE), timeout=10)
    assert json.loads(r.get(f"sg:o:{h}"))["label"] == "GENUINE"
    assert r.xlen("sg:outcomes") == 3
    # event ids are idempotency keys within a user: the same id reported for another user, or
    # without the user, joins no answer
    for user in ("bob", None):
        other = stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id="pay-42", label=risk_pb2.FRAUD, user_id=user),
                                   timeout=10)
        assert not other.scored


def test_outcome_unavailable_when_redis_down(small_model, gateway_factory):
    gw = gateway_factory(model_dir=str(small_model), redis_port=free_port(), redis_timeout_ms=50,
                         triton_url=f"127.0.0.1:{free_port()}")
    with grpc.insecure_channel(gw.address) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            risk_pb2_grpc.RiskScoringStub(ch).ReportOutcome(
                risk_pb2.OutcomeRequest(event_id="e", label=risk_pb2.FRAUD), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    gw.stop()
