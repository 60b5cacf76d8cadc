"""Prometheus metrics for the gateway (names match deploy/grafana/seqguard.json and deploy/prometheus/alerts.yaml).

Each Gateway owns its own CollectorRegistry (several gateways can live in one test process) and
serves it on settings.metrics_port (0 = off). Redis and Triton latencies, coalesced batch sizes
and the score distribution arrive through the pipeline's named hooks (GatewayMetrics is the
engine's and the store's PipelineObserver, gateway/observer.py), so the scoring pipeline itself
carries no metrics library code.
"""
from __future__ import annotations

import functools
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .proto import risk_pb2

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
RISK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("seqguard_requests", "RPCs answered, by method and status "
                                "(OK, DEGRADED = fallback answer, or the gRPC error code)",
                                ["method", "status"], registry=r)
        self.request_seconds = Histogram("seqguard_request_seconds", "RPC latency seen by the server",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_events = Histogram("seqguard_batch_events", "events per coalesced engine batch",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.redis_seconds = Histogram("seqguard_redis_seconds", "Redis round trip (load = read, save = CAS write)",
                                       ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.triton_seconds = Histogram("seqguard_triton_seconds", "one Triton step-encoder request",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.risk = Histogram("seqguard_risk", "risk scores of events scored OK", buckets=RISK_BUCKETS, registry=r)
        self.degraded = Counter("seqguard_degraded_events", "events answered with the fallback (DEGRADED)",
                                registry=r)
        self.in_flight = Gauge("seqguard_in_flight_events", "events queued or being scored", registry=r)
        self.model = Gauge("seqguard_model_info", "1 for the model version being served",
                           ["model_version", "triton_version"], registry=r)
        self.reloads = Counter("seqguard_model_reloads", "model reload attempts by result", ["result"], registry=r)
        self.shadow_diff = Histogram("seqguard_shadow_risk_diff", "candidate minus live risk (shadow mode)",
                                     buckets=(-0.5, -0.2, -0.1, -0.05, -0.01, 0.01, 0.05, 0.1, 0.2, 0.5), registry=r)
        self.shadow_events = Counter("seqguard_shadow_events", "events given to the shadow candidate, by result "
                                     "(scored; failed = shadow error, live answer unaffected; dropped = queue full)",
                                     ["result"], registry=r)
        self._server = None

    def watch_engine(self, current_engine) -> None:
        """Export the engine's own counters (read at scrape time from `current_engine()`, which
        follows model reloads): compare-and-set conflicts, rebuilds, deferred steps and backlogs,
        refused writes, steps the local standby computed."""
        self.registry.register(_EngineCollector(current_engine))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_model(self, model_version: str, triton_version: str) -> None:
        self.model.clear()
        self.model.labels(model_version, triton_version or "latest").set(1)

    # ------------------------------------------------------------------ PipelineObserver (gateway/observer.py)
    def redis_round_trip(self, op: str, seconds: float) -> None:
        self.redis_seconds.labels(op).observe(seconds)

    def encoder_request(self, seconds: float) -> None:
        self.triton_seconds.observe(seconds)

    def batch_scored(self, n_events: int, results) -> None:
        self.batch_events.observe(n_events)
        bad = 0
        for r in results:
            if r.status == "OK":
                self.risk.observe(r.risk)
            else:
                bad += 1
        if bad:
            self.degraded.inc(bad)

    def fallback_answers(self, n: int) -> None:
        self.degraded.inc(n)


def metered(method: str):
    """Decorator for an async servicer method (whose object has .metrics): count by status and time it."""
    def wrap(fn):
        @functools.wraps(fn)
        async def inner(svc, request, context):
            m: GatewayMetrics = svc.metrics
            t0 = time.perf_counter()
            status = "UNKNOWN"
            try:
                resp = await fn(svc, request, context)
                status = _status_of(resp)
                return resp
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                status = code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"
                raise
            finally:
                m.requests.labels(method, status).inc()
                m.request_seconds.labels(method).observe(time.perf_counter() - t0)
        return inner
    return wrap


def _status_of(resp) -> str:
    """DEGRADED if any answer in the response used the fallback, else OK."""
    results = getattr(resp, "results", None)
    if isinstance(resp, risk_pb2.ScoreResponse):
        results = [resp]
    degraded = risk_pb2.Status.Value("DEGRADED")
    return "DEGRADED" if any(r.status == degraded for r in results or ()) else "OK"


class _EngineCollector:
    """Counters kept by the ScoringEngine (plain ints on the hot path), turned into metrics on scrape.
    A reload starts a new engine, so they count from the model's start, like a process restart."""

    COUNTERS = (
        ("conflicts", "seqguard_state_conflicts", "compare-and-set writes refused because another writer changed "
                                                  "the same user or entity (retried from a fresh read)"),
        ("refused_writes", "seqguard_state_refused_batches", "batches not applied: Redis failed or the state "
                                                             "kept changing for every attempt"),
        ("rebuilds", "seqguard_state_rebuilds", "user states rebuilt from the ring after a model change"),
        ("deferred_steps", "seqguard_deferred_steps", "model steps deferred (encoder unavailable or a user "
                                                      "catching up)"),
        ("caught_up_steps", "seqguard_caught_up_steps", "deferred model steps run later"),
        ("backlog_resets", "seqguard_backlog_resets", "backlogs past MAX_PENDING (the loss rule applied)"),
    )

    def __init__(self, current_engine):
        self._engine = current_engine

    def collect(self):
        engine = self._engine()
        for attr, name, doc in self.COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(engine, attr))
        yield GaugeMetricFamily("seqguard_backlog_users", "users whose deferred steps are being drained now",
                                value=engine.backlog_users)
        yield CounterMetricFamily("seqguard_local_encoder_steps", "model steps the local standby encoder computed "
                                  "while Triton was unavailable",
                                  value=getattr(engine.encoder, "failover_steps", 0))
