"""Event schema v1 at the boundary: bad rows are named by file, row and field; nothing dropped silently."""
import json

import pytest

from seqguard.schema import ReadReport, SchemaError, parse_column_map, read_events, validate_event

GOOD = {"event_id": "e1", "user_id": "u1", "ts": 1767225600000, "event_type": "login"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row, field, words", [
    ({k: v for k, v in GOOD.items() if k != "user_id"}, "user_id", "required"),
    ({**GOOD, "ts": "yesterday"}, "ts", "RFC 3339"),
    ({**GOOD, "ts": 1767225600}, "ts", "seconds"),
    ({**GOOD, "ts": True}, "ts", "boolean"),
    ({**GOOD, "amount": -3}, "amount", ">= 0"),
    ({**GOOD, "amount": "NaN"}, "amount", "NaN"),
    ({**GOOD, "device_id": {"a": 1}}, "device_id", "string"),
    ({**GOOD, "ip": "x" * 1000}, "ip", "characters"),
])
def test_bad_row_names_row_and_field(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "ev.jsonl", [GOOD, GOOD | {"event_id": "e2"}, row])
    with pytest.raises(SchemaError) as exc:
        list(read_events(path))
    assert exc.value.row == 3 and exc.value.field == field
    assert "ev.jsonl" in str(exc.value) and "row 3" in str(exc.value) and words in str(exc.value)


def test_skip_mode_counts_every_reason(tmp_path):
    rows = [GOOD, {**GOOD, "ts": "bad"}, {**GOOD, "user_id": None}, {**GOOD, "user_id": ""}, GOOD]
    path = write_jsonl(tmp_path / "ev.jsonl", rows)
    rep = ReadReport()
    kept = list(read_events(path, on_bad_row="skip", report=rep))
    assert len(kept) == 2 and rep.rows == 5 and rep.kept == 2
    assert sum(rep.skipped.values()) == 3
    assert any(k.startswith("user_id") and n == 2 for k, n in rep.skipped.items())


def test_invalid_json_line_is_named(tmp_path):
    p = tmp_path / "ev.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(SchemaError, match="row 2"):
        list(read_events(str(p)))


def test_rfc3339_and_csv_and_column_map(tmp_path):
    p = tmp_path / "ev.csv"
    p.write_text("id,customer,when,what,amount\nx1,c9,2026-01-01T00:00:01.5Z,payment,12.5\nx2,c9,1767225602000,my_type,\n")
    evs = list(read_events(str(p), parse_column_map("event_id=id,user_id=customer,ts=when,event_type=what")))
    assert [e.ts for e in evs] == [1767225601500, 1767225602000]
    assert evs[0].amount == 12.5 and evs[1].amount is None and evs[1].event_type == "my_type"
    with pytest.raises(SchemaError) as exc:
        list(read_events(str(p)))           # without the map the required fields are missing
    assert exc.value.row == 2 and exc.value.field == "event_id"


def test_unknown_event_type_is_valid():
    assert validate_event({**GOOD, "event_type": "never_seen_before"}).event_type == "never_seen_before"


def test_bad_map_spec():
    with pytest.raises(ValueError, match="not a schema-v1 field"):
        parse_column_map("userid=customer")
