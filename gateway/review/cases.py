"""What the review app reads and writes in Redis: alerts, their labels, a user's case.

Alerts come from the `<prefix>alerts` stream (gateway/alerts.py AlertRecord), newest first, up
to `scan_alerts` entries per page view: the queue is a window over recent alerts, not an index
(a stream has no secondary index; a deployment that needs months of alerts exports them). An
alert is open until its event carries a label (`<prefix>o:<hmac(event_id)>`, written by
ReportOutcome or by this app through the same RedisStateStore.record_outcome).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..alerts import AlertFormatError, AlertRecord, alerts_stream
from ..holds import SEVERITY
from ..state import RedisStateStore

LABELS = ("FRAUD", "GENUINE")


class FilterError(ValueError):
    """A bad query parameter; names it."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"filter '{field_name}': {reason}")
        self.field = field_name


@dataclass(frozen=True)
class AlertFilter:
    action: str = ""            # "" = any
    rule: str = ""              # exact rule name
    reason: str = ""            # exact reason code
    since_ms: int | None = None
    until_ms: int | None = None
    min_risk: float = 0.0
    include_labelled: bool = False

    @classmethod
    def from_query(cls, q) -> "AlertFilter":
        """From the queue page's query string; FilterError names the bad parameter."""
        action = q.get("action", "")
        if action and action not in SEVERITY:
            raise FilterError("action", f"must be one of {', '.join(SEVERITY)}")
        for name in ("rule", "reason"):
            if len(q.get(name, "")) > 100:
                raise FilterError(name, "at most 100 characters")
        try:
            min_risk = float(q.get("min_risk") or 0.0)
        except ValueError:
            raise FilterError("min_risk", "must be a number") from None
        return cls(action, q.get("rule", "").strip(), q.get("reason", "").strip().upper(),
                   _time_ms(q, "since"), _time_ms(q, "until"), min_risk, q.get("show") == "all")

    def matches(self, a: AlertRecord) -> bool:
        return ((not self.action or a.action == self.action) and (not self.rule or self.rule in a.rules)
                and (not self.reason or self.reason in a.reasons) and a.risk >= self.min_risk
                and (self.since_ms is None or a.ts >= self.since_ms)
                and (self.until_ms is None or a.ts < self.until_ms))


def _time_ms(q, name: str) -> int | None:
    """A datetime-local form value (read as UTC) -> epoch ms."""
    raw = q.get(name, "")
    if not raw:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise FilterError(name, "must be a date and time, e.g. 2026-12-01T08:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


@dataclass
class AlertView:
    alert: AlertRecord
    label: str = ""             # FRAUD / GENUINE once reviewed


@dataclass
class AlertPage:
    alerts: list = field(default_factory=list)   # [AlertView], sorted by risk (highest first), then newest
    scanned: int = 0            # stream entries read
    malformed: int = 0          # entries that are not alert records (shown, never silently dropped)


class CaseReader:
    def __init__(self, redis, prefix: str, scan_alerts: int):
        self.redis = redis
        self.prefix = prefix
        self.stream = alerts_stream(prefix)
        self.scan_alerts = scan_alerts

    async def _recent(self) -> tuple[list[AlertRecord], int, int]:
        entries = await self.redis.xrevrange(self.stream, count=self.scan_alerts)
        out, bad = [], 0
        for _, fields in entries:
            try:
                out.append(AlertRecord.from_fields(fields))
            except AlertFormatError:
                bad += 1
        return out, len(entries), bad

    async def _labels(self, alerts: list[AlertRecord]) -> list[str]:
        if not alerts:
            return []
        raws = await self.redis.mget([self.prefix + "o:" + a.event for a in alerts])
        return [json.loads(raw)["label"] if raw else "" for raw in raws]

    async def queue(self, flt: AlertFilter, limit: int) -> AlertPage:
        recent, scanned, bad = await self._recent()
        hits = [a for a in recent if flt.matches(a)]
        labels = await self._labels(hits)
        views = [AlertView(a, lab) for a, lab in zip(hits, labels) if flt.include_labelled or not lab]
        views.sort(key=lambda v: (-v.alert.risk, -v.alert.ts))
        return AlertPage(views[:limit], scanned, bad)

    async def case(self, user: str) -> AlertPage:
        """Every alert of one (pseudonymised) user in the window, oldest first."""
        recent, scanned, bad = await self._recent()
        mine = sorted((a for a in recent if a.user == user), key=lambda a: (a.ts, a.alert_id))
        labels = await self._labels(mine)
        return AlertPage([AlertView(a, lab) for a, lab in zip(mine, labels)], scanned, bad)


class _KnownPseudonyms:
    """A Pseudonymizer stand-in for ids that are already pseudonymised (alerts carry hmac(event_id)).

    The review app only ever sees hashed event ids; passing them through unchanged lets it store
    labels with RedisStateStore.record_outcome itself (same key, same stream record, same join
    with the gateway's remembered answer as ReportOutcome) instead of a second copy of that code.
    """

    def __call__(self, kind: str, value: str) -> str:
        return value


def outcome_store(redis, prefix: str) -> RedisStateStore:
    """A RedisStateStore used only for record_outcome on hashed event ids (hidden/ttl unused)."""
    return RedisStateStore(redis, _KnownPseudonyms(), hidden=0, ttl_s=1, key_prefix=prefix)
