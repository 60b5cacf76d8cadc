"""Alerts: the record format of the `<prefix>alerts` stream and the webhook sink that delivers it.

The gateway's atomic state write appends one record per REVIEW / CHALLENGE / BLOCK decision (and
per rule hit) to the Redis Stream `<prefix>alerts`, in the same script as the state, so an alert
exists if and only if its decision was applied. AlertRecord below is the one place that names
the record's fields; the writer (gateway/state.py) and every reader use it.

The webhook sink reads that stream in a consumer group (at-least-once): it POSTs each alert as
JSON, signed with HMAC-SHA256 over the body, and acknowledges (XACK) only after the receiver
answered 2xx. A failed POST is retried with exponential backoff; after `max_attempts` (or at
once for a 4xx the receiver will never accept) the alert moves to `<prefix>alerts:dead` in the
same transaction as its XACK. Entries left pending by a sink that died are taken over with
XAUTOCLAIM. A sink killed between a POST and its XACK delivers that alert again: receivers
deduplicate by the `X-Seqguard-Alert-Id` header (= alert_id, unique per alert).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("seqguard.alerts")

ACTIONS = ("ALLOW", "REVIEW", "CHALLENGE", "BLOCK")   # ALLOW: a rule hit that did not change the action
SIGNATURE_HEADER = "X-Seqguard-Signature"
ALERT_ID_HEADER = "X-Seqguard-Alert-Id"


def alerts_stream(prefix: str) -> str:
    return prefix + "alerts"


def dead_letter_stream(prefix: str) -> str:
    return prefix + "alerts:dead"


class AlertFormatError(ValueError):
    """A stream entry that is not an alert record; names the field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"alert field '{field_name}': {reason}")
        self.field = field_name


def _text(v) -> str:
    return v.decode("utf-8", "surrogatepass") if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class AlertRecord:
    """One alert. All identifiers are pseudonymised (hex keyed hashes, gateway/state.py Pseudonymizer)
    except `user_raw`, present only when the deployment opted in (setting alerts_include_raw_ids)."""
    alert_id: str               # the event's apply sequence number: unique, and the receivers' idempotency key
    event: str                  # Pseudonymizer("event", event_id), as in the sg:o: label keys and the
                                # sg:outcomes stream: labels join on it
    user: str                   # hmac(user_id): the hex after "sg:u:" in the user key
    risk: float
    action: str                 # one of ACTIONS
    reasons: tuple = ()         # reason codes, strongest first
    rules: tuple = ()           # names of the rules that fired
    mv: str = ""                # model version
    ts: int = 0                 # event time, epoch ms
    created_ms: int = 0         # when the decision was applied, epoch ms
    user_raw: str | None = None

    FIELDS = ("alert_id", "event", "user", "risk", "action", "reasons", "rules", "mv", "ts", "created_ms")
    OPTIONAL = ("user_raw",)

    def to_fields(self) -> dict[str, str]:
        """Stream entry fields, all strings, in FIELDS order (+ user_raw when set)."""
        out = {"alert_id": self.alert_id, "event": self.event, "user": self.user, "risk": repr(float(self.risk)),
               "action": self.action, "reasons": json.dumps(list(self.reasons), separators=(",", ":")),
               "rules": json.dumps(list(self.rules), separators=(",", ":")), "mv": self.mv,
               "ts": str(int(self.ts)), "created_ms": str(int(self.created_ms))}
        if self.user_raw is not None:
            out["user_raw"] = self.user_raw
        return out

    @classmethod
    def from_fields(cls, raw: Mapping) -> "AlertRecord":
        """Parse a stream entry (bytes or str keys and values); AlertFormatError names the bad field."""
        f = {_text(k): _text(v) for k, v in raw.items()}
        for name in cls.FIELDS:
            if name not in f:
                raise AlertFormatError(name, "missing")
        if not f["alert_id"]:
            raise AlertFormatError("alert_id", "empty")
        if f["action"] not in ACTIONS:
            raise AlertFormatError("action", f"must be one of {', '.join(ACTIONS)}, got {f['action']!r}")
        try:
            risk = float(f["risk"])
        except ValueError:
            raise AlertFormatError("risk", f"not a number: {f['risk']!r}") from None
        ints = {}
        for name in ("ts", "created_ms"):
            try:
                ints[name] = int(f[name])
            except ValueError:
                raise AlertFormatError(name, f"not an integer: {f[name]!r}") from None
        lists = {}
        for name in ("reasons", "rules"):
            try:
                v = json.loads(f[name])
            except json.JSONDecodeError:
                v = None
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise AlertFormatError(name, f"must be a JSON list of strings, got {f[name]!r}")
            lists[name] = tuple(v)
        return cls(f["alert_id"], f["event"], f["user"], risk, f["action"], lists["reasons"], lists["rules"],
                   f["mv"], ints["ts"], ints["created_ms"], f.get("user_raw"))

    def to_json(self) -> dict:
        """The webhook payload."""
        out = {k: getattr(self, k) for k in self.FIELDS}
        out["reasons"], out["rules"] = list(self.reasons), list(self.rules)
        if self.user_raw is not None:
            out["user_raw"] = self.user_raw
        return out


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: "sha256=" + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """For receivers: constant-time check of a signature header against the body."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header)


# ------------------------------------------------------------------ the webhook sink
@dataclass(frozen=True)
class SinkConfig:
    url: str
    secret: bytes = field(repr=False)
    # one consumer group per destination: two sinks in different groups each get every alert,
    # sinks in the same group share the work
    group: str = "webhook"
    # a restarted sink with the same name first re-reads its own unacknowledged entries;
    # default "<host>-<pid>", so another replica's entries come back via claim_idle_ms instead
    consumer: str = ""
    batch: int = 64
    concurrency: int = 16               # POSTs in flight at once (one slow alert does not hold up the rest)
    block_ms: int = 1000                # XREADGROUP wait; also how quickly a stop request is noticed
    # 8 tries, 0.5 s doubling to 30 s: ~1 minute of receiver outage before anything is dead-lettered
    max_attempts: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    http_timeout_s: float = 5.0
    # an entry pending this long without a try is presumed abandoned by a dead sink and taken over.
    # A live sink re-claims its entries before every retry, so only dead consumers' entries age
    claim_idle_ms: int = 60_000
    claim_every_s: float = 5.0
    allow_insecure_http: bool = False   # http:// only to loopback unless set (the payload carries risk data)

    def validate(self) -> None:
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"webhook url must be http(s)://host/..., got {self.url!r}")
        if u.scheme == "http" and u.hostname not in ("127.0.0.1", "localhost", "::1") and not self.allow_insecure_http:
            raise ValueError("webhook url: plain http to a non-loopback host; use https "
                             "(or --allow-insecure-http on a trusted network)")
        if len(self.secret) < 16:
            raise ValueError("webhook secret must be >= 16 bytes")
        for name in ("batch", "concurrency", "block_ms", "max_attempts", "claim_idle_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s or self.http_timeout_s <= 0:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s and http_timeout_s > 0")

    def consumer_name(self) -> str:
        return self.consumer or f"{socket.gethostname()}-{os.getpid()}"


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.delivered = Counter("seqguard_alerts_delivered", "alerts the receiver accepted (2xx)", registry=r)
        self.retried = Counter("seqguard_alerts_retried", "failed POSTs that will be tried again", registry=r)
        self.dead_lettered = Counter("seqguard_alerts_dead_lettered", "alerts moved to the dead-letter stream, "
                                     "by why (attempts, rejected = 4xx, malformed)", ["why"], registry=r)
        self.missing = Counter("seqguard_alerts_missing", "pending entries trimmed from the stream before "
                               "delivery (raise the stream's cap)", registry=r)
        self.claimed = Counter("seqguard_alerts_claimed", "entries taken over from a dead consumer", registry=r)
        self.pending = Gauge("seqguard_alerts_pending", "delivered to a sink but not yet acknowledged", registry=r)
        self.lag = Gauge("seqguard_alerts_lag", "alerts in the stream not yet read by the group", registry=r)
        self._server = None

    def serve(self, host: str, port: int) -> int:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Permanent(Exception):
    """The receiver refused the alert in a way retrying cannot change (4xx other than 408/429)."""


class WebhookSink:
    def __init__(self, redis, prefix: str, config: SinkConfig, metrics: SinkMetrics | None = None):
        config.validate()
        self.redis = redis
        self.cfg = config
        self.stream = alerts_stream(prefix)
        self.dead = dead_letter_stream(prefix)
        self.consumer = config.consumer_name()
        self.metrics = metrics or SinkMetrics()
        self._in_hand: set = set()      # entry ids this sink is working on (skipped by its own XAUTOCLAIM)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set = set()
        self._stop = asyncio.Event()
        self._http = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Deliver until stop(); survives Redis outages (waits and reconnects)."""
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=self.cfg.http_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._http = http
            own_backlog_done = False
            next_claim = 0.0
            while not self._stop.is_set():
                try:
                    if not own_backlog_done:
                        await self._ensure_group()
                        await self._drain_own_pending()
                        own_backlog_done = True
                    loop = asyncio.get_running_loop()
                    if loop.time() >= next_claim:
                        await self._claim_abandoned()
                        await self._update_gauges()
                        next_claim = loop.time() + self.cfg.claim_every_s
                    got = await self.redis.xreadgroup(self.cfg.group, self.consumer, {self.stream: ">"},
                                                  count=self.cfg.batch, block=self.cfg.block_ms)
                    for _stream, entries in got or ():
                        await self._deliver_all(entries)
                except (RedisError, OSError) as e:
                    if "NOGROUP" in str(e):
                        own_backlog_done = False    # the stream was deleted (e.g. FLUSHALL): make the group again
                    log.warning("alert sink: redis unavailable (%s: %s); retrying in 1 s", type(e).__name__, e)
                    await self._sleep(1.0)
            # stopping: tasks in backoff return at once (their entries stay pending); POSTs finish
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        try:
            # id 0: a new group starts at the beginning, so alerts written before the first sink are delivered
            await self.redis.xgroup_create(self.stream, self.cfg.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _drain_own_pending(self) -> None:
        """Entries this consumer name read but never acknowledged (a previous life killed mid-delivery)."""
        start = "0"
        while not self._stop.is_set():
            got = await self.redis.xreadgroup(self.cfg.group, self.consumer, {self.stream: start}, count=self.cfg.batch)
            entries = got[0][1] if got else []
            if not entries:
                return
            await self._deliver_all(entries)
            start = entries[-1][0]

    async def _claim_abandoned(self) -> None:
        start = "0-0"
        while not self._stop.is_set():
            res = await self.redis.xautoclaim(self.stream, self.cfg.group, self.consumer, self.cfg.claim_idle_ms,
                                          start_id=start, count=self.cfg.batch)
            start, entries = res[0], [e for e in res[1] if e[0] not in self._in_hand]
            # XAUTOCLAIM reports (and drops) deleted entries whatever their idle time; one this sink
            # is already handling is counted by its delivery task
            deleted = [i for i in (res[2] if len(res) > 2 else []) if i not in self._in_hand]
            if deleted:
                # XAUTOCLAIM already dropped them from the pending list: trimmed before anyone delivered them
                self.metrics.missing.inc(len(deleted))
                log.error("alert sink: %d pending alerts were trimmed from %s before delivery", len(deleted),
                          self.stream)
            if entries:
                self.metrics.claimed.inc(len(entries))
                log.info("alert sink: took over %d alerts from a dead consumer", len(entries))
                await self._deliver_all(entries)
            if start in (b"0-0", "0-0"):
                return

    async def _update_gauges(self) -> None:
        for g in await self.redis.xinfo_groups(self.stream):
            if _text(g.get("name", b"")) == self.cfg.group:
                self.metrics.pending.set(g.get("pending") or 0)
                self.metrics.lag.set(g.get("lag") or 0)

    async def _deliver_all(self, entries) -> None:
        """Start one delivery task per entry, at most `concurrency` at once (waits for a free slot).

        Not one batch at a time: an alert in backoff must not hold up the alerts read after it.
        """
        for entry_id, fields in entries:
            await self._slots.acquire()
            if self._stop.is_set():         # stopping: the rest stay pending for the next start
                self._slots.release()
                return
            self._in_hand.add(entry_id)
            task = asyncio.create_task(self._deliver_in_slot(entry_id, fields))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver_in_slot(self, entry_id, fields) -> None:
        try:
            await self._deliver(entry_id, fields)
        except Exception as e:  # noqa: BLE001 - e.g. Redis down at XACK: still pending, claimed again later
            log.warning("alert sink: %s left pending (%s: %s)", _text(entry_id), type(e).__name__, e)
        finally:
            self._in_hand.discard(entry_id)
            self._slots.release()

    async def _deliver(self, entry_id, fields) -> None:
        if not fields:          # read back from the pending list after the stream was trimmed past it
            await self.redis.xack(self.stream, self.cfg.group, entry_id)
            self.metrics.missing.inc()
            log.error("alert sink: pending alert %s was trimmed from %s before delivery", _text(entry_id), self.stream)
            return
        try:
            alert = AlertRecord.from_fields(fields)
        except AlertFormatError as e:
            await self._dead_letter(entry_id, fields, 0, str(e), "malformed")
            return
        body = json.dumps(alert.to_json(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.cfg.secret, body),
                   ALERT_ID_HEADER: alert.alert_id, "Idempotency-Key": alert.alert_id}
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                await self._post(body, headers)
            except _Permanent as e:
                await self._dead_letter(entry_id, fields, attempt, str(e), "rejected")
                return
            except Exception as e:  # noqa: BLE001 - any transport failure is retried, then dead-lettered
                error = f"{type(e).__name__}: {e}"
                if attempt == self.cfg.max_attempts:
                    await self._dead_letter(entry_id, fields, attempt, error, "attempts")
                    return
                self.metrics.retried.inc()
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (attempt - 1))
                # jitter: a receiver coming back is not hit by every waiting alert in the same instant
                if await self._sleep(delay * random.uniform(0.5, 1.0)):
                    return      # stopping: the entry stays pending and is delivered after a restart
                # reset its idle time, so no other sink takes it over while this one is still trying
                await self.redis.xclaim(self.stream, self.cfg.group, self.consumer, 0, [entry_id], justid=True)
                continue
            await self.redis.xack(self.stream, self.cfg.group, entry_id)
            self.metrics.delivered.inc()
            return

    async def _post(self, body: bytes, headers: dict) -> None:
        async with self._http.post(self.cfg.url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                return
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                raise _Permanent(f"HTTP {resp.status}")
            raise RuntimeError(f"HTTP {resp.status}")

    async def _dead_letter(self, entry_id, fields, attempts: int, error: str, why: str) -> None:
        """Copy the entry to the dead-letter stream and acknowledge it, atomically (both or neither)."""
        rec = {_text(k): _text(v) for k, v in fields.items()}
        rec.update(source_id=_text(entry_id), group=self.cfg.group, attempts=str(attempts), error=error[:500],
                   why=why, failed_ms=str(int(time.time() * 1000)))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead, rec)
            pipe.xack(self.stream, self.cfg.group, entry_id)
            await pipe.execute()
        self.metrics.dead_lettered.labels(why).inc()
        log.warning("alert sink: alert %s dead-lettered after %d attempts (%s)", rec.get("alert_id", "?"),
                    attempts, error)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True if stopped."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False


async def redrive_dead_letters(redis, prefix: str, limit: int = 10_000) -> tuple[int, int]:
    """Move dead-lettered alerts back to the alerts stream (after the receiver is fixed).

    Each goes back as a new entry with its original fields (same alert_id: receivers that saw an
    earlier try deduplicate); copy and delete are one transaction. Entries that are not alert
    records stay in the dead-letter stream. Returns (moved, kept).
    """
    stream, dead = alerts_stream(prefix), dead_letter_stream(prefix)
    moved = kept = 0
    for entry_id, fields in await redis.xrange(dead, count=limit):
        try:
            alert = AlertRecord.from_fields(fields)
        except AlertFormatError:
            kept += 1
            continue
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, alert.to_fields())
            pipe.xdel(dead, entry_id)
            await pipe.execute()
        moved += 1
    return moved, kept


# ------------------------------------------------------------------ `seqguard alerts-sink`
SECRET_ENV = "SEQGUARD_ALERTS_WEBHOOK_SECRET"


def read_secret(path: str | None) -> bytes:
    """The signing secret from a file (first line) or the environment; never a command-line value."""
    if path:
        with open(path, "rb") as f:
            secret = f.read().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        raise ValueError(f"no webhook secret: pass --secret-file or set {SECRET_ENV}")
    return secret


def add_sink_args(p) -> None:
    p.add_argument("--url", help="receiver URL; every alert is POSTed there as JSON (required unless --redrive-dead)")
    p.add_argument("--secret-file", default=os.environ.get("SEQGUARD_ALERTS_WEBHOOK_SECRET_FILE"),
                   help=f"file holding the HMAC-SHA256 signing secret (>= 16 bytes); else ${SECRET_ENV}. "
                        f"Receivers check the {SIGNATURE_HEADER} header (sha256=<hex hmac of the body>) and "
                        f"deduplicate by {ALERT_ID_HEADER}")
    p.add_argument("--group", default="webhook", help="consumer group (one per destination)")
    p.add_argument("--consumer", default="", help="consumer name (default host-pid); reuse it after a restart "
                   "to re-deliver this sink's unacknowledged alerts at once")
    p.add_argument("--max-attempts", type=int, default=8, help="tries before an alert goes to <prefix>alerts:dead")
    p.add_argument("--backoff-initial", type=float, default=0.5, metavar="S")
    p.add_argument("--backoff-max", type=float, default=30.0, metavar="S")
    p.add_argument("--http-timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--claim-idle-ms", type=int, default=60_000,
                   help="take over alerts another sink left unacknowledged this long (it died)")
    p.add_argument("--allow-insecure-http", action="store_true", help="allow http:// to a non-loopback host")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--redrive-dead", action="store_true",
                   help="instead of running: move the dead-lettered alerts back into the alerts stream (once the "
                        "receiver is fixed), print how many, and exit")


def main_sink(args) -> int:
    """Run the sink until SIGINT/SIGTERM. Redis from the gateway's settings (SEQGUARD_REDIS_*)."""
    import signal

    from .redisconn import connect_redis, key_prefix
    from .settings import Settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.load()
    if args.redrive_dead:
        return _redrive(settings)
    if not args.url:
        raise ValueError("--url is required")
    cfg = SinkConfig(url=args.url, secret=read_secret(args.secret_file), group=args.group, consumer=args.consumer,
                     max_attempts=args.max_attempts, backoff_initial_s=args.backoff_initial,
                     backoff_max_s=args.backoff_max, http_timeout_s=args.http_timeout,
                     claim_idle_ms=args.claim_idle_ms, allow_insecure_http=args.allow_insecure_http)
    cfg.validate()

    async def run() -> None:
        redis = connect_redis(settings, timeout_s=cfg.block_ms / 1000 + 5.0)
        metrics = SinkMetrics()
        if args.metrics_port:
            metrics.serve(settings.metrics_host or settings.host, args.metrics_port)
        sink = WebhookSink(redis, key_prefix(settings), cfg, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sink.stop)
        log.info("alert sink %s (group %s) delivering %s to %s", sink.consumer, cfg.group, sink.stream,
                 urlsplit(cfg.url)._replace(query="", fragment="").geturl())
        try:
            await sink.run()
        finally:
            metrics.close()
            await redis.aclose()

    asyncio.run(run())
    return 0


def _redrive(settings) -> int:
    from .redisconn import connect_redis, key_prefix

    async def run() -> tuple[int, int]:
        redis = connect_redis(settings, timeout_s=10.0)
        try:
            return await redrive_dead_letters(redis, key_prefix(settings))
        finally:
            await redis.aclose()
    moved, kept = asyncio.run(run())
    print(json.dumps({"redriven": moved, "kept_malformed": kept}))
    return 0
