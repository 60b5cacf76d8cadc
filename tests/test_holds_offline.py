"""Holds online == offline (issue #21 part 4 acceptance): the gateway (real Redis + Triton) enforces
holds set and released between a user's events; an offline replay of the same log (score_events)
with the hold windows rebuilt from the audit stream (HoldIndex) and the same apply_holds gives
every event the same action."""
from __future__ import annotations

import time

import grpc
import pytest

from seqguard.gateway.holds import HoldIndex, apply_holds
from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.gateway.state import Pseudonymizer
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.detector import ACTIONS
from seqguard.schema import Event

pytestmark = pytest.mark.slow
KEY = "test-pseudonym-key-0123456789"


def _ev(user: str, k: int, ts: int, device: str) -> Event:
    return Event(event_id=f"{user}-{k}", user_id=user, ts=ts, event_type="view_item", device_id=device,
                 ip="10.1.2.3", country="DE")


def _msg(e: Event) -> risk_pb2.Event:
    return risk_pb2.Event(event_id=e.event_id, user_id=e.user_id, ts=e.ts, event_type=e.event_type,
                          device_id=e.device_id, ip=e.ip, country=e.country)


def phase(t: int, ks) -> list[Event]:
    """The three users' events k in ks, in time order (the order the gateway applies them: the
    users share an IP, so cross-user counters depend on it, offline as online)."""
    users = (("held", "d1"), ("ring", "d-ring"), ("calm", "d3"))
    return [_ev(u, k, t + 3 * (k - ks[0]) + j, dev) for k in ks for j, (u, dev) in enumerate(users)]


def test_holds_give_the_same_actions_online_and_in_offline_replay(small_model, redis_server, triton_server_factory,
                                                                   gateway_factory):
    r = redis_server.client()
    r.flushall()
    triton = triton_server_factory(small_model / "model_repository")
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                         deadline_ms=2000, triton_timeout_ms=2000, pseudonym_key=KEY)
    events, online = [], []
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)

        def send(batch):
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[_msg(e) for e in batch]), timeout=10)
            assert all(x.status == risk_pb2.OK for x in rep.results), [x.status_detail for x in rep.results]
            events.extend(batch)
            online.extend(risk_pb2.Action.Name(x.action) for x in rep.results)

        def now() -> int:
            return int(time.time() * 1000)

        send(phase(now() - 60_000, range(4)))                 # phase 1: before any hold
        stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_USER, id="held", action=risk_pb2.CHALLENGE,
                                             reason="chargeback", who="analyst-7", ttl_s=3600), timeout=5)
        stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_DEVICE, id="d-ring", action=risk_pb2.BLOCK,
                                             reason="fraud ring", who="rule:ring", ttl_s=3600), timeout=5)
        # phase 2, while held: event times after the holds were set and (the sleep) before the release
        send(phase(now() + 1, range(4, 8)))
        time.sleep(0.05)
        stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="held", who="analyst-7"),
                         timeout=5)
        send(phase(now() + 1, range(8, 12)))                  # phase 3: the user released, the device still held

    audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("sg:audit")]
    assert [a["op"] for a in audit] == ["set", "set", "release"]
    _, codes, _ = score_events(ModelArtifact.load(small_model), events)
    model_actions = [ACTIONS[c] for c in codes.tolist()]
    holds = HoldIndex.from_audit(audit, Pseudonymizer(KEY.encode())).for_events(events)
    offline, reasons = apply_holds(model_actions, holds)
    assert offline == online
    by = {(e.user_id, int(e.event_id.rsplit("-", 1)[1])): (a, rs) for e, a, rs in zip(events, offline, reasons)}
    order = ["ALLOW", "REVIEW", "CHALLENGE", "BLOCK"]
    for k in range(12):                                      # what the holds did, phase by phase
        held_action, held_reasons = by[("held", k)]
        ring_action, ring_reasons = by[("ring", k)]
        assert (order.index(held_action) >= 2) if 4 <= k < 8 else not held_reasons
        assert (ring_action == "BLOCK" and ring_reasons[0].code == "HOLD") if k >= 4 else not ring_reasons
        assert not by[("calm", k)][1]


def test_score_file_replays_exported_holds(small_model, redis_server, tmp_path):
    """The operator's path: `seqguard holds-export` writes the audit stream, `seqguard score-file
    --holds-audit` gives every event at least the action of the holds active at its time, like the
    gateway, and nothing outside the hold's window."""
    import asyncio
    import csv
    import json
    import os
    import subprocess
    import sys

    import redis.asyncio as aioredis

    from seqguard.gateway.holds import HoldStore

    r = redis_server.client()
    r.delete("sg:audit")
    now = int(time.time() * 1000)

    async def set_and_release():
        client = aioredis.Redis(port=redis_server.port)
        holds = HoldStore(client, Pseudonymizer(KEY.encode()), "sg:")
        await holds.set("user", raw_id="cli-held", action="BLOCK", reason="chargeback", who="analyst-2", ttl_s=600)
        await asyncio.sleep(0.05)
        await holds.release("user", raw_id="cli-held", who="analyst-2", reason="cleared")
        await client.aclose()
    asyncio.run(set_and_release())
    released = max(int(f[b"ts"]) for _, f in r.xrange("sg:audit"))
    log = tmp_path / "events.jsonl"
    ts = [now - 60_000, released - 10, released + 60_000]          # before, during, after the hold
    log.write_text("".join(json.dumps({"event_id": f"cli-{k}", "user_id": u, "ts": t, "event_type": "view_item"}) + "\n"
                           for k, (u, t) in enumerate([("cli-held", x) for x in ts] + [("cli-other", ts[1])])))
    env = dict(os.environ, SEQGUARD_REDIS_PORT=str(redis_server.port), SEQGUARD_PSEUDONYM_KEY=KEY)
    cli = [sys.executable, "-m", "seqguard.cli"]
    audit = tmp_path / "audit.jsonl"
    subprocess.run(cli + ["holds-export", "--out", str(audit)], env=env, check=True, capture_output=True, timeout=60)
    assert [json.loads(x)["op"] for x in audit.read_text().splitlines()] == ["set", "release"]
    out = tmp_path / "scores.csv"
    subprocess.run(cli + ["score-file", "--model", str(small_model), "--input", str(log), "--output", str(out),
                          "--holds-audit", str(audit), "--quiet"], env=env, check=True, capture_output=True, timeout=120)
    rows = {row["event_id"]: row for row in csv.DictReader(out.open())}
    assert rows["cli-1"]["final_action"] == "BLOCK" and rows["cli-1"]["holds"] == "BLOCK"
    for k in ("cli-0", "cli-2", "cli-3"):                          # outside the window, or another user
        assert rows[k]["holds"] == "" and rows[k]["final_action"] == rows[k]["action"]
