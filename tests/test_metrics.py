"""Gateway Prometheus metrics with real Redis and Triton: counters move by exactly what was sent,
and every seqguard_* name the dashboard and the alert rules query is exported."""
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.services import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int) -> dict:
    """{(sample name, sorted label items): value} from the /metrics endpoint."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered_gateway(small_model, redis_server, triton_server_factory, gateway_factory):
    tri = triton_server_factory(small_model / "model_repository")
    return gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=tri.grpc_url,
                           deadline_ms=3000, triton_timeout_ms=3000, metrics_port=free_port())


def ev(i: int, user: str = "m-user") -> risk_pb2.Event:
    return risk_pb2.Event(event_id=f"m-{user}-{i}", user_id=user, event_type="page_view",
                          ts=1767225600000 + i * 1000, device_id="dev-1", ip="10.0.0.1", country="DE")


def test_counters_move_by_what_was_sent(metered_gateway, redis_server):
    redis_server.client().flushall()
    port = metered_gateway.gateway.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(metered_gateway.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for i in range(7):
            r = stub.Score(risk_pb2.ScoreRequest(event=ev(i)), timeout=10)
            assert r.status == risk_pb2.OK, r.status_detail
        batch = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[ev(100 + i, "m-batch") for i in range(5)]),
                                timeout=10)
        assert all(r.status == risk_pb2.OK for r in batch.results)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Score(risk_pb2.ScoreRequest(event=risk_pb2.Event(event_id="x", user_id="", event_type="login",
                                                                  ts=1767225600000)), timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # context.abort() sends the status before the servicer's `finally` counts it: the client can see
    # the error a moment before the counter moves, so wait (bounded) for the last request to be counted
    end = time.monotonic() + 5
    after = scrape(port)
    while time.monotonic() < end and val(after, "seqguard_request_seconds_count", method="Score") \
            - val(before, "seqguard_request_seconds_count", method="Score") < 8:
        time.sleep(0.05)
        after = scrape(port)
    d = lambda name, **kw: val(after, name, **kw) - val(before, name, **kw)  # noqa: E731
    assert d("seqguard_requests_total", method="Score", status="OK") == 7
    assert d("seqguard_requests_total", method="ScoreBatch", status="OK") == 1
    assert d("seqguard_requests_total", method="Score", status="INVALID_ARGUMENT") == 1
    assert d("seqguard_request_seconds_count", method="Score") == 8
    assert d("seqguard_request_seconds_count", method="ScoreBatch") == 1
    # 12 events scored OK: each lands in the risk histogram once; batches carried all 12
    assert d("seqguard_risk_count") == 12
    assert d("seqguard_batch_events_sum") == 12
    assert 2 <= d("seqguard_batch_events_count") <= 8        # 7 lone Scores + 1 batch (no concurrency)
    assert d("seqguard_redis_seconds_count", op="load") == d("seqguard_batch_events_count")
    assert d("seqguard_redis_seconds_count", op="save") == d("seqguard_batch_events_count")
    assert d("seqguard_triton_seconds_count") >= d("seqguard_batch_events_count")
    assert d("seqguard_degraded_events_total") == 0
    assert val(after, "seqguard_in_flight_events") == 0
    assert 0 < val(after, "seqguard_redis_seconds_sum", op="load") < 5


def test_degraded_answers_are_counted(small_model, redis_server, gateway_factory):
    """Triton address with nothing listening and no local standby: every Score is DEGRADED, counted as
    such, and its model step counted as deferred."""
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, local_encoder_fallback=False,
                         triton_url=f"127.0.0.1:{free_port()}", triton_timeout_ms=200, metrics_port=free_port())
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for i in range(3):
            r = stub.Score(risk_pb2.ScoreRequest(event=ev(i, "m-degraded")), timeout=10)
            assert r.status == risk_pb2.DEGRADED
    m = scrape(gw.gateway.metrics_port)
    assert val(m, "seqguard_requests_total", method="Score", status="DEGRADED") == 3
    assert val(m, "seqguard_degraded_events_total") == 3
    assert val(m, "seqguard_risk_count") == 0
    assert val(m, "seqguard_deferred_steps_total") == 3 and val(m, "seqguard_caught_up_steps_total") == 0
    assert val(m, "seqguard_state_conflicts_total") == 0 and val(m, "seqguard_backlog_users") == 0
    gw.stop()


def test_local_standby_steps_are_counted(small_model, redis_server, gateway_factory):
    """The same dead Triton with the local standby (the default): every Score is OK, and the steps
    the standby computed are exported."""
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port,
                         triton_url=f"127.0.0.1:{free_port()}", triton_timeout_ms=200, metrics_port=free_port())
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for i in range(3):
            assert stub.Score(risk_pb2.ScoreRequest(event=ev(i, "m-standby")), timeout=10).status == risk_pb2.OK
    m = scrape(gw.gateway.metrics_port)
    assert val(m, "seqguard_local_encoder_steps_total") == 3 and val(m, "seqguard_deferred_steps_total") == 0
    gw.stop()


def test_dashboard_and_alerts_use_exported_names(metered_gateway):
    exported = {name for name, _ in scrape(metered_gateway.gateway.metrics_port)}
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in exported}
    queries = json.dumps(json.loads((ROOT / "deploy/grafana/seqguard.json").read_text()))
    queries += (ROOT / "deploy/prometheus/alerts.yaml").read_text()
    used = set(re.findall(r"\bseqguard_[a-z_]+", queries)) - {"seqguard_encoder", "seqguard_encoder_trt"}
    assert used, "no seqguard_* metric found in the dashboard"
    missing = {u for u in used if u not in exported and re.sub(r"_(bucket|sum|count|total)$", "", u) not in families}
    assert not missing, f"dashboard/alerts query metrics the gateway does not export: {sorted(missing)}"
