"""Tests for training/generate.py: determinism, schema shape, label semantics, writers.

Kept fast (a few hundred users, generated once per module) so they run in the default suite.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections import defaultdict

import pytest

from seqguard.training.generate import (ATTACK_FAMILIES, CUSTOM_EVENT_TYPES, EVENT_FIELDS, EVENT_TYPES,
                               HARD_NEGATIVES, LABEL_FIELDS, VARIANTS, WORLD_HARD_NEGATIVES, generate,
                               main_generate, write_events, write_labels)
from seqguard.training.world_config import WorldConfig

N_USERS, SEED = 400, 11
START = 1_767_225_600_000
DAYS = 30
AMOUNT_TYPES = {"add_to_cart", "checkout", "payment", "payment_failed", "add_payment_method", "redeem_coupon"}
IPV4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


@pytest.fixture(scope="module")
def data():
    return generate(N_USERS, SEED)


def test_deterministic_by_seed(data):
    events, labels = data
    again_e, again_l = generate(N_USERS, SEED)
    assert again_e == events and again_l == labels
    other_e, _ = generate(N_USERS, SEED + 1)
    assert other_e != events


def test_schema_v1_shape(data):
    events, labels = data
    assert len(events) == len(labels) > 0
    assert EVENT_FIELDS == ("event_id", "user_id", "ts", "event_type", "item_id", "category",
                            "amount", "device_id", "ip", "country", "session_id")
    for e in events:
        assert tuple(e) == EVENT_FIELDS
    for lab in labels:
        assert tuple(lab) == LABEL_FIELDS
    for e, lab in zip(events, labels):
        assert e["event_id"] == lab["event_id"] and e["user_id"] == lab["user_id"]


def test_ids_unique_and_sorted(data):
    events, _ = data
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    keys = [(e["ts"], e["event_id"]) for e in events]
    assert keys == sorted(keys)
    assert all(START <= e["ts"] < START + DAYS * 86_400_000 for e in events)
    assert len({e["user_id"] for e in events}) == N_USERS


def test_field_values(data):
    events, _ = data
    allowed = set(EVENT_TYPES) | set(CUSTOM_EVENT_TYPES)
    for e in events:
        assert isinstance(e["ts"], int)
        assert e["event_type"] in allowed
        a = e["amount"]
        if a is not None:
            assert e["event_type"] in AMOUNT_TYPES, e
            assert isinstance(a, float) and a >= 0 and round(a, 2) == a
        if e["ip"] is not None:
            m = IPV4.match(e["ip"])
            assert m and all(0 <= int(o) <= 255 for o in m.groups()), e["ip"]
        if e["country"] is not None:
            assert re.fullmatch(r"[A-Z]{2}", e["country"])
        for k in ("item_id", "category", "device_id", "session_id"):
            assert e[k] is None or (isinstance(e[k], str) and e[k])
    types = {e["event_type"] for e in events}
    assert set(EVENT_TYPES) <= types
    assert set(CUSTOM_EVENT_TYPES) & types
    custom = sum(e["event_type"] in CUSTOM_EVENT_TYPES for e in events)
    assert 0.001 < custom / len(events) < 0.02
    # a few optional fields are missing, as in real logs
    assert any(e["device_id"] is None for e in events)


def test_accepted_by_schema_validator(data):
    schema = pytest.importorskip("seqguard.schema")
    events, _ = data
    assert len(schema.events_from_dicts(events[:20000])) == min(20000, len(events))


def test_every_family_and_variant_present(data):
    _, labels = data
    seen = {(lab["family"], lab["variant"]) for lab in labels if lab["label"] == 1}
    assert seen == {(f, v) for f in ATTACK_FAMILIES for v in VARIANTS}
    hard = {lab["family"] for lab in labels if lab["label"] == 0}
    assert hard == set(HARD_NEGATIVES) | {"normal"}
    share = sum(lab["label"] for lab in labels) / len(labels)
    assert 0.01 < share < 0.2


def test_label_semantics(data):
    events, labels = data
    for lab in labels:
        assert lab["label"] in (0, 1)
        if lab["label"] == 1:
            assert lab["family"] in ATTACK_FAMILIES and lab["variant"] in VARIANTS
        else:
            assert lab["family"] in HARD_NEGATIVES or lab["family"] == "normal"
            assert lab["variant"] == ""


def test_account_takeover_victims_have_history(data):
    """Only the attacker's events are positive: the victim's earlier behaviour stays label 0."""
    events, labels = data
    first_attack, first_own = {}, {}
    for e, lab in zip(events, labels):
        u = e["user_id"]
        if lab["family"] == "account_takeover":
            first_attack.setdefault(u, e["ts"])
        elif lab["label"] == 0:
            first_own.setdefault(u, e["ts"])
    assert first_attack
    for u, t in first_attack.items():
        assert u in first_own and first_own[u] < t


def test_rings_share_infrastructure(data):
    """Credential stuffing spans many accounts; brushing/promo rings share devices."""
    events, labels = data
    victims = defaultdict(set)
    ring_dev = defaultdict(set)
    for e, lab in zip(events, labels):
        if lab["family"] == "credential_stuffing":
            victims[lab["variant"]].add(e["user_id"])
        if lab["family"] in ("brushing", "promo_abuse") and e["device_id"]:
            ring_dev[e["device_id"]].add(e["user_id"])
    assert all(len(v) >= 5 for v in victims.values())
    assert max(len(v) for v in ring_dev.values()) >= 2


def test_small_and_short_worlds():
    assert generate(0, 1) == ([], [])
    e, l = generate(5, 1, days=2)
    assert len(e) == len(l) > 0
    assert all(START <= x["ts"] < START + 2 * 86_400_000 for x in e)
    e, l = generate(60, 2, days=3)
    assert {lab["family"] for lab in l if lab["label"]} <= set(ATTACK_FAMILIES)


def _typed(row: dict) -> dict:
    out = {}
    for k in EVENT_FIELDS:
        v = row[k]
        if v == "" or v is None:
            out[k] = None
        elif k == "ts":
            out[k] = int(v)
        elif k == "amount":
            out[k] = float(v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def sample(data):
    events, _ = data
    # a slice that certainly contains None cells and amounts
    return events[:3000]


def test_write_jsonl_roundtrip(sample, tmp_path):
    p = tmp_path / "sub" / "events.jsonl"
    write_events(sample, p)
    with open(p, encoding="utf-8") as f:
        back = [json.loads(line) for line in f]
    assert back == sample
    assert all(tuple(r) == EVENT_FIELDS for r in back)


def test_write_csv_roundtrip(sample, tmp_path):
    p = tmp_path / "events.csv"
    write_events(sample, str(p))
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == EVENT_FIELDS
        back = [_typed(r) for r in reader]
    assert back == sample


def test_write_parquet_roundtrip(sample, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", exc_type=ImportError)
    p = tmp_path / "events.parquet"
    write_events(sample, str(p))
    table = pq.read_table(str(p))
    assert tuple(table.column_names) == EVENT_FIELDS
    assert table.to_pylist() == sample


def test_write_labels_and_main_generate(tmp_path, capsys):
    out, lab = tmp_path / "ev.jsonl", tmp_path / "lab.jsonl"
    main_generate(users=150, seed=3, out=str(out), labels=str(lab), days=10)
    ev_rows = [json.loads(x) for x in out.read_text().splitlines()]
    lab_rows = [json.loads(x) for x in lab.read_text().splitlines()]
    assert len(ev_rows) == len(lab_rows) > 0
    assert [r["event_id"] for r in ev_rows] == [r["event_id"] for r in lab_rows]
    assert all(tuple(r) == LABEL_FIELDS for r in lab_rows)
    err = capsys.readouterr().err
    assert "events:" in err and "account_takeover" in err

    e, l = generate(50, 4, days=5)
    p = tmp_path / "labels.jsonl"
    write_labels(l, p)
    assert [json.loads(x) for x in p.read_text().splitlines()] == l


# ---------------------------------------------------------------------------- randomised worlds
# World 1 renames types, adds one extra type and leaves up to 25% of optional fields empty: it
# exercises every surface change. 300 users over 10 days keep these tests to a few seconds.

W_USERS, W_SEED, W_DAYS = 300, 5, 10


@pytest.fixture(scope="module")
def world1():
    cfg = WorldConfig.draw(1)
    assert cfg.rename and cfg.extra_types and max(cfg.missing.values()) > 0.1
    return cfg, generate(W_USERS, W_SEED, days=W_DAYS, world=cfg)


def test_world_is_deterministic_per_k(world1):
    cfg, (events, labels) = world1
    assert WorldConfig.draw(1) == cfg
    assert WorldConfig.from_json(cfg.to_json()) == cfg
    again = generate(W_USERS, W_SEED, days=W_DAYS, world=WorldConfig.draw(1))
    assert again == (events, labels)


def test_different_worlds_differ(world1):
    cfg, (events, _) = world1
    others = [WorldConfig.draw(k) for k in (0, 2, 3)]
    assert all(o != cfg for o in others)
    assert len({o.bot_event_share for o in others} | {cfg.bot_event_share}) == 4
    e0, _ = generate(W_USERS, W_SEED, days=W_DAYS, world=others[0])
    assert [e["event_type"] for e in e0[:500]] != [e["event_type"] for e in events[:500]]
    # a world is not the fixed generator either
    assert generate(W_USERS, W_SEED, days=W_DAYS)[0] != events


def test_world_renames_types_consistently(world1):
    cfg, (events, labels) = world1
    plain_cfg = dataclasses.replace(cfg, rename={})
    plain, plain_labels = generate(W_USERS, W_SEED, days=W_DAYS, world=plain_cfg)
    assert plain_labels == labels
    assert len(plain) == len(events)
    for a, b in zip(plain, events):
        assert b["event_type"] == cfg.rename.get(a["event_type"], a["event_type"])
        assert cfg.original_type(b["event_type"]) == a["event_type"]
        assert {k: v for k, v in a.items() if k != "event_type"} == {k: v for k, v in b.items() if k != "event_type"}
    types = {e["event_type"] for e in events}
    assert not types & set(cfg.rename), "an original name survived renaming"
    assert set(cfg.rename.values()) <= types
    assert set(cfg.extra_types) <= types
    allowed = set(EVENT_TYPES) | set(CUSTOM_EVENT_TYPES) | set(cfg.extra_types)
    assert {cfg.original_type(t) for t in types} <= allowed


def test_world_labels_align(world1):
    cfg, (events, labels) = world1
    assert [e["event_id"] for e in events] == [l["event_id"] for l in labels]
    assert [e["user_id"] for e in events] == [l["user_id"] for l in labels]
    keys = [(e["ts"], e["event_id"]) for e in events]
    assert keys == sorted(keys) and len(set(e["event_id"] for e in events)) == len(events)
    assert all(START <= e["ts"] < START + W_DAYS * 86_400_000 for e in events)
    fams = {l["family"] for l in labels if l["label"] == 1}
    assert fams <= set(ATTACK_FAMILIES) and len(fams) >= 5
    assert {l["family"] for l in labels if l["label"] == 0} <= set(HARD_NEGATIVES) | set(WORLD_HARD_NEGATIVES) | {"normal"}
    # the crawler fleet's share of ALL events is the world's (up to events cut at the log's end)
    bot = sum(l["family"] == "bot_scraping" for l in labels) / len(labels)
    assert 0.5 * cfg.bot_event_share <= bot <= 1.5 * cfg.bot_event_share
    # optional fields go missing at about the world's rate; required ones never
    n = len(events)
    assert all(e["event_id"] and e["user_id"] and e["event_type"] and e["ts"] for e in events)
    plain, _ = generate(W_USERS, W_SEED, days=W_DAYS, world=dataclasses.replace(cfg, missing={}))
    for f, p in cfg.missing.items():
        had = sum(e[f] is not None for e in plain)
        kept = sum(e[f] is not None for e in events)
        if had > 2000:
            assert abs((1 - kept / had) - p) < 0.03, (f, p, kept, had)


def test_world_schema_accepted(world1):
    _, (events, _) = world1
    from seqguard.schema import events_from_dicts
    assert len(events_from_dicts(events)) == len(events)


def test_main_generate_world_writes_config(tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    main_generate(users=80, seed=2, out=str(out), labels=None, days=None, world=3)
    cfg = WorldConfig.from_json((tmp_path / "w.world.json").read_text())
    assert cfg == WorldConfig.draw(3)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    span = max(r["ts"] for r in rows) - START
    assert (cfg.days - 1) * 86_400_000 < span < cfg.days * 86_400_000
    assert "world 3:" in capsys.readouterr().err
    # without --world nothing extra is written
    main_generate(users=30, seed=2, out=str(tmp_path / "p.jsonl"), labels=None, days=None)
    assert not (tmp_path / "p.world.json").exists()
