"""Alerts end to end under faults (issue #21 part 3 acceptance): the real gateway (a separate process,
real Redis + real Triton) writes alerts in its atomic state write, the webhook sink (a separate
process) delivers them to a real HTTP receiver. Mid-load the receiver is stopped and restarted,
the gateway is SIGKILLed with a batch in flight and restarted, and the sink is SIGKILLed and
replaced. Counted at the end: every alert in the stream is delivered (distinct ids) or
dead-lettered, none lost; every flagged answer a client received has its alert."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from gateway_process import start_gateway_process
from seqguard.services import free_port
from test_alerts import DEAD, STREAM, Receiver, _group_idle, _start_sink, _wait

pytestmark = pytest.mark.slow
T0 = 1767225600000


class EveryFiftieth:
    """Alert ids the receiver always answers 500 (ids are sequence numbers, unknown in advance)."""

    def __contains__(self, alert_id: str) -> bool:
        return int(alert_id) % 50 == 7


def _batch(b: int, size: int = 20) -> list:
    """Events on a held device (every one a REVIEW at least, so every one an alert); users in time order."""
    return [risk_pb2.Event(event_id=f"e{b}-{j}", user_id=f"u{(b * size + j) % 300}", ts=T0 + b * 60_000 + j,
                           event_type="view_item", device_id="d-held", ip="10.9.8.7", country="DE")
            for j in range(size)]


def test_gateway_receiver_and_sink_killed_mid_load_no_alert_lost(small_model, redis_server, triton_server_factory,
                                                                  tmp_path):
    r = redis_server.client()
    r.flushall()
    triton = triton_server_factory(small_model / "model_repository")
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(b"test-webhook-secret-0123456789\n")
    receiver = Receiver(free_port(), fail_500=EveryFiftieth()).start()
    gw, port = start_gateway_process(small_model, redis_server.port, triton.grpc_url, tmp_path / "gw1.log")
    procs = [gw, _start_sink(redis_server.port, receiver.url, secret_file, "sink-a")]
    answered, gateway_failures = [], 0
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_DEVICE, id="d-held", action=risk_pb2.REVIEW,
                                             reason="device under review", who="test", ttl_s=3600), timeout=10)
        for b in range(60):
            if b == 10:
                receiver.stop()                                             # receiver outage: batches 10-19
            if b == 20:
                receiver.start()
            killer = None
            if b == 30:                                                     # gateway dies with this batch in flight
                killer = threading.Timer(0.005, procs[0].send_signal, (signal.SIGKILL,))
                killer.start()
            if b == 45:
                procs[1].send_signal(signal.SIGKILL)                         # sink dies; another takes over
                procs[1].wait(10)
                procs.append(_start_sink(redis_server.port, receiver.url, secret_file, "sink-b"))
            for attempt in range(2):
                try:
                    rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=_batch(b)), timeout=20)
                    answered += list(rep.results)
                    break
                except grpc.RpcError:
                    gateway_failures += 1
                    if killer is not None:
                        killer.join()
                    procs[0].wait(10)
                    ch.close()
                    gw, port = start_gateway_process(small_model, redis_server.port, triton.grpc_url,
                                                     tmp_path / "gw2.log")
                    procs[0] = gw
                    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
                    stub = risk_pb2_grpc.RiskScoringStub(ch)                # the same batch again (idempotent)
            else:
                raise AssertionError(f"batch {b} failed twice")
            if killer is not None:
                killer.join()       # landed after the answer (a slow machine): the next batch meets the restart
        _wait(lambda: _group_idle(r), 120, "every alert acknowledged")
        ch.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(15)
        receiver.stop()

    produced = [f[b"alert_id"].decode() for _, f in r.xrange(STREAM)]
    dead = {f[b"alert_id"].decode() for _, f in r.xrange(DEAD)}
    delivered = set(receiver.accepted)
    flagged = {str(x.sequence) for x in answered if x.status == risk_pb2.OK and x.action != risk_pb2.ALLOW}
    counts = {"answered": len(answered), "alerts_produced": len(produced), "delivered": len(delivered),
              "duplicates": len(receiver.accepted) - len(delivered), "dead_lettered": len(dead),
              "lost": len(set(produced) - delivered - dead), "gateway_failures": gateway_failures}
    print("alerts end to end under faults:", counts)
    assert len(set(produced)) == len(produced)                               # one alert per applied decision
    assert counts["lost"] == 0 and delivered | dead == set(produced)
    assert dead == {a for a in produced if a in EveryFiftieth()} and not delivered & dead
    assert flagged <= set(produced) and len(flagged) >= 1000                 # every flagged answer has its alert
    assert gateway_failures >= 1 and receiver.bad_signatures == 0
