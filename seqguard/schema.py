"""Event schema v1: the contract between event logs, the gRPC API and the featuriser.

Every path into seqguard (a JSONL/CSV/Parquet log, a gRPC request) ends in the same
validated shape, so a bad value is rejected at the boundary with the row and field named,
and everything inside can trust its input.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator, NamedTuple

SCHEMA_VERSION = 1

FIELDS = ("event_id", "user_id", "ts", "event_type", "item_id", "category",
          "amount", "device_id", "ip", "country", "session_id")
REQUIRED = ("event_id", "user_id", "ts", "event_type")
OPTIONAL_STR = ("item_id", "category", "device_id", "ip", "country", "session_id")

COMMON_EVENT_TYPES = (
    "login", "login_failed", "logout", "search", "view_item", "add_to_cart",
    "remove_from_cart", "checkout", "payment", "payment_failed", "review",
    "change_password", "change_email", "change_address", "add_payment_method",
    "redeem_coupon",
)

MAX_STR_LEN = 256                 # longer ids are rejected: nothing legitimate needs more
MIN_TS_MS = 946_684_800_000       # 2000-01-01: older timestamps are unit mistakes (seconds)
MAX_TS_MS = 4_102_444_800_000     # 2100-01-01
# the largest money amount accepted: far above any real order, and small enough that the featuriser's
# log-amount statistics stay finite and meaningful (one absurd value must not own a user's history)
MAX_AMOUNT = 1e9


class SchemaError(ValueError):
    """A value that breaks event schema v1; names where (source, row) and which field."""

    def __init__(self, field: str, reason: str, row: int | None = None, source: str | None = None):
        self.field, self.reason, self.row, self.source = field, reason, row, source
        where = ""
        if source is not None:
            where += f"{source}: "
        if row is not None:
            where += f"row {row}: "
        super().__init__(f"{where}field '{field}': {reason}")


class Event(NamedTuple):
    """One validated event. Optional strings are None when absent; amount is None when absent."""
    event_id: str
    user_id: str
    ts: int
    event_type: str
    item_id: str | None = None
    category: str | None = None
    amount: float | None = None
    device_id: str | None = None
    ip: str | None = None
    country: str | None = None
    session_id: str | None = None

    def to_dict(self) -> dict:
        return self._asdict()


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


def parse_ts(value) -> int:
    """Epoch milliseconds (int, or an integral float / digit string) or an RFC 3339 string."""
    if isinstance(value, bool):
        raise ValueError("must be epoch milliseconds (int) or an RFC 3339 string, got a boolean")
    if isinstance(value, int):
        ts = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"must be integral epoch milliseconds, got {value!r}")
        ts = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            ts = int(s)
        elif _RFC3339.match(s):
            dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace(" ", "T"))
            if dt.tzinfo is None:
                raise ValueError(f"RFC 3339 timestamp needs a UTC offset: {value!r}")
            ts = int(round(dt.timestamp() * 1000))
        else:
            raise ValueError(f"not epoch milliseconds nor an RFC 3339 timestamp: {value[:40]!r}")
    else:
        raise ValueError(f"must be epoch milliseconds (int) or an RFC 3339 string, got {type(value).__name__}")
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        raise ValueError(f"{ts} is outside 2000-01-01..2100-01-01 in epoch milliseconds (seconds given?)")
    return ts


def _str_field(raw: dict, name: str, required: bool) -> str | None:
    value = raw.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        if required:
            raise SchemaError(name, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SchemaError(name, f"must be a string, got {type(value).__name__}")
    value = str(value)
    if len(value) > MAX_STR_LEN:
        raise SchemaError(name, f"is {len(value)} characters long; at most {MAX_STR_LEN} allowed")
    return value


def parse_amount(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("must be a number >= 0, got a boolean")
    try:
        amount = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number >= 0, got {str(value)[:40]!r}") from None
    if math.isnan(amount):
        if isinstance(value, float):   # a NaN cell in a Parquet/CSV column means "missing"
            return None
        raise ValueError("must be a number >= 0, got NaN")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"must be a finite number >= 0, got {amount}")
    if amount > MAX_AMOUNT:
        raise ValueError(f"must be at most {MAX_AMOUNT:.0e}, got {amount:.6g}")
    return amount


def validate_event(raw: dict) -> Event:
    """Turn one raw mapping (schema-v1 names) into an Event or raise SchemaError naming the field."""
    if not isinstance(raw, dict):
        raise SchemaError("<row>", f"must be an object, got {type(raw).__name__}")
    event_id = _str_field(raw, "event_id", True)
    user_id = _str_field(raw, "user_id", True)
    if raw.get("ts") is None or raw.get("ts") == "":
        raise SchemaError("ts", "is required")
    try:
        ts = parse_ts(raw["ts"])
    except ValueError as e:
        raise SchemaError("ts", str(e)) from None
    event_type = _str_field(raw, "event_type", True)
    try:
        amount = parse_amount(raw.get("amount"))
    except ValueError as e:
        raise SchemaError("amount", str(e)) from None
    opt = {name: _str_field(raw, name, False) for name in OPTIONAL_STR}
    return Event(event_id, user_id, ts, event_type, opt["item_id"], opt["category"], amount,
                 opt["device_id"], opt["ip"], opt["country"], opt["session_id"])


# --------------------------------------------------------------------------- readers

def parse_column_map(spec: str | None) -> dict[str, str]:
    """'user_id=customer,ts=timestamp' -> {'customer': 'user_id', 'timestamp': 'ts'} (source -> schema)."""
    mapping: dict[str, str] = {}
    if not spec:
        return mapping
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--map entry {part!r} must look like schema_field=your_column")
        ours, theirs = (p.strip() for p in part.split("=", 1))
        if ours not in FIELDS:
            raise ValueError(f"--map: {ours!r} is not a schema-v1 field ({', '.join(FIELDS)})")
        mapping[theirs] = ours
    return mapping


def _renamed(raw: dict, mapping: dict[str, str]) -> dict:
    if not mapping:
        return raw
    return {mapping.get(k, k): v for k, v in raw.items()}


def _iter_raw_rows(path: str) -> Iterator[tuple[int, object]]:
    """(row number as a person would count it in the file, raw row) for JSONL, CSV or Parquet."""
    ext = os.path.splitext(path.removesuffix(".gz"))[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=65536):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
        return
    opener = open
    if path.endswith(".gz"):
        import gzip
        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            for i, rec in enumerate(reader, start=2):   # line 1 is the header
                yield i, rec
        else:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, SchemaError("<row>", f"invalid JSON ({e.msg})")


@dataclass
class ReadReport:
    """What a reader did: rows read, rows kept, and skipped rows counted per reason."""
    rows: int = 0
    kept: int = 0
    skipped: dict | None = None

    def summary(self) -> str:
        lines = [f"read {self.rows} rows, kept {self.kept}"]
        for reason, n in sorted((self.skipped or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:>8} x {reason}")
        return "\n".join(lines)


def read_events(path: str, column_map: dict[str, str] | None = None, on_bad_row: str = "error",
                report: ReadReport | None = None) -> Iterator[Event]:
    """Yield validated Events in file order.

    on_bad_row='error' raises SchemaError naming the file, row and field; 'skip' counts
    skipped rows per reason into `report` (nothing is dropped silently).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError("on_bad_row must be 'error' or 'skip'")
    report = report if report is not None else ReadReport()
    report.skipped = report.skipped or {}
    mapping = column_map or {}
    source = os.path.basename(path)
    for row, raw in _iter_raw_rows(path):
        report.rows += 1
        try:
            if isinstance(raw, SchemaError):
                raise raw
            ev = validate_event(_renamed(raw, mapping))
        except SchemaError as e:
            if on_bad_row == "error":
                raise SchemaError(e.field, e.reason, row=row, source=source) from None
            key = f"{e.field}: {e.reason.split(',')[0][:60]}"
            report.skipped[key] = report.skipped.get(key, 0) + 1
            continue
        report.kept += 1
        yield ev


def events_from_dicts(rows: Iterable[dict]) -> list[Event]:
    """Validate in-memory dicts (e.g. from the generator); raises on the first bad one."""
    out = []
    for i, raw in enumerate(rows, start=1):
        try:
            out.append(validate_event(raw))
        except SchemaError as e:
            raise SchemaError(e.field, e.reason, row=i) from None
    return out
