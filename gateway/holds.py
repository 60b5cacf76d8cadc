"""Holds: a user, device or IP that gets at least a given action on every event until the hold expires.

    <prefix>h:<kind>:<hmac(id)>   the hold (JSON: action, reason, who, created_ms, expires_ms), TTL = expiry
    <prefix>audit                 stream of who set, released or confirmed which hold, and why

kind is user / device / ip and hmac(id) is the gateway's Pseudonymizer with the same kind names
as the state keys (gateway/state.py), so a user's hold key ends in the same hex as its `sg:u:`
key and as the `user` field of its alerts: the review app finds a case's holds without ever
seeing a raw id. A hold and its audit record are written in one transaction.

apply_holds() is the one rule for what a hold does to an answer; the gateway's engine and the
offline replay (score-file, with a HoldIndex built from the audit stream) both call it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from redis.exceptions import RedisError

from seqguard.explain import Reason

from .state import Pseudonymizer, StateUnavailable

HOLD_KINDS = ("user", "device", "ip")
HOLD_ACTIONS = ("REVIEW", "CHALLENGE", "BLOCK")
SEVERITY = {"ALLOW": 0, "REVIEW": 1, "CHALLENGE": 2, "BLOCK": 3}
HOLD_REASON = "HOLD"
MAX_HOLD_TTL_S = 366 * 86400        # a hold is an intervention, not a ban list: it must end; renew it if needed
AUDIT_STREAM_MAX = 1_000_000        # approximate cap on <prefix>audit (export it before it wraps)
MAX_REASON_CHARS, MAX_WHO_CHARS = 200, 64


class HoldError(ValueError):
    """Invalid hold input; names the field (the gRPC layer answers INVALID_ARGUMENT with it)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"field '{field_name}': {reason}")
        self.field = field_name


@dataclass(frozen=True)
class Hold:
    kind: str
    key: str                # hmac(id), hex
    action: str
    reason: str
    who: str
    created_ms: int
    expires_ms: int

    def to_json(self) -> str:
        d = asdict(self)
        del d["kind"], d["key"]        # in the Redis key already
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, kind: str, key: str, raw) -> "Hold":
        d = json.loads(raw)
        return cls(kind, key, d["action"], d["reason"], d["who"], int(d["created_ms"]), int(d["expires_ms"]))


def _check_text(field_name: str, value: str, max_chars: int, required: bool = True) -> None:
    if required and not value:
        raise HoldError(field_name, "is required")
    if len(value) > max_chars or not value.isprintable():
        raise HoldError(field_name, f"at most {max_chars} printable characters")


def validate_hold(kind: str, action: str, reason: str, who: str, ttl_s: int) -> None:
    if kind not in HOLD_KINDS:
        raise HoldError("kind", f"must be one of {', '.join(HOLD_KINDS)}, got {kind!r}")
    if action not in HOLD_ACTIONS:
        raise HoldError("action", f"must be one of {', '.join(HOLD_ACTIONS)}, got {action!r}")
    _check_text("reason", reason, MAX_REASON_CHARS)
    _check_text("who", who, MAX_WHO_CHARS)
    if not 1 <= ttl_s <= MAX_HOLD_TTL_S:
        raise HoldError("ttl_s", f"must be in 1..{MAX_HOLD_TTL_S} seconds, got {ttl_s}")


def apply_holds(actions: list[str], holds_per_event: list[list[Hold]]) -> tuple[list[str], list[list[Reason]]]:
    """Per event: the action raised to at least every active hold's action, and one HOLD reason per hold.

    Never lowers an action. Reasons list the strongest hold first.
    """
    out_actions, out_reasons = [], []
    for action, holds in zip(actions, holds_per_event, strict=True):
        ranked = sorted(holds, key=lambda h: -SEVERITY[h.action])
        for h in ranked:
            if SEVERITY[h.action] > SEVERITY[action]:
                action = h.action
        out_actions.append(action)
        out_reasons.append([Reason(HOLD_REASON, f"{h.kind} on hold ({h.action}): {h.reason}", 0.0, [])
                            for h in ranked])
    return out_actions, out_reasons


def event_hold_ids(ev) -> list[tuple[str, str]]:
    """(kind, raw id) of everything about an event that can be on hold (a schema Event)."""
    out = [("user", ev.user_id)]
    if ev.device_id:
        out.append(("device", ev.device_id))
    if ev.ip:
        out.append(("ip", ev.ip))
    return out


class HoldStore:
    def __init__(self, redis, pseudonymize: Pseudonymizer, prefix: str, audit_max: int = AUDIT_STREAM_MAX):
        self.redis = redis
        self.pseudonymize = pseudonymize
        self.prefix = prefix
        self.audit_stream = prefix + "audit"
        self.audit_max = audit_max
        self._release = redis.register_script(_RELEASE_LUA)

    def key(self, kind: str, hashed: str) -> str:
        return f"{self.prefix}h:{kind}:{hashed}"

    def hashed(self, kind: str, raw_id: str) -> str:
        return self.pseudonymize(kind, raw_id)

    async def set(self, kind: str, *, raw_id: str = "", hashed: str = "", action: str, reason: str, who: str,
                  ttl_s: int, now_ms: int | None = None) -> Hold:
        """Put (or replace) a hold; by raw id (the API) or by hashed id (the review app)."""
        validate_hold(kind, action, reason, who, ttl_s)
        h = hashed or self.hashed(kind, _required_id(raw_id))
        now = int(time.time() * 1000) if now_ms is None else now_ms
        hold = Hold(kind, h, action, reason, who, now, now + ttl_s * 1000)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.key(kind, h), hold.to_json(), ex=ttl_s)
                pipe.xadd(self.audit_stream, {"op": "set", "kind": kind, "key": h, "action": action, "reason": reason,
                                              "who": who, "ts": str(now), "expires_ms": str(hold.expires_ms)},
                          maxlen=self.audit_max, approximate=True)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis hold write failed: {type(e).__name__}: {e}") from None
        return hold

    async def release(self, kind: str, *, raw_id: str = "", hashed: str = "", who: str, reason: str = "",
                      now_ms: int | None = None) -> Hold | None:
        """End a hold now; the released hold, or None if there was none (nothing audited then)."""
        if kind not in HOLD_KINDS:
            raise HoldError("kind", f"must be one of {', '.join(HOLD_KINDS)}, got {kind!r}")
        _check_text("who", who, MAX_WHO_CHARS)
        _check_text("reason", reason, MAX_REASON_CHARS, required=False)
        h = hashed or self.hashed(kind, _required_id(raw_id))
        now = int(time.time() * 1000) if now_ms is None else now_ms
        try:
            raw = await self._release(keys=[self.key(kind, h), self.audit_stream],
                                      args=[self.audit_max, kind, h, who, reason, now])
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis hold release failed: {type(e).__name__}: {e}") from None
        return Hold.from_json(kind, h, raw) if raw else None

    async def audit(self, op: str, hold: Hold, who: str, reason: str = "") -> None:
        """An audit record about an existing hold without changing it (e.g. op "confirm" by a reviewer)."""
        try:
            await self.redis.xadd(self.audit_stream, {"op": op, "kind": hold.kind, "key": hold.key, "action": hold.action,
                                                  "reason": reason, "who": who, "ts": str(int(time.time() * 1000)),
                                                  "expires_ms": str(hold.expires_ms)},
                              maxlen=self.audit_max, approximate=True)
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis audit write failed: {type(e).__name__}: {e}") from None

    async def get(self, pairs: Iterable[tuple[str, str]]) -> list[Hold]:
        """Active holds among (kind, hashed id) pairs, in one MGET."""
        pairs = list(pairs)
        if not pairs:
            return []
        try:
            raws = await self.redis.mget([self.key(k, h) for k, h in pairs])
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis hold read failed: {type(e).__name__}: {e}") from None
        return [Hold.from_json(k, h, raw) for (k, h), raw in zip(pairs, raws) if raw]

    def keys_for(self, ev) -> list[str]:
        """The hold keys that apply to an event (its user, device and IP), for the batch's one MGET."""
        return [self.key(k, self.hashed(k, v)) for k, v in event_hold_ids(ev)]

    def parse(self, keys: list[str], raws: list) -> dict[str, Hold]:
        """key -> Hold for the keys that hold one (what keys_for's keys read back)."""
        out = {}
        for k, raw in zip(keys, raws):
            if raw:
                _, kind, hashed = k.rsplit(":", 2)
                out[k] = Hold.from_json(kind, hashed, raw)
        return out

    async def for_events(self, events) -> list[list[Hold]]:
        """Per event, the holds on its user, device and IP (one MGET for the whole batch)."""
        per = [[(k, self.hashed(k, v)) for k, v in event_hold_ids(ev)] for ev in events]
        found = {(h.kind, h.key): h for h in await self.get({p for ps in per for p in ps})}
        return [[found[p] for p in ps if p in found] for ps in per]

    async def list_holds(self, kind: str = "", limit: int = 100) -> list[Hold]:
        """Active holds (of one kind, or all), newest first; SCAN, so for consoles, not the scoring path."""
        pattern = self.key(kind, "*") if kind else f"{self.prefix}h:*"
        pairs = []
        try:
            async for k in self.redis.scan_iter(match=pattern, count=1000):
                _, knd, h = k.decode().rsplit(":", 2)
                pairs.append((knd, h))
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis hold scan failed: {type(e).__name__}: {e}") from None
        holds = await self.get(pairs)
        return sorted(holds, key=lambda h: -h.created_ms)[:limit]

    async def history(self, count: int = 1000) -> list[dict]:
        """The newest audit records, newest first (str fields + the stream id)."""
        try:
            entries = await self.redis.xrevrange(self.audit_stream, count=count)
        except (RedisError, OSError, TimeoutError) as e:
            raise StateUnavailable(f"redis audit read failed: {type(e).__name__}: {e}") from None
        return [{"id": i.decode(), **{k.decode(): v.decode() for k, v in f.items()}} for i, f in entries]


def _required_id(raw_id: str) -> str:
    if not raw_id:
        raise HoldError("id", "is required")
    if len(raw_id) > 256:
        raise HoldError("id", "longer than 256 characters")
    return raw_id


# KEYS: hold key, audit stream; ARGV: audit cap, kind, hashed id, who, reason, now ms
_RELEASE_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
redis.call('DEL', KEYS[1])
local h = cjson.decode(v)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'op', 'release', 'kind', ARGV[2], 'key', ARGV[3],
           'action', h['action'], 'reason', ARGV[5], 'who', ARGV[4], 'ts', ARGV[6],
           'expires_ms', tostring(h['expires_ms']))
return v
"""


class HoldIndex:
    """Holds over time, rebuilt from audit records, for offline replay (score-file).

    A hold set at t0 with expiry t1 applies to events with t0 <= ts < t1, cut short by a release.
    Replaying a log with the audit stream of the same period then gives each event the holds the
    gateway saw when it scored it (to the precision of the two clocks).
    """

    def __init__(self, pseudonymize: Pseudonymizer):
        self.pseudonymize = pseudonymize
        self._windows: dict[tuple[str, str], list[list]] = {}   # (kind, key) -> [[start, end, Hold], ...]

    @classmethod
    def from_audit(cls, records: Iterable[Mapping], pseudonymize: Pseudonymizer) -> "HoldIndex":
        """records: audit stream entries (str fields) in any order; sorted by their time here."""
        idx = cls(pseudonymize)
        for rec in sorted(records, key=lambda r: int(r["ts"])):
            k = (rec["kind"], rec["key"])
            ts = int(rec["ts"])
            if rec["op"] == "set":
                idx._close(k, ts)
                hold = Hold(rec["kind"], rec["key"], rec["action"], rec["reason"], rec["who"], ts,
                            int(rec["expires_ms"]))
                idx._windows.setdefault(k, []).append([ts, hold.expires_ms, hold])
            elif rec["op"] == "release":
                idx._close(k, ts)
        return idx

    def _close(self, k, ts: int) -> None:
        for w in self._windows.get(k, ()):
            w[1] = min(w[1], ts)

    def for_events(self, events) -> list[list[Hold]]:
        out = []
        for ev in events:
            held = []
            for kind, raw in event_hold_ids(ev):
                for start, end, hold in self._windows.get((kind, self.pseudonymize(kind, raw)), ()):
                    if start <= ev.ts < end:
                        held.append(hold)
            out.append(held)
        return out


async def export_audit(redis, prefix: str, out_path: str, page: int = 10_000) -> int:
    """Write the audit stream (oldest first) as JSONL, one record per line with the stream's string
    fields: what `seqguard score-file --holds-audit` replays. Returns the number of records."""
    stream, start, n = prefix + "audit", "-", 0
    tmp = f"{out_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        while True:
            try:
                entries = await redis.xrange(stream, min=start, count=page)
            except (RedisError, OSError, TimeoutError) as e:
                raise StateUnavailable(f"redis audit read failed: {type(e).__name__}: {e}") from None
            for entry_id, fields in entries:
                f.write(json.dumps({k.decode(): v.decode() for k, v in fields.items()}, separators=(",", ":")) + "\n")
                n += 1
            if len(entries) < page:
                break
            start = "(" + entries[-1][0].decode()
    import os
    os.replace(tmp, out_path)
    return n


def read_audit(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
