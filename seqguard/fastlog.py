"""Reading a JSONL event log fast: blocks of lines parsed by pyarrow and validated as columns.

`schema.read_events` parses and validates one row at a time in Python, the largest cost of
`score-file` after the kernel. Here a block of lines is parsed by pyarrow's
JSON reader against the schema-v1 column types, and the block is accepted only if every rule of
`schema.validate_event` holds for whole columns. pyarrow rejects anything unusual (a string
where a number belongs, duplicate keys, a bad surrogate, an array row, ...); any such block, or
one that breaks a rule, is read again row by row by `schema.validate_event`, so errors, skips,
row numbers and the events kept are exactly those of `read_events` (tests/test_fastlog.py).
CSV, Parquet and `--map` logs use `read_events` as they are.
"""
from __future__ import annotations

import io
import itertools
import json
import os
from typing import Iterator

import numpy as np

from .schema import (MAX_AMOUNT, MAX_STR_LEN, MAX_TS_MS, MIN_TS_MS, OPTIONAL_STR, REQUIRED, Event, ReadReport, SchemaError,
                     read_events, validate_event)

BLOCK_LINES = 65536                 # lines per pyarrow call: ~16 MB of a typical log
_STRINGS = ("event_id", "user_id", "event_type") + OPTIONAL_STR


def _schema():
    import pyarrow as pa
    return pa.schema([(f, pa.int64() if f == "ts" else pa.float64() if f == "amount" else pa.string())
                      for f in Event._fields])


def read_events_fast(path: str, column_map: dict[str, str] | None = None, on_bad_row: str = "error",
                     report: ReadReport | None = None, block_lines: int = BLOCK_LINES) -> Iterator[Event]:
    """`schema.read_events`, the same events, errors and report, faster on JSONL logs."""
    ext = os.path.splitext(path.removesuffix(".gz"))[1].lower()
    if column_map or ext in (".csv", ".parquet"):
        yield from read_events(path, column_map, on_bad_row, report)
        return
    if on_bad_row not in ("error", "skip"):
        raise ValueError("on_bad_row must be 'error' or 'skip'")
    report = report if report is not None else ReadReport()
    report.skipped = report.skipped or {}
    source = os.path.basename(path)
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    schema = _schema()
    with opener(path, "rb") as f:
        first_line = 1
        while True:
            lines = list(itertools.islice(f, block_lines))
            if not lines:
                return
            block = b"".join(lines)
            events = _fast_block(block, lines, schema, first_line == 1)
            if events is None:
                text_lines = list(io.StringIO(block.decode("utf-8"), newline=""))   # split as a text file is
                events = list(_exact_rows(text_lines, first_line, on_bad_row, report, source))
                first_line += len(text_lines)
            else:
                report.rows += len(events)
                report.kept += len(events)
                first_line += len(lines)
            yield from events


def _fast_block(block: bytes, lines: list[bytes], schema, at_start: bool) -> list[Event] | None:
    """The block's events if pyarrow parses it and every column passes validate_event's rules, else None."""
    import pyarrow.json as pj
    # Python's text reader also ends lines at a lone \r and keeps a BOM (then rejects the row): exact path
    if (b"\r" in block and block.count(b"\r") != block.count(b"\r\n")) or (at_start and block.startswith(b"\xef\xbb\xbf")):
        return None
    try:
        t = pj.read_json(io.BytesIO(block),
                         read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(block) + 1)),
                         parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except Exception:                        # noqa: BLE001  (pyarrow's ArrowInvalid and friends: exact path)
        return None
    if t.num_rows != sum(1 for line in lines if line.strip()) or not _valid(t):
        return None
    cols = []
    for name in Event._fields:
        col = t.column(name).to_numpy(zero_copy_only=False).tolist()   # (far cheaper than to_pylist; None = null)
        if name in OPTIONAL_STR:
            col = [v or None for v in col]                      # "" is missing, as in validate_event
        elif name == "amount":
            col = [None if v != v else v for v in col]        # null (NaN here) and NaN are missing (parse_amount)
        cols.append(col)
    # every field is given: tuple.__new__ makes the same Event as Event(*row) without the Python-level
    # __new__ of a NamedTuple (a third of this function's time)
    return list(map(tuple.__new__, itertools.repeat(Event), zip(*cols)))


def _valid(t) -> bool:
    """validate_event's rules, per column: required present and non-empty, ids <= MAX_STR_LEN
    characters, ts in range, amount finite and in [0, MAX_AMOUNT] where given."""
    import pyarrow.compute as pc
    for name in REQUIRED:
        if t.column(name).null_count:
            return False
    for name in _STRINGS:
        col = t.column(name)
        if col.null_count == len(col):
            continue
        lo, hi = pc.min_max(pc.binary_length(col)).values()       # bytes >= characters
        if name in REQUIRED and lo.as_py() < 1:
            return False
        if hi.as_py() > MAX_STR_LEN and pc.max(pc.utf8_length(col)).as_py() > MAX_STR_LEN:
            return False
    lo, hi = pc.min_max(t.column("ts")).values()
    if lo.as_py() < MIN_TS_MS or hi.as_py() > MAX_TS_MS:
        return False
    amount = t.column("amount").to_numpy(zero_copy_only=False)
    given = amount[~np.isnan(amount)]
    return bool(np.all(np.isfinite(given)) and np.all(given >= 0) and np.all(given <= MAX_AMOUNT))


def _exact_rows(lines: list[str], first_line: int, on_bad_row: str, report: ReadReport,
                source: str) -> Iterator[Event]:
    """Rows one at a time, exactly as schema.read_events reads them."""
    for row, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        report.rows += 1
        try:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError("<row>", f"invalid JSON ({e.msg})") from None
            ev = validate_event(raw)
        except SchemaError as e:
            if on_bad_row == "error":
                raise SchemaError(e.field, e.reason, row=row, source=source) from None
            key = f"{e.field}: {e.reason.split(',')[0][:60]}"
            report.skipped[key] = report.skipped.get(key, 0) + 1
            continue
        report.kept += 1
        yield ev

