"""The asyncio gRPC gateway: seqguard.v1.RiskScoring + grpc.health.v1 + server reflection.

Every RPC validates its input at the boundary (INVALID_ARGUMENT naming the field, nothing
written), runs under a deadline (the client's, capped by settings.deadline_ms; for the bulk RPCs
ScoreBatch and Ingest by settings.bulk_deadline_ms) and answers DEGRADED with the configured
fallback when Redis or Triton fails, never hangs.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import math
import signal
import sys
import time
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqguard.artifact import ModelArtifact
from seqguard.featurizer import TokenHasher
from seqguard.rules import load_rules
from seqguard.schema import SchemaError, validate_event

from .coalescer import Coalescer, Overloaded
from .engine import ScoringEngine
from .holds import MAX_HOLD_TTL_S, Hold, HoldError, HoldStore
from .metrics import GatewayMetrics, metered
from .proto import risk_pb2, risk_pb2_grpc
from .redisconn import connect_redis, key_prefix
from .reload import LiveRules, ModelReloader, RulesReloader
from .result import ScoreResult
from .settings import Settings
from .state import RedisStateStore, StateUnavailable
from .local_encoder import FailoverEncoder, LocalStepEncoder
from .triton_client import TritonStepClient

log = logging.getLogger("seqguard.gateway")
Context = grpc.aio.ServicerContext
SERVICE_NAME = risk_pb2.DESCRIPTOR.services_by_name["RiskScoring"].full_name
MAX_NOT_APPLIED_IDS = 10_000     # event ids an IngestSummary names as not applied (the count is exact)
_OPTIONAL = ("item_id", "category", "amount", "device_id", "ip", "country", "session_id")


def check_clock_skew(ev, where: str, now_ms: int, future_ms: int, past_ms: int) -> None:
    """Live events must carry a plausible time (settings.max_future_skew_ms / max_past_skew_ms)."""
    if future_ms and ev.ts > now_ms + future_ms:
        raise SchemaError(f"{where}.ts", f"{ev.ts} is {(ev.ts - now_ms) / 3.6e6:.1f} h ahead of the server clock; "
                                         f"at most {future_ms / 3.6e6:.1f} h accepted")
    if past_ms and ev.ts < now_ms - past_ms:
        raise SchemaError(f"{where}.ts", f"{ev.ts} is {(now_ms - ev.ts) / 3.6e6:.1f} h behind the server clock; "
                                         f"at most {past_ms / 3.6e6:.1f} h accepted (use Ingest for backfills)")


def event_from_proto(msg: risk_pb2.Event, where: str = "event"):
    """Proto Event -> validated schema Event; SchemaError names the field as `where.field`."""
    raw = {"event_id": msg.event_id, "user_id": msg.user_id, "event_type": msg.event_type,
           "ts": msg.ts if msg.ts else None}
    for name in _OPTIONAL:
        if msg.HasField(name):
            raw[name] = getattr(msg, name)
    if "amount" in raw and (math.isnan(raw["amount"]) or math.isinf(raw["amount"])):
        raise SchemaError(f"{where}.amount", f"must be a finite number >= 0, got {raw['amount']}")
    try:
        return validate_event(raw)
    except SchemaError as e:
        raise SchemaError(f"{where}.{e.field}", e.reason) from None


def result_to_proto(r: ScoreResult) -> risk_pb2.ScoreResponse:
    return risk_pb2.ScoreResponse(
        event_id=r.event_id, risk=r.risk, action=risk_pb2.Action.Value(r.action),
        reasons=[risk_pb2.Reason(code=x.code, message=x.message, weight=x.weight, event_ids=x.event_ids)
                 for x in r.reasons],
        model_version=r.model_version, status=risk_pb2.Status.Value(r.status), status_detail=r.detail,
        sequence=r.sequence, rules=r.rules)


async def _require_id(context, field: str, value: str, max_len: int = 256) -> None:
    """INVALID_ARGUMENT naming the field when an identifier is missing or too long."""
    if not value:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"field '{field}': is required")
    if len(value) > max_len:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"field '{field}': longer than {max_len} characters")


_HOLD_KINDS = {risk_pb2.HOLD_USER: "user", risk_pb2.HOLD_DEVICE: "device", risk_pb2.HOLD_IP: "ip"}


def hold_to_proto(h: Hold) -> risk_pb2.Hold:
    kind = {v: k for k, v in _HOLD_KINDS.items()}[h.kind]
    return risk_pb2.Hold(kind=kind, key=h.key, action=risk_pb2.Action.Value(h.action), reason=h.reason, who=h.who,
                         created_ms=h.created_ms, expires_ms=h.expires_ms)


class RiskScoringService(risk_pb2_grpc.RiskScoringServicer):
    def __init__(self, settings: Settings, coalescer: Coalescer, metrics: GatewayMetrics,
                 holds: HoldStore | None = None):
        self.settings = settings
        self.coalescer = coalescer
        self.metrics = metrics
        self.holds = holds

    @property
    def engine(self) -> ScoringEngine:
        """The live engine: a hot reload swaps the coalescer's engine between batches."""
        return self.coalescer.engine

    def _deadline(self, context, bulk: bool = False) -> tuple[float, float]:
        """(loop-time deadline for the pipeline, seconds we may wait) from the client's and our budget:
        deadline_ms for Score, bulk_deadline_ms for ScoreBatch and an Ingest chunk, whose work grows
        with their events (under the online budget they answered DEGRADED about events they applied)."""
        budget = (self.settings.bulk_deadline_ms if bulk else self.settings.deadline_ms) / 1000
        left = context.time_remaining()
        if left is not None:
            budget = min(budget, max(0.0, left - 0.002))
        loop = asyncio.get_running_loop()
        return loop.time() + budget, budget

    async def _score(self, events, context, explain_reasons=True, bulk=False):
        deadline, budget = self._deadline(context, bulk)
        try:
            # asyncio.timeout, not wait_for: no extra Task (and loop pass) per request; the coalescer
            # shields its future, so a timed-out request's events are still applied by their batch
            async with asyncio.timeout(budget):
                return await self.coalescer.submit(events, deadline, explain_reasons, bulk)
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except asyncio.TimeoutError:
            return self.engine.degraded(events, f"deadline of {budget * 1000:.0f} ms exceeded")

    def _live_event(self, msg: risk_pb2.Event, where: str):
        ev = event_from_proto(msg, where)
        check_clock_skew(ev, where, int(time.time() * 1000), self.settings.max_future_skew_ms, self.settings.max_past_skew_ms)
        return ev

    @metered("Score")
    async def Score(self, request: risk_pb2.ScoreRequest, context: Context) -> risk_pb2.ScoreResponse:
        try:
            ev = self._live_event(request.event, "event")
        except SchemaError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        results = await self._score([ev], context)
        return result_to_proto(results[0])

    @metered("ScoreBatch")
    async def ScoreBatch(self, request: risk_pb2.ScoreBatchRequest, context: Context) -> risk_pb2.ScoreBatchResponse:
        if len(request.events) > self.settings.max_batch_events:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"field 'events': {len(request.events)} events; at most {self.settings.max_batch_events} per batch")
        try:
            events = [self._live_event(m, f"events[{i}]") for i, m in enumerate(request.events)]
        except SchemaError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not events:
            return risk_pb2.ScoreBatchResponse()
        results = await self._score(events, context, bulk=True)
        return risk_pb2.ScoreBatchResponse(results=[result_to_proto(r) for r in results])

    @metered("Ingest")
    async def Ingest(self, request_iterator: AsyncIterator[risk_pb2.Event], context: Context
                     ) -> risk_pb2.IngestSummary:
        summary = risk_pb2.IngestSummary()
        chunk = []
        async for i, msg in _aenumerate(request_iterator):
            try:
                ev = event_from_proto(msg, f"event[{i}]")
                check_clock_skew(ev, f"event[{i}]", int(time.time() * 1000), self.settings.max_future_skew_ms, 0)
                chunk.append(ev)
            except SchemaError as e:
                summary.rejected += 1
                if len(summary.errors) < 100:
                    summary.errors.append(str(e))
                continue
            if len(chunk) >= 256:
                await self._ingest(chunk, context, summary)
                chunk = []
        if chunk:
            await self._ingest(chunk, context, summary)
        return summary

    async def _ingest(self, events, context, summary: risk_pb2.IngestSummary) -> None:
        """Counts what reached the state, not what scored OK: a DEGRADED answer whose LSTM step was
        deferred is applied (it has a sequence number); one without a sequence was not, and is named."""
        results = await self._score(events, context, explain_reasons=False, bulk=True)
        missed = [r for r in results if r.sequence <= 0]
        summary.accepted += len(results) - len(missed)
        summary.not_applied += len(missed)
        room = MAX_NOT_APPLIED_IDS - len(summary.not_applied_event_ids)
        summary.not_applied_event_ids.extend(r.event_id for r in missed[:max(0, room)])
        if missed and len(summary.errors) < 100:
            summary.errors.append(f"{len(missed)} events not applied: {missed[0].detail}")

    @metered("GetUserState")
    async def GetUserState(self, request: risk_pb2.UserStateRequest, context: Context) -> risk_pb2.UserState:
        await _require_id(context, "user_id", request.user_id)
        try:
            st = await asyncio.wait_for(self.engine.store.get_user(request.user_id), self.settings.deadline_ms / 1000)
        except (StateUnavailable, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {e}")
        holds = await self._holds_call(context, self.holds.get([("user", self.holds.hashed("user", request.user_id))]))
        u = st.ctx
        ctx = {"n_events": float(u.n), "n_payments": float(u.n_payments), "n_reviews": float(u.n_reviews),
               "events_1m": u.ev_1m, "events_1h": u.ev_1h, "login_failed_1h": u.fail_login,
               "payment_failed_1h": u.fail_pay, "payments_24h": u.pay_24h, "amount_24h": u.amt_24h,
               "coupons_24h": u.coupon_24h, "devices_seen": float(len(u.devices)),
               "countries_seen": float(len(u.countries)), "ip_prefixes_seen": float(len(u.prefixes)),
               # the detector's session average, -log(1 - quantile) scale: 2.3 = a 1-in-10 event, 4.6 = 1 in 100
               "session_anomaly": st.session}
        return risk_pb2.UserState(user_key=self.engine.store.user_pseudonym(request.user_id), n_events=st.n, last_ts=u.last_ts,
                                  model_version=st.model_version, context=ctx,
                                  recent=[risk_pb2.RecentEvent(event_id=e[0], event_type=e[1], ts=e[2])
                                          for e in st.ring],
                                  holds=[hold_to_proto(h) for h in holds])

    @metered("ReportOutcome")
    async def ReportOutcome(self, request: risk_pb2.OutcomeRequest, context: Context) -> risk_pb2.OutcomeAck:
        await _require_id(context, "event_id", request.event_id)
        if request.label not in (risk_pb2.GENUINE, risk_pb2.FRAUD):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"field 'label': must be GENUINE or FRAUD, got {request.label}")
        family = request.family if request.HasField("family") else ""
        if len(family) > 64 or not family.isprintable():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "field 'family': at most 64 printable characters")
        try:
            prev = await asyncio.wait_for(self.engine.store.record_outcome(
                request.event_id, risk_pb2.Label.Name(request.label), family, int(time.time() * 1000),
                self.settings.outcome_ttl_s, self.settings.outcome_stream_max,
                user_id=request.user_id if request.HasField("user_id") else ""), self.settings.deadline_ms / 1000)
        except (StateUnavailable, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {e}")
        if prev is None:
            return risk_pb2.OutcomeAck(scored=False)
        return risk_pb2.OutcomeAck(scored=True, risk=prev["risk"], model_version=prev["model_version"])

    async def _holds_call(self, context, coro):
        """Run a HoldStore call under the deadline: HoldError -> INVALID_ARGUMENT, Redis trouble -> UNAVAILABLE."""
        try:
            return await asyncio.wait_for(coro, self.settings.deadline_ms / 1000)
        except HoldError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (StateUnavailable, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"state store unavailable: {e}")

    @metered("SetHold")
    async def SetHold(self, request: risk_pb2.SetHoldRequest, context: Context) -> risk_pb2.Hold:
        if request.kind not in _HOLD_KINDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'kind': must be HOLD_USER, HOLD_DEVICE or HOLD_IP")
        await _require_id(context, "id", request.id)
        if request.action not in (risk_pb2.REVIEW, risk_pb2.CHALLENGE, risk_pb2.BLOCK):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'action': must be REVIEW, CHALLENGE or BLOCK")
        if not 1 <= request.ttl_s <= MAX_HOLD_TTL_S:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"field 'ttl_s': must be in 1..{MAX_HOLD_TTL_S}")
        hold = await self._holds_call(context, self.holds.set(
            _HOLD_KINDS[request.kind], raw_id=request.id, action=risk_pb2.Action.Name(request.action),
            reason=request.reason, who=request.who, ttl_s=request.ttl_s))
        return hold_to_proto(hold)

    @metered("ReleaseHold")
    async def ReleaseHold(self, request: risk_pb2.ReleaseHoldRequest, context: Context) -> risk_pb2.ReleaseHoldAck:
        if request.kind not in _HOLD_KINDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'kind': must be HOLD_USER, HOLD_DEVICE or HOLD_IP")
        if bool(request.id) == bool(request.key):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'id': give exactly one of id and key")
        if request.key and (len(request.key) != 32 or any(c not in "0123456789abcdef" for c in request.key)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'key': must be a pseudonymised id (32 hex)")
        if request.id:
            await _require_id(context, "id", request.id)
        released = await self._holds_call(context, self.holds.release(
            _HOLD_KINDS[request.kind], raw_id=request.id, hashed=request.key, who=request.who, reason=request.reason))
        return risk_pb2.ReleaseHoldAck(released=released is not None)

    @metered("ListHolds")
    async def ListHolds(self, request: risk_pb2.ListHoldsRequest, context: Context) -> risk_pb2.ListHoldsResponse:
        if request.kind and request.kind not in _HOLD_KINDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'kind': must be a HoldKind")
        if not 0 <= request.limit <= 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field 'limit': must be in 0..1000")
        holds = await self._holds_call(context, self.holds.list_holds(_HOLD_KINDS.get(request.kind, ""),
                                                                     request.limit or 100))
        return risk_pb2.ListHoldsResponse(holds=[hold_to_proto(h) for h in holds])


async def _aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


class BearerAuth(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` on every RPC but health (open for probes).

    Scoring tokens may call the scoring RPCs and reflection; methods in ADMIN_METHODS (labels and
    holds) need an admin token (settings.admin_tokens). Unknown caller: UNAUTHENTICATED; a scoring
    token on an admin method: PERMISSION_DENIED.
    """

    OPEN = ("/grpc.health.v1.Health/",)
    ADMIN_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in ("ReportOutcome", "SetHold", "ReleaseHold",
                                                                "ListHolds"))

    def __init__(self, tokens: list[bytes], admin_tokens: list[bytes] = ()):
        self.tokens = list(tokens)
        self.admin_tokens = list(admin_tokens)

        async def unauthenticated(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        async def forbidden(request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this method needs an admin token "
                                "(settings admin_token / admin_token_file)")
        self._unauthenticated, self._forbidden = unauthenticated, forbidden

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        token = sent[7:].encode() if sent.startswith("Bearer ") else b""
        admin = bool(token) and any(hmac.compare_digest(token, t) for t in self.admin_tokens)
        scoring = admin or (bool(token) and any(hmac.compare_digest(token, t) for t in self.tokens))
        if admin or (scoring and details.method not in self.ADMIN_METHODS):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        deny = self._forbidden if scoring else self._unauthenticated
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_stream(deny))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)   # a coroutine function: aio awaits it
        return grpc.unary_unary_rpc_method_handler(deny)


def _deny_stream(deny):
    """A bidirectional-streaming denial (server reflection is one): abort before yielding anything."""
    async def handler(request_iterator, context):
        await deny(None, context)
        yield  # pragma: no cover - unreachable, makes this an async generator
    return handler


def freeze_heap() -> None:
    """Collect once, then move every object alive now (modules, clients, the loaded model) out of
    the garbage collector's view (gc.freeze).

    A full collection walks every tracked object while no request moves. With a model loaded
    that is tens of thousands of objects, a latency spike for whatever is in flight; in
    `seqguard demo`, where the gateway shares a process with training's leftovers, several times
    more, enough to push a ScoreBatch past its deadline. Frozen objects are
    still freed by reference counting; only reference cycles among them wait for the next
    freeze_heap (after a model reload's grace period).
    """
    gc.collect()
    gc.freeze()


class Gateway:
    """Owns the server and its clients; start()/stop() for tests, serve() for the CLI."""

    def __init__(self, settings: Settings):
        self.settings = settings
        key = settings.key_bytes()
        self.hasher = TokenHasher(key)
        self.artifact = ModelArtifact.load(settings.model_dir, hasher=self.hasher)
        # a rules file that does not load stops the start here (RulesError names the rule and field)
        self.rules = LiveRules(load_rules(settings.rules_path) if settings.rules_path else None)
        self.rules_reloader: RulesReloader | None = None
        self.metrics = GatewayMetrics()
        self.metrics_port: int | None = None
        self._retired: list[asyncio.Task] = []
        self.shadow = None                  # gateway.shadow.ShadowScorer when settings.shadow_model_dir is set
        self.holds: HoldStore | None = None
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None     # settings.health_port: plaintext health only
        self.health_port = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.port = None

    async def start(self) -> int:
        settings = self.settings
        if settings.shadow_model_dir:   # first: an unusable candidate fails the start before anything is opened
            from .shadow import ShadowScorer
            self.shadow = ShadowScorer.from_settings(settings, self.artifact, self.hasher, self.metrics)
            self.shadow.start()
        # the compiled featuriser kernel loads (or, with a cold cache, compiles: seconds) before the first
        # request, not inside it, where it would blow the deadline and answer DEGRADED
        await asyncio.to_thread(self.artifact.featurizer.warm_up)
        self._start_pipeline()
        self.reloader = ModelReloader(self, settings.model_poll_s)
        self.reloader.start()
        if settings.rules_path:
            self.rules_reloader = RulesReloader(settings.rules_path, self.rules, settings.rules_poll_s)
            self.rules_reloader.start()
            log.info("rules in force: %s (%d rules)", self.rules.current.version_tag, len(self.rules.current.rules))
        await self._start_grpc()
        if settings.health_port:
            await self._start_health_port()
        if settings.gc_freeze:
            freeze_heap()
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        log.info("gateway serving model %s on %s:%d (redis %s:%d, triton %s)", self.artifact.model_version,
                 settings.host, self.port, settings.redis_host, settings.redis_port, settings.triton_url)
        return self.port

    def _start_pipeline(self) -> None:
        """The state store, encoder, engine and coalescer, and the metrics that watch them."""
        settings = self.settings
        self.store = RedisStateStore.from_settings(settings, self.artifact.hidden, self.metrics)
        self.encoder = self._encoder_for(self.artifact)
        self.engine = self._engine_for(self.artifact, self.store, self.encoder)
        self.coalescer = Coalescer(self.engine, settings.coalesce_max_events, settings.coalesce_max_wait_us,
                                   settings.max_in_flight, settings.coalesce_max_concurrent)
        self.coalescer.start()
        self.metrics.in_flight.set_function(lambda: self.coalescer.in_flight)
        self.metrics.watch_engine(lambda: self.coalescer.engine)
        self.metrics.set_model(self.artifact.model_version, self.encoder.model_version)
        if settings.metrics_port:
            host = settings.metrics_host or settings.host
            self.metrics_port = self.metrics.serve(host, settings.metrics_port)
            log.info("prometheus metrics on %s:%d", host, self.metrics_port)

    async def _start_grpc(self) -> None:
        """The gRPC server: RiskScoring, health and reflection, behind bearer-token auth and TLS when set."""
        settings = self.settings
        opts = [("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        tokens = settings.auth_tokens()
        if not tokens:
            log.warning("bearer-token auth is OFF (set SEQGUARD_AUTH_TOKEN or SEQGUARD_AUTH_TOKEN_FILE)")
        admin_tokens = settings.admin_tokens()
        self.server = grpc.aio.server(options=opts, interceptors=[BearerAuth(tokens, admin_tokens)]
                                      if tokens or admin_tokens else [])
        # holds get their own client: the state store's is replaced (and closed) by a model reload
        self.holds = HoldStore(connect_redis(settings, settings.redis_timeout_ms / 1000), self.store.pseudonymize,
                               key_prefix(settings))
        risk_pb2_grpc.add_RiskScoringServicer_to_server(
            RiskScoringService(settings, self.coalescer, self.metrics, self.holds), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert_file:
            read = lambda p: open(p, "rb").read()  # noqa: E731
            creds = grpc.ssl_server_credentials(
                [(read(settings.tls_key_file), read(settings.tls_cert_file))],
                root_certificates=read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None,
                require_client_auth=bool(settings.tls_client_ca_file))
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot bind {address}")
        await self.server.start()

    async def _start_health_port(self) -> None:
        """kubelet gRPC probes cannot speak TLS: the same health servicer (so NOT_SERVING on stop shows
        here too), plaintext, and nothing else on this port: no scoring RPC, no reflection."""
        settings = self.settings
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        if not self.health_port:
            raise RuntimeError(f"cannot bind health port {settings.host}:{settings.health_port}")
        await self.health_server.start()

    def _encoder_for(self, artifact: ModelArtifact):
        settings = self.settings
        if settings.encoder == "local":
            return LocalStepEncoder(str(artifact.onnx_path))
        version = settings.triton_model_version or artifact.triton_model_version
        encoder = TritonStepClient(settings.triton_url, settings.triton_model, version,
                                   settings.triton_timeout_ms)
        if settings.local_encoder_fallback:
            encoder = FailoverEncoder(encoder, LocalStepEncoder(str(artifact.onnx_path)),
                                      settings.local_encoder_retry_ms / 1000)
        return encoder

    def _engine_for(self, artifact: ModelArtifact, store, encoder):
        engine = ScoringEngine(artifact, store, encoder, self.settings.fallback,
                               holds=HoldStore(store.client, store.pseudonymize, store.prefix),
                               alerts_include_raw_ids=self.settings.alerts_include_raw_ids, rules=self.rules,
                               observer=self.metrics)
        engine.shadow = self.shadow
        return engine

    def _on_sighup(self) -> None:
        self._retired.append(asyncio.get_running_loop().create_task(self.reloader.check(force=True)))
        if self.rules_reloader is not None:
            self.rules_reloader.check(force=True)

    async def reload_model(self) -> bool:
        """Load the artifact now at model_dir and make it live between two batches; False if it is already live.

        Raises (and the old model keeps serving) if the artifact is unusable or its Triton version
        is not ready / fails a warm-up step within settings.model_ready_timeout_s.
        """
        loop = asyncio.get_running_loop()
        art = await loop.run_in_executor(None, lambda: ModelArtifact.load(self.settings.model_dir, hasher=self.hasher))
        if art.model_version == self.artifact.model_version:
            return False
        encoder = self._encoder_for(art)
        try:
            await self._warm(encoder, art)
        except BaseException:
            await encoder.close()
            raise
        old_store, old_encoder = self.store, self.encoder
        store = (old_store if art.hidden == self.artifact.hidden
                 else RedisStateStore.from_settings(self.settings, art.hidden, self.metrics))
        engine = self._engine_for(art, store, encoder)
        # the swap: one attribute, read by the coalescer once per batch (a running batch finishes on the old model)
        self.coalescer.engine = engine
        old_version = self.artifact.model_version
        self.artifact, self.engine, self.encoder, self.store = art, engine, encoder, store
        self.metrics.set_model(art.model_version, encoder.model_version)
        self.metrics.reloads.labels("ok").inc()
        if self.settings.gc_freeze:
            gc.freeze()                 # the new model joins the frozen heap (see freeze_heap)
        log.info("model reloaded: %s -> %s (triton %s version %s)", old_version, art.model_version,
                 self.settings.triton_model, encoder.model_version or "latest")
        # close the old clients once no batch can still be using them
        s = self.settings
        grace = max(s.deadline_ms, s.bulk_deadline_ms, s.triton_timeout_ms) / 1000 + 5.0
        self._retired.append(loop.create_task(self._close_later(
            old_encoder, old_store if store is not old_store else None, grace)))
        return True

    async def _warm(self, encoder, art: ModelArtifact) -> None:
        """Wait until Triton serves the artifact's version, then run one real step through it."""
        import numpy as np
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.model_ready_timeout_s
        while not await encoder.ready():
            if loop.time() >= end:
                raise TimeoutError(f"triton model {self.settings.triton_model} version {encoder.model_version or 'latest'} "
                                   f"not ready after {self.settings.model_ready_timeout_s:.0f} s")
            await asyncio.sleep(0.2)
        n_feat = art.encoder_features
        h = np.zeros((1, art.hidden), np.float32)
        await encoder.step(np.zeros(1, np.int64), np.zeros((1, n_feat), np.float32), h, h,
                           timeout_s=max(1.0, self.settings.triton_timeout_ms / 1000))

    async def _close_later(self, encoder, store, delay: float) -> None:
        await asyncio.sleep(delay)
        await encoder.close()
        if store is not None:
            await store.close()
        if self.settings.gc_freeze:
            gc.unfreeze()               # collect the retired model's cycles once, then freeze again
            freeze_heap()

    async def stop(self, grace: float = 5.0) -> None:
        """Flip health to NOT_SERVING, drain in-flight RPCs for up to `grace` seconds, then close."""
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        if self.server:
            await self.server.stop(grace)
        if self.health_server:
            await self.health_server.stop(0)
        await self.reloader.stop()
        if self.rules_reloader is not None:
            await self.rules_reloader.stop()
        await self.coalescer.stop()
        if self.shadow is not None:
            await self.shadow.stop()
        for t in self._retired:
            t.cancel()
        await self.encoder.close()
        await self.store.close()
        if self.holds is not None:
            await self.holds.redis.aclose()
        self.metrics.close()

    async def serve(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: reload the model at model_dir now (kubectl exec ... kill -HUP 1 after flipping `current`)
        # and the rules file (a bad one is rejected, the running rules stay)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await stop.wait()
        log.info("shutting down: draining in-flight requests")
        await self.stop()


async def _maybe_await(x):
    if asyncio.iscoroutine(x):
        await x


def main(argv=None) -> int:
    """`python -m seqguard.gateway.server`: run the gateway alone (Redis and Triton already running)."""
    import argparse
    p = argparse.ArgumentParser(description="seqguard gRPC gateway (settings from SEQGUARD_* env vars / SEQGUARD_CONFIG)")
    p.add_argument("--model", dest="model_dir")
    p.add_argument("--port", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.load(model_dir=args.model_dir, port=args.port)
    asyncio.run(Gateway(settings).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
