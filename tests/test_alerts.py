"""Alerts: the record format, and the webhook sink under faults with a real redis-server and a real
HTTP receiver. The fault test kills the receiver and the sink (SIGKILL) mid-load, restarts both,
and counts: alerts produced == delivered (distinct ids) + dead-lettered, none lost."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from seqguard.gateway.alerts import (ALERT_ID_HEADER, SIGNATURE_HEADER, AlertFormatError, AlertRecord, SinkConfig,
                            WebhookSink, sign, verify_signature)
from seqguard.services import free_port

SECRET = b"test-webhook-secret-0123456789"
STREAM, DEAD, GROUP = "sg:alerts", "sg:alerts:dead", "webhook"


def alert(i: int, action: str = "REVIEW") -> AlertRecord:
    return AlertRecord(alert_id=str(i), event=f"{i:032x}", user=f"{i % 50:032x}", risk=0.5 + (i % 50) / 100,
                       action=action, reasons=("NEW_DEVICE", "HIGH_VELOCITY"), rules=("velocity",),
                       mv="m1", ts=1767225600000 + i, created_ms=1767225600000 + i)


# ------------------------------------------------------------------ the record format
def test_record_round_trips_through_stream_fields():
    a = alert(7)
    fields = a.to_fields()
    assert list(fields) == list(AlertRecord.FIELDS) and all(isinstance(v, str) for v in fields.values())
    assert AlertRecord.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == a
    raw = AlertRecord(**{**a.__dict__, "user_raw": "alice"})
    assert raw.to_fields()["user_raw"] == "alice" and AlertRecord.from_fields(raw.to_fields()) == raw
    assert "user_raw" not in a.to_json()


@pytest.mark.parametrize("change, field", [
    ({"action": "MAYBE"}, "action"), ({"risk": "high"}, "risk"), ({"ts": "1.5"}, "ts"),
    ({"reasons": "NEW_DEVICE"}, "reasons"), ({"rules": "[1]"}, "rules"), ({"alert_id": ""}, "alert_id"),
])
def test_bad_record_names_the_field(change, field):
    with pytest.raises(AlertFormatError) as exc:
        AlertRecord.from_fields({**alert(1).to_fields(), **change})
    assert exc.value.field == field
    missing = alert(1).to_fields()
    del missing["mv"]
    with pytest.raises(AlertFormatError, match="'mv': missing"):
        AlertRecord.from_fields(missing)


def test_signature_and_secure_url_defaults():
    body = b'{"alert_id":"1"}'
    assert verify_signature(SECRET, body, sign(SECRET, body))
    assert not verify_signature(SECRET, body + b" ", sign(SECRET, body))
    assert not verify_signature(b"another-secret-0123456789", body, sign(SECRET, body))
    assert not verify_signature(SECRET, body, None)
    SinkConfig("http://127.0.0.1:9/x", SECRET).validate()
    with pytest.raises(ValueError, match="https"):
        SinkConfig("http://alerts.example.com/x", SECRET).validate()
    SinkConfig("http://alerts.example.com/x", SECRET, allow_insecure_http=True).validate()
    with pytest.raises(ValueError, match="16 bytes"):
        SinkConfig("https://alerts.example.com/x", b"short").validate()


# ------------------------------------------------------------------ a real receiver
class Receiver:
    """A threaded HTTP server that checks signatures and records every accepted alert id (duplicates kept).

    `fail_500`: alert ids always answered 500 (they must end in the dead-letter stream);
    `fail_400`: answered 400 (dead-lettered at once). stop()/start() on the same port: an outage."""

    def __init__(self, port: int, fail_500=frozenset(), fail_400=frozenset()):
        self.port, self.fail_500, self.fail_400 = port, fail_500, fail_400
        self.accepted: list[str] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.server = None

    def start(self):
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                aid = self.headers[ALERT_ID_HEADER]
                if not verify_signature(SECRET, body, self.headers[SIGNATURE_HEADER]):
                    with rec.lock:
                        rec.bad_signatures += 1
                    code = 401
                elif aid in rec.fail_400:
                    code = 400
                elif aid in rec.fail_500:
                    code = 500
                else:
                    assert json.loads(body)["alert_id"] == aid
                    with rec.lock:
                        rec.accepted.append(aid)
                    code = 204
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def _group_idle(r) -> bool:
    """Every alert in the stream read by the group and acknowledged."""
    g = [g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP.encode()]
    return bool(g) and g[0]["pending"] == 0 and g[0]["lag"] == 0


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_sink(redis_port: int, url: str, secret_file, consumer: str) -> subprocess.Popen:
    env = dict(os.environ, SEQGUARD_REDIS_PORT=str(redis_port))
    env.pop("SEQGUARD_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "seqguard.cli", "alerts-sink", "--url", url, "--secret-file", str(secret_file),
         "--consumer", consumer, "--max-attempts", "10", "--backoff-initial", "0.05", "--backoff-max", "1",
         "--http-timeout", "2", "--claim-idle-ms", "1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_no_alert_lost_when_receiver_and_sink_are_killed(redis_server, tmp_path):
    r = redis_server.client()
    r.flushall()
    n = 1500
    rejected = {str(i) for i in range(n) if i % 100 == 7}          # always 500: must be dead-lettered
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    receiver = Receiver(free_port(), fail_500=rejected).start()
    sinks = [_start_sink(redis_server.port, receiver.url, secret_file, "sink-a")]
    try:
        def produce():
            for start in range(0, n, 50):                             # ~1,000 alerts/s for 1.5 s
                with r.pipeline(transaction=False) as pipe:
                    for i in range(start, min(n, start + 50)):
                        pipe.xadd(STREAM, alert(i, ("REVIEW", "CHALLENGE", "BLOCK")[i % 3]).to_fields())
                    pipe.execute()
                time.sleep(0.05)
        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(0.4)
        receiver.stop()                                               # receiver outage: 0.8 s
        time.sleep(0.8)
        receiver.start()
        time.sleep(0.3)
        sinks[0].send_signal(signal.SIGKILL)                          # sink dies mid-load, its alerts pending
        sinks[0].wait(10)
        time.sleep(0.3)
        sinks.append(_start_sink(redis_server.port, receiver.url, secret_file, "sink-b"))  # takes them over
        producer.join()
        _wait(lambda: _group_idle(r), 90, "every alert acknowledged")
    finally:
        for p in sinks:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        exit_codes = [p.wait(15) for p in sinks]
        receiver.stop()
    produced = {str(i) for i in range(n)}
    dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(DEAD)]
    dead_ids = {d["alert_id"] for d in dead}
    delivered = set(receiver.accepted)
    counts = {"produced": n, "delivered": len(delivered), "duplicates": len(receiver.accepted) - len(delivered),
              "dead_lettered": len(dead_ids), "lost": len(produced - delivered - dead_ids)}
    print("alert delivery under faults:", counts)
    assert counts["lost"] == 0 and delivered | dead_ids == produced
    assert dead_ids == rejected and len(dead) == len(rejected)       # the outage itself dead-lettered nothing
    assert not delivered & dead_ids
    assert all(d["why"] == "attempts" and d["attempts"] == "10" and "HTTP 500" in d["error"] for d in dead)
    assert receiver.bad_signatures == 0
    assert exit_codes[1] == 0, sinks[1].stderr.read().decode()[-2000:]
    assert exit_codes[0] == -signal.SIGKILL


def test_rejected_and_malformed_alerts_are_dead_lettered_at_once(redis_server):
    r = redis_server.client()
    r.flushall()
    receiver = Receiver(free_port(), fail_400={"2"}).start()
    for i in range(4):
        r.xadd(STREAM, alert(i).to_fields())
    r.xadd(STREAM, {**alert(4).to_fields(), "risk": "not-a-number"})

    async def run():
        import redis.asyncio as aioredis
        client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
        sink = WebhookSink(client, "sg:", SinkConfig(receiver.url, SECRET, consumer="t", max_attempts=3,
                                                     backoff_initial_s=5.0, block_ms=100))
        task = asyncio.create_task(sink.run())
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                if await asyncio.to_thread(_group_idle, r):
                    break
        finally:
            sink.stop()
            await asyncio.wait_for(task, 10)
            await client.aclose()
        return sink.metrics

    try:
        m = asyncio.run(run())
    finally:
        receiver.stop()
    assert sorted(receiver.accepted) == ["0", "1", "3"]
    dead = {f[b"alert_id"].decode(): f for _, f in r.xrange(DEAD)}
    assert set(dead) == {"2", "4"}
    # a 400 is not retried (backoff_initial_s=5 would have made this test wait), a malformed entry never sent
    assert dead["2"][b"why"] == b"rejected" and dead["2"][b"attempts"] == b"1" and b"HTTP 400" in dead["2"][b"error"]
    assert dead["4"][b"why"] == b"malformed" and b"'risk'" in dead["4"][b"error"]
    assert m.delivered._value.get() == 3 and m.retried._value.get() == 0
    assert m.dead_lettered.labels("rejected")._value.get() == 1
    assert m.dead_lettered.labels("malformed")._value.get() == 1
    assert _group_idle(r)

    # after the receiver is fixed: the rejected alert goes back to the stream, the malformed one stays
    env = dict(os.environ, SEQGUARD_REDIS_PORT=str(redis_server.port))
    env.pop("SEQGUARD_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "seqguard.cli", "alerts-sink", "--redrive-dead"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"redriven": 1, "kept_malformed": 1}
    assert [f[b"why"] for _, f in r.xrange(DEAD)] == [b"malformed"]
    last_id, last = r.xrevrange(STREAM, count=1)[0]
    assert AlertRecord.from_fields(last) == alert(2) and r.xlen(STREAM) == 6


def test_restarted_sink_redelivers_its_pending_and_counts_trimmed_ones(redis_server):
    """A sink restarted under the same consumer name first re-delivers what it had read but not
    acknowledged; an entry trimmed from the stream meanwhile is counted (missing), never silently dropped."""
    r = redis_server.client()
    r.flushall()
    ids = [r.xadd(STREAM, alert(i).to_fields()) for i in range(3)]
    r.xgroup_create(STREAM, GROUP, id="0")
    assert len(r.xreadgroup(GROUP, "sink-1", {STREAM: ">"})[0][1]) == 3      # read, then "killed"
    r.xdel(STREAM, ids[1])                                                    # trimmed before delivery
    receiver = Receiver(free_port()).start()

    async def run():
        import redis.asyncio as aioredis
        client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
        sink = WebhookSink(client, "sg:", SinkConfig(receiver.url, SECRET, consumer="sink-1", block_ms=100))
        task = asyncio.create_task(sink.run())
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                if await asyncio.to_thread(_group_idle, r):
                    break
        finally:
            sink.stop()
            await asyncio.wait_for(task, 10)
            await client.aclose()
        return sink.metrics

    try:
        m = asyncio.run(run())
    finally:
        receiver.stop()
    assert sorted(receiver.accepted) == ["0", "2"]
    assert m.missing._value.get() == 1 and m.delivered._value.get() == 2 and _group_idle(r)
