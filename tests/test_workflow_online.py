"""Holds and alerts on the live path, real Redis + real Triton (issue #21 parts 3 and 4).

* A held user (or device) gets at least the hold's action on every event, with a HOLD reason first;
  release ends it; the audit stream shows both.
* Alerts are written in the same atomic write as the state: one per applied REVIEW / CHALLENGE /
  BLOCK decision, its alert_id the event's sequence number, none for a retry, none for a fallback
  answer, only pseudonymised ids unless the deployment opted in.
"""
import json

import pytest

from seqguard.gateway.alerts import AlertRecord
from seqguard.gateway.proto import risk_pb2

pytestmark = pytest.mark.slow
T0 = 1767225600000


@pytest.fixture(scope="module")
def gateway(small_model, redis_server, triton, gateway_factory):
    return gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                           deadline_ms=2000, triton_timeout_ms=2000)


def _ev(user, k, device="d-home", event_type="view_item"):
    return risk_pb2.Event(event_id=f"{user}-{k}", user_id=user, ts=T0 + 60_000 * k, event_type=event_type,
                          device_id=device, ip="10.2.3.4", country="DE")


def _alerts(r):
    return [AlertRecord.from_fields(fields) for _, fields in r.xrange("sg:alerts")]


def test_hold_sticks_until_released_and_is_audited(stub, redis_server):
    r = redis_server.client()
    r.flushall()
    baseline = [stub.Score(risk_pb2.ScoreRequest(event=_ev("held-u", k)), timeout=5) for k in range(3)]
    assert all(b.action == risk_pb2.ALLOW for b in baseline)
    stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_USER, id="held-u", action=risk_pb2.CHALLENGE,
                                         reason="chargeback on order 17", who="analyst-7", ttl_s=3600), timeout=5)
    held = [stub.Score(risk_pb2.ScoreRequest(event=_ev("held-u", k)), timeout=5) for k in range(3, 6)]
    for h in held:
        assert h.status == risk_pb2.OK and h.action >= risk_pb2.CHALLENGE
        assert h.reasons[0].code == "HOLD" and "chargeback" in h.reasons[0].message
    # a device hold reaches every account on that device
    stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_DEVICE, id="d-shared", action=risk_pb2.BLOCK,
                                         reason="device in a fraud ring", who="rule:ring", ttl_s=600), timeout=5)
    other = stub.Score(risk_pb2.ScoreRequest(event=_ev("other-u", 0, device="d-shared")), timeout=5)
    assert other.action == risk_pb2.BLOCK and other.reasons[0].code == "HOLD"
    ack = stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="held-u", who="analyst-7",
                                                       reason="customer verified"), timeout=5)
    assert ack.released
    after = stub.Score(risk_pb2.ScoreRequest(event=_ev("held-u", 6)), timeout=5)
    assert after.action == risk_pb2.ALLOW and all(x.code != "HOLD" for x in after.reasons)
    audit = [(f[b"op"], f[b"who"]) for _, f in r.xrange("sg:audit")]
    assert (b"set", b"analyst-7") in audit and (b"release", b"analyst-7") in audit
    # every held decision raised an alert, in the same write as its state
    alerts = {a.alert_id: a for a in _alerts(r)}
    for h in held + [other]:
        a = alerts[str(h.sequence)]
        assert a.action == risk_pb2.Action.Name(h.action) and "HOLD" in a.reasons and a.user_raw is None
    assert str(after.sequence) not in alerts and not any(str(b.sequence) in alerts for b in baseline)


def test_alert_exists_iff_decision_applied(stub, redis_server):
    r = redis_server.client()
    r.flushall()
    stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_USER, id="rev-u", action=risk_pb2.REVIEW,
                                         reason="manual review", who="analyst-1", ttl_s=600), timeout=5)
    batch = [_ev("rev-u", k) for k in range(5)] + [_ev("calm-u", k) for k in range(5)]
    rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=batch), timeout=10)
    flagged = [x for x in rep.results if x.action != risk_pb2.ALLOW]
    assert len(flagged) >= 5
    alerts = _alerts(r)
    assert sorted(a.alert_id for a in alerts) == sorted(str(x.sequence) for x in flagged)
    # a retry of the same events changes nothing and raises no new alert
    stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=batch), timeout=10)
    assert len(_alerts(r)) == len(alerts)
    # identifiers in alerts are keyed hashes, never the raw ids
    blob = json.dumps([list(f.values()) for _, f in r.xrange("sg:alerts")], default=lambda b: b.decode())
    assert "rev-u" not in blob and "calm-u" not in blob
