"""The columnar JSONL reader gives exactly what schema.read_events gives: events, skips, errors."""
import gzip
import json
import random

import numpy as np
import pytest

from seqguard.fastlog import read_events_fast
from seqguard.schema import ReadReport, SchemaError, read_events

GOOD = dict(event_id="e", user_id="u1", ts=1767225600000, event_type="login", item_id=None, category=None,
            amount=None, device_id="d1", ip="1.2.3.4", country="DE", session_id="s1")


def _line(i, **over) -> str:
    return json.dumps({**GOOD, "event_id": f"e{i}", "ts": GOOD["ts"] + i, **over})


def _messy_lines() -> list[str]:
    """Clean runs (read by the fast path) around every oddity validate_event has a rule for."""
    odd = [
        "", "   ",                                                   # blank lines are skipped
        _line(1, item_id="", category=""),                           # "" optional -> missing
        _line(2, amount=12), _line(3, amount=19.99), _line(4, amount=None),
        _line(5).replace('"amount": null', '"amount": NaN'),         # NaN amount -> missing
        _line(6, ts="2026-01-01T00:00:06Z"),                          # RFC 3339 ts
        _line(7, user_id=12345),                                     # a number as an id: str()
        '{"event_id": "broken"',                                     # invalid JSON
        _line(8, amount=-1.0), _line(9, amount="abc"),
        json.dumps({k: v for k, v in json.loads(_line(10)).items() if k != "user_id"}),   # required missing
        _line(11, event_type=""), _line(12, device_id="x" * 300), _line(13, device_id="é" * 200),
        _line(14, extra={"nested": [1, 2]}), _line(15, ts=123), _line(16, ts=True),
        _line(17).replace('"user_id": "u1"', '"user_id": "u1", "user_id": "u2"'),   # duplicate key: last wins
        "[1, 2]", _line(18, session_id="\ud83d\ude00"), _line(19, ts=1767225600019.0),
    ]
    lines = [_line(100 + i) for i in range(40)]
    for k, o in enumerate(odd):
        lines.insert(3 + 5 * k, o)
    return lines


@pytest.fixture
def fast_blocks(monkeypatch):
    """Counts the blocks the columnar path accepted (the rest were read row by row)."""
    import seqguard.fastlog as fl
    seen = {"fast": 0, "exact": 0}
    real = fl._fast_block

    def counting(*a, **k):
        out = real(*a, **k)
        seen["fast" if out is not None else "exact"] += 1
        return out
    monkeypatch.setattr(fl, "_fast_block", counting)
    return seen


def _both(path, mode, block_lines):
    r1, r2 = ReadReport(), ReadReport()
    try:
        a = list(read_events(str(path), on_bad_row=mode, report=r1))
    except SchemaError as e:
        a = ("error", str(e))
    try:
        b = list(read_events_fast(str(path), on_bad_row=mode, report=r2, block_lines=block_lines))
    except SchemaError as e:
        b = ("error", str(e))
    return a, b, r1, r2


@pytest.mark.parametrize("block_lines", [7, 50, 65536])
@pytest.mark.parametrize("mode", ["skip", "error"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_messy_log_read_exactly_as_read_events(tmp_path, mode, block_lines, newline, fast_blocks):
    path = tmp_path / "log.jsonl"
    path.write_bytes(newline.join(_messy_lines()).encode("utf-8", "surrogatepass") + newline.encode())
    a, b, r1, r2 = _both(path, mode, block_lines)
    assert a == b
    assert (r1.rows, r1.kept, r1.skipped) == (r2.rows, r2.kept, r2.skipped)
    if mode == "skip":
        assert r1.kept > 40 and len(r1.skipped) >= 6
        assert fast_blocks["exact"] >= 1 and (fast_blocks["fast"] >= 3 or block_lines > 7)


def test_lone_cr_bom_and_gzip(tmp_path):
    lines = [_line(i) for i in range(30)]
    (tmp_path / "cr.jsonl").write_bytes(("\n".join(lines[:10]) + "\r" + "\n".join(lines[10:]) + "\n").encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    for name in ("cr.jsonl", "bom.jsonl", "z.jsonl.gz"):
        for mode in ("skip", "error"):
            a, b, r1, r2 = _both(tmp_path / name, mode, 8)
            assert a == b and (r1.rows, r1.kept, r1.skipped) == (r2.rows, r2.kept, r2.skipped), name


def test_amount_bits_equal_python_float_parsing(tmp_path):
    """pyarrow's decimal-to-double conversion rounds as Python's float() does (bit for bit)."""
    rng = random.Random(7)
    amounts = ([round(rng.uniform(0, 5000), rng.randint(0, 6)) for _ in range(3000)]
               + [rng.uniform(0, 1e-300) for _ in range(200)] + [999_999_999.999_999_9, 1e9, 0.1, 4.35, 2.675])
    path = tmp_path / "a.jsonl"
    path.write_text("".join(_line(i, amount=a) + "\n" for i, a in enumerate(amounts)))
    a, b, _, _ = _both(path, "error", 65536)
    got = np.array([e.amount for e in b])
    want = np.array([e.amount for e in a])
    assert np.array_equal(got.view(np.int64), want.view(np.int64)) and len(got) == len(amounts)


def test_generated_log_identical(small_log, fast_blocks):
    a, b, r1, r2 = _both(small_log[0], "error", 4096)
    assert len(a) > 10_000 and a == b and r2.kept == len(a)
    assert fast_blocks["exact"] == 0 and fast_blocks["fast"] >= 3


def test_amount_above_the_bound_is_a_bad_row_in_both_readers(tmp_path):
    """schema.MAX_AMOUNT: the columnar reader must not let through what the row reader rejects."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(_line(i, amount=a) + "\n" for i, a in enumerate([5.0, 1e9 + 1, 7.0])))
    a, b, r1, r2 = _both(path, "skip", 65536)
    assert a == b and len(a) == 2 and r1.skipped == r2.skipped == {"amount: must be at most 1e+09": 1}
