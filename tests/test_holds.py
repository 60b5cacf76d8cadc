"""Holds: apply_holds (the one rule, online and offline), the offline HoldIndex, and the SetHold /
ReleaseHold / ListHolds / GetUserState RPCs against a real redis-server (no Triton needed)."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from seqguard.gateway.holds import HOLD_REASON, Hold, HoldIndex, HoldStore, apply_holds
from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.gateway.state import Pseudonymizer
from seqguard.schema import Event
from seqguard.services import free_port

KEY = "test-pseudonym-key-0123456789"
P = Pseudonymizer(KEY.encode())


def hold(kind: str, action: str, reason: str = "r") -> Hold:
    return Hold(kind, "0" * 32, action, reason, "tester", 0, 10**13)


def ev(i: int, ts: int, user="alice", device=None, ip=None) -> Event:
    return Event(event_id=f"e{i}", user_id=user, ts=ts, event_type="payment", device_id=device, ip=ip)


# ------------------------------------------------------------------ the rule
def test_apply_holds_raises_never_lowers_and_explains():
    actions, reasons = apply_holds(
        ["ALLOW", "BLOCK", "REVIEW", "ALLOW"],
        [[hold("user", "CHALLENGE", "chargeback")], [hold("user", "REVIEW")],
         [hold("device", "REVIEW"), hold("ip", "BLOCK", "botnet")], []])
    assert actions == ["CHALLENGE", "BLOCK", "BLOCK", "ALLOW"]
    assert [[r.code for r in rs] for rs in reasons] == [[HOLD_REASON], [HOLD_REASON], [HOLD_REASON] * 2, []]
    assert reasons[0][0].message == "user on hold (CHALLENGE): chargeback"
    assert reasons[2][0].message.startswith("ip on hold (BLOCK)")           # strongest hold first
    with pytest.raises(ValueError):
        apply_holds(["ALLOW"], [])                                           # one list of holds per event


def test_hold_index_replays_set_and_release_windows():
    audit = [
        {"op": "set", "kind": "user", "key": P("user", "alice"), "action": "CHALLENGE", "reason": "ato",
         "who": "a", "ts": "1000", "expires_ms": "9000"},
        {"op": "release", "kind": "user", "key": P("user", "alice"), "reason": "", "who": "b", "ts": "5000",
         "action": "CHALLENGE", "expires_ms": "9000"},
        {"op": "set", "kind": "device", "key": P("device", "d1"), "action": "BLOCK", "reason": "emulator",
         "who": "a", "ts": "2000", "expires_ms": "3000"},
    ]
    idx = HoldIndex.from_audit(reversed(audit), P)                           # any order: sorted by time
    events = [ev(0, 500), ev(1, 1000), ev(2, 2500, device="d1"), ev(3, 3000, device="d1"), ev(4, 5000),
              ev(5, 4000, user="bob")]
    got = [[(h.kind, h.action) for h in hs] for hs in idx.for_events(events)]
    assert got == [[], [("user", "CHALLENGE")], [("user", "CHALLENGE"), ("device", "BLOCK")],
                   [("user", "CHALLENGE")], [], []]


# ------------------------------------------------------------------ the store, directly
def test_store_finds_holds_for_a_batch_in_one_read(redis_server):
    r = redis_server.client()
    r.flushall()

    async def run():
        import redis.asyncio as aioredis
        client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
        store = HoldStore(client, P, "sg:")
        await store.set("device", raw_id="d1", action="BLOCK", reason="emulator farm", who="rule:emu", ttl_s=60)
        await store.set("ip", raw_id="10.0.0.9", action="REVIEW", reason="proxy", who="analyst", ttl_s=60)
        out = await store.for_events([ev(0, 1, device="d1"), ev(1, 1, user="bob", ip="10.0.0.9"),
                                      ev(2, 1, user="carol", device="d2", ip="10.0.0.8")])
        await client.aclose()
        return out
    out = asyncio.run(run())
    assert [[(h.kind, h.action) for h in hs] for hs in out] == [[("device", "BLOCK")], [("ip", "REVIEW")], []]


# ------------------------------------------------------------------ the RPCs
@pytest.fixture(scope="module")
def stub(small_model, redis_server, gateway_factory):
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, pseudonym_key=KEY,
                         triton_url=f"127.0.0.1:{free_port()}", triton_timeout_ms=100)
    with grpc.insecure_channel(gw.address) as ch:
        yield risk_pb2_grpc.RiskScoringStub(ch)


GOOD = dict(kind=risk_pb2.HOLD_USER, id="alice", action=risk_pb2.CHALLENGE, reason="chargeback on order 17",
            who="analyst-7", ttl_s=3600)


@pytest.mark.parametrize("change, field", [
    (dict(kind=risk_pb2.HOLD_KIND_UNSPECIFIED), "kind"), (dict(kind=9), "kind"), (dict(id=""), "id"),
    (dict(id="x" * 300), "id"), (dict(action=risk_pb2.ALLOW), "action"), (dict(action=0), "action"),
    (dict(reason=""), "reason"), (dict(reason="a\nb"), "reason"), (dict(reason="r" * 201), "reason"),
    (dict(who=""), "who"), (dict(who="w" * 65), "who"), (dict(ttl_s=0), "ttl_s"), (dict(ttl_s=10**9), "ttl_s"),
])
def test_invalid_hold_is_rejected_naming_the_field_and_writes_nothing(stub, redis_server, change, field):
    r = redis_server.client()
    r.flushall()
    with pytest.raises(grpc.RpcError) as exc:
        stub.SetHold(risk_pb2.SetHoldRequest(**{**GOOD, **change}), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"field '{field}'" in exc.value.details()
    assert r.dbsize() == 0


def test_hold_set_listed_visible_released_and_audited(stub, redis_server):
    r = redis_server.client()
    r.flushall()
    h = stub.SetHold(risk_pb2.SetHoldRequest(**GOOD), timeout=10)
    assert h.key == P("user", "alice") and h.action == risk_pb2.CHALLENGE and h.who == "analyst-7"
    assert h.expires_ms - h.created_ms == 3600 * 1000
    key = f"sg:h:user:{h.key}"
    assert 3590 < r.ttl(key) <= 3600 and json.loads(r.get(key))["reason"] == "chargeback on order 17"
    dev = stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_DEVICE, id="dev-1", action=risk_pb2.BLOCK,
                                               reason="emulator", who="rule:emulator", ttl_s=60), timeout=10)

    listed = stub.ListHolds(risk_pb2.ListHoldsRequest(), timeout=10).holds
    assert {(x.kind, x.key) for x in listed} == {(risk_pb2.HOLD_USER, h.key), (risk_pb2.HOLD_DEVICE, dev.key)}
    only_users = stub.ListHolds(risk_pb2.ListHoldsRequest(kind=risk_pb2.HOLD_USER), timeout=10).holds
    assert [x.key for x in only_users] == [h.key]
    state = stub.GetUserState(risk_pb2.UserStateRequest(user_id="alice"), timeout=10)
    assert [(x.key, x.action) for x in state.holds] == [(h.key, risk_pb2.CHALLENGE)]
    assert state.user_key == h.key                                    # the same pseudonym as the state key

    with pytest.raises(grpc.RpcError) as exc:
        stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="alice", key=h.key, who="x"),
                         timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "field 'id'" in exc.value.details()
    ack = stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="alice", who="analyst-9",
                                                       reason="customer verified"), timeout=10)
    assert ack.released and not r.exists(key)
    assert not stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="alice", who="analyst-9"),
                                timeout=10).released
    by_key = stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_DEVICE, key=dev.key, who="analyst-9"),
                              timeout=10)
    assert by_key.released and not stub.ListHolds(risk_pb2.ListHoldsRequest(), timeout=10).holds
    assert not stub.GetUserState(risk_pb2.UserStateRequest(user_id="alice"), timeout=10).holds

    audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("sg:audit")]
    assert [(a["op"], a["kind"], a["who"]) for a in audit] == [
        ("set", "user", "analyst-7"), ("set", "device", "rule:emulator"),
        ("release", "user", "analyst-9"), ("release", "device", "analyst-9")]
    assert audit[2]["reason"] == "customer verified" and audit[2]["key"] == h.key
    # pseudonymised: no raw id in any key or audit record
    assert not [k for k in r.keys("*") if b"alice" in k or b"dev-1" in k]
    assert not [a for a in audit if "alice" in a.values() or "dev-1" in a.values()]


def test_hold_rpcs_unavailable_when_redis_down(small_model, gateway_factory):
    gw = gateway_factory(model_dir=str(small_model), redis_port=free_port(), redis_timeout_ms=50,
                         triton_url=f"127.0.0.1:{free_port()}")
    with grpc.insecure_channel(gw.address) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            risk_pb2_grpc.RiskScoringStub(ch).SetHold(risk_pb2.SetHoldRequest(**GOOD), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    gw.stop()
