"""Rules offline: `score-file --rules`, `evaluate --rules` and `seqguard backtest` on generated logs."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from seqguard.artifact import ModelArtifact
from seqguard.batch import featurize_for_rules, model_rule_inputs, score_events
from seqguard.detector import ACTIONS
from seqguard.rules import DEFAULT_RULES_PATH, load_rules
from seqguard.schema import read_events

SEQGUARD = [sys.executable, "-m", "seqguard.cli"]

# A pack that reads the model too: risk, a model-only reason, a featuriser reason, an event field.
MODEL_PACK = """
version = 1
name = "model-pack"
[score_actions]
REVIEW = 2.0
[[rule]]
name = "very_risky"
description = "risk in the top 1 per mille of training events"
when = ["risk >= 0.999"]
action = "BLOCK"
[[rule]]
name = "odd_sequence_payment"
description = "an unusual sequence ending in a payment attempt"
when = ["reasons contains UNUSUAL_SEQUENCE", "event_type in [payment, checkout, payment_failed]"]
score = 2.0
[[rule]]
name = "bot_timing"
description = "machine timing"
when = ["reasons contains MACHINE_TIMING"]
action = "REVIEW"
[[rule]]
name = "risky_session"
description = "the session average set the score"
any = ["reasons contains RISKY_SESSION"]
score = 0.5
"""


def _run(*args, check=True):
    p = subprocess.run([*SEQGUARD, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr[-3000:])
    return p


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def gen300(tmp_path_factory):
    """`seqguard generate --users 300` (10 days), with labels."""
    d = tmp_path_factory.mktemp("bt")
    _run("generate", "--users", 300, "--seed", 8, "--days", 10, "--out", d / "ev.jsonl", "--labels", d / "lab.jsonl")
    return d / "ev.jsonl", d / "lab.jsonl"


def test_score_file_rules_columns(small_model, small_log, tmp_path):
    (tmp_path / "m.toml").write_text(MODEL_PACK)
    _run("score-file", "--model", small_model, "--input", small_log[0], "--output", tmp_path / "plain.csv", "--quiet")
    _run("score-file", "--model", small_model, "--input", small_log[0], "--output", tmp_path / "r.csv", "--quiet",
         "--rules", tmp_path / "m.toml")
    plain, ruled = _csv(tmp_path / "plain.csv"), _csv(tmp_path / "r.csv")
    assert plain[0] == ["event_id", "user_id", "risk", "action", "model_version"]
    assert ruled[0] == plain[0] + ["rule_score", "rules_fired", "final_action", "rules_version"]
    assert [r[:5] for r in ruled] == plain          # the model's columns do not move
    rules = load_rules(tmp_path / "m.toml")
    events = list(read_events(str(small_log[0])))
    x, actions = model_rule_inputs(ModelArtifact.load(small_model), events)
    want = rules.evaluate(x, actions)
    fired = [r[6].split(";") if r[6] else [] for r in ruled[1:]]
    assert fired == want.fired_lists()
    assert [r[7] for r in ruled[1:]] == [ACTIONS[a] for a in want.action]
    assert {r[8] for r in ruled[1:]} == {rules.version_tag}
    # the final action is never below the model's, BLOCK wherever risk >= 0.999
    order = {a: i for i, a in enumerate(ACTIONS)}
    assert all(order[r[7]] >= order[r[3]] for r in ruled[1:])
    assert all(r[7] == "BLOCK" for r in ruled[1:] if float(r[2]) >= 0.999)
    counts = {n: sum(n in f for f in fired) for n in rules.names}
    assert counts["very_risky"] > 0 and counts["bot_timing"] > 0 and counts["risky_session"] > 0, counts


def test_model_free_rules_need_no_model(small_model, small_log):
    """The shipped pack reads featuriser outputs only: the same hits with and without the model."""
    rules = load_rules(DEFAULT_RULES_PATH)
    events = list(read_events(str(small_log[0])))
    alone = rules.evaluate(featurize_for_rules(events))
    x, _ = model_rule_inputs(ModelArtifact.load(small_model), events)
    assert np.array_equal(alone.hits, rules.evaluate(x).hits) and alone.hits.any()


def test_bad_rules_file_fails_fast_naming_rule_and_field(small_model, small_log, tmp_path):
    (tmp_path / "bad.toml").write_text('version = 1\n[[rule]]\nname = "x"\ndescription = "d"\n'
                                       'when = ["login_fail_1h >= 3"]\nscore = 1\n')
    p = _run("score-file", "--model", small_model, "--input", small_log[0], "--output", tmp_path / "o.csv",
             "--rules", tmp_path / "bad.toml", check=False)
    assert p.returncode == 2
    assert "rule 'x': field 'when[0]': unknown field 'login_fail_1h'" in p.stderr
    assert not (tmp_path / "o.csv").exists()


def test_backtest_with_labels_model_and_compare(gen300, small_model, tmp_path):
    ev, lab = gen300
    (tmp_path / "m.toml").write_text(MODEL_PACK)
    p = _run("backtest", "--rules", DEFAULT_RULES_PATH, "--events", ev, "--labels", lab, "--model", small_model,
             "--compare", tmp_path / "m.toml", "--out", tmp_path / "bt", "--quiet")
    rep = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    md = (tmp_path / "bt" / "backtest.md").read_text()
    assert "events/s" in p.stderr and "| CHALLENGE |" in p.stdout
    a, b = rep["files"]
    assert a["version"].startswith("default@") and b["version"].startswith("model-pack@")
    assert rep["days"] == 10 and rep["users"] == 300 and rep["model_alerts"] > 0
    # recompute a few numbers from scratch
    events = list(read_events(str(ev)))
    from seqguard.training.evaluate import align_labels, read_labels
    y = align_labels(events, read_labels(str(lab)))[0]
    rules = load_rules(DEFAULT_RULES_PATH)
    hits = rules.evaluate(featurize_for_rules(events)).hits
    _, model_action, _ = score_events(ModelArtifact.load(small_model), events)
    users = np.array([e.user_id for e in events])
    checked = 0
    for k, name in enumerate(rules.names):
        r, m = a["rules"][name], hits[:, k]
        assert r["hits"] == int(m.sum()) == sum(r["daily_hits"])
        assert r["users_hit"] == len(set(users[m]))
        assert r["model_alerts_overlap"] == int((m & (model_action >= 1)).sum())
        if m.any():
            assert r["precision"] == pytest.approx(y[m].mean())
            assert r["recall"] == pytest.approx(m[y == 1].sum() / (y == 1).sum())
            checked += 1
    assert checked >= 10
    for act in ("REVIEW", "CHALLENGE", "BLOCK"):
        code = ACTIONS.index(act)
        assert a["pack"][act]["model"]["hits"] == int((model_action >= code).sum())
        # the combination flags at least what either flags alone
        assert a["pack"][act]["combined"]["hits"] >= max(a["pack"][act]["model"]["hits"], a["pack"][act]["rules"]["hits"])
    assert not a["skipped_need_model"] and b["rules"]["very_risky"]["hits"] > 0
    assert "## A vs B, rule by rule" in md and "`very_risky`" in md and "precision" in md


def test_backtest_without_model_skips_model_rules_and_says_so(gen300, tmp_path):
    ev, _ = gen300
    (tmp_path / "m.toml").write_text(MODEL_PACK)
    _run("backtest", "--rules", tmp_path / "m.toml", "--events", ev, "--out", tmp_path / "bt", "--quiet")
    rep = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    f = rep["files"][0]
    assert f["skipped_need_model"] == ["very_risky", "odd_sequence_payment", "risky_session"]
    assert list(f["rules"]) == ["bot_timing"] and f["rules"]["bot_timing"]["hits"] > 0
    assert "precision" not in f["rules"]["bot_timing"] and rep["model_version"] is None
    md = (tmp_path / "bt" / "backtest.md").read_text()
    assert "Not evaluated" in md and "`very_risky`" in md


def test_evaluate_reports_model_rules_and_combination(small_model, small_log, tmp_path):
    ev, lab, _ = small_log
    _run("evaluate", "--events", ev, "--labels", lab, "--model", small_model, "--report", tmp_path / "r",
         "--rules", DEFAULT_RULES_PATH)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert {"rules", "seqguard_with_rules", "hand_rules"} <= set(metrics["scorers"])
    pack = metrics["rules"]["pack"]
    for act in ("REVIEW", "CHALLENGE", "BLOCK"):
        assert set(pack[act]) == {"rules", "model", "combined"}
        assert pack[act]["model"]["hits"] == metrics["scorers"]["seqguard"]["actions"][act]["flagged"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Rules: `" in md and "model + rules" in md and "`login_failure_burst`" in md
