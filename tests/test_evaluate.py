"""`seqguard evaluate` and its baselines: metric arithmetic, report files, baseline sanity."""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import numpy as np
import pytest

from seqguard.featurizer import (ContextStore, Featurizer, TokenHasher, Vocabulary, featurize_log,
                                 ip_prefix)
from seqguard.schema import Event
from seqguard.training.baselines import (AGGREGATE_NAMES, default_rules, hand_rules_score, rule_hits,
                                user_aggregate_iforest_score, user_aggregates)
from seqguard.training.evaluate import (LabelError, align_labels, evaluate, main_evaluate, read_labels,
                               threshold_at_fpr)

T0 = 1_767_225_600_000
ATTACKS = ("account_takeover", "card_testing", "credential_stuffing", "bot_scraping", "brushing",
           "promo_abuse", "fake_reviews")


# --------------------------------------------------------------------------- hand-made cases

def _toy(n_users=400, per_user=25, attack_users=40, seed=0):
    """Events + aligned labels: the last 5 events of the first `attack_users` users are attacks."""
    rng = np.random.default_rng(seed)
    events, labels = [], []
    types = ("login", "view_item", "search", "add_to_cart", "checkout", "payment")
    for u in range(n_users):
        t = T0 + int(rng.integers(0, 86_400_000))
        for k in range(per_user):
            t += int(rng.integers(1_000, 600_000))
            et = types[k % len(types)]
            events.append(Event(f"e{u}-{k}", f"u{u}", t, et, amount=25.0 if et == "payment" else None,
                                device_id=f"d{u}", ip=f"10.0.{u % 250}.1", country="US", session_id=f"s{u}"))
            bad = u < attack_users and k >= per_user - 5
            fam = ATTACKS[u % 2] if bad else "normal"
            labels.append({"event_id": events[-1].event_id, "user_id": f"u{u}", "label": int(bad),
                           "family": fam, "variant": ("fast" if u % 4 < 2 else "slow") if bad else ""})
    return events, labels


def test_threshold_at_fpr_never_exceeds_target_with_ties():
    neg = np.array([0.0] * 90 + [1.0] * 5 + [2.0] * 5)
    t = threshold_at_fpr(neg, 0.07)          # 7 may be flagged; the tie block of 10 at >= 1 is too many
    assert t == 2.0 and np.mean(neg >= t) == 0.05
    assert np.mean(neg >= threshold_at_fpr(neg, 0.10)) == 0.10
    assert np.mean(neg >= threshold_at_fpr(neg, 0.001)) == 0.0
    assert threshold_at_fpr(np.arange(1000.0), 0.01) == 990.0


def test_metrics_perfect_random_inverse_and_challenge_arithmetic(tmp_path):
    events, labels = _toy()
    y = np.array([l["label"] for l in labels])
    rng = np.random.default_rng(1)
    model = np.where(y == 1, 0.9 + 0.1 * rng.random(len(y)), 0.95 * rng.random(len(y)))  # imperfect model
    scores = {"seqguard": model, "perfect": y + 0.01 * rng.random(len(y)),
              "random": rng.random(len(y)), "inverse": -(y + 0.01 * rng.random(len(y)))}
    m = evaluate(events, labels, scores, {"REVIEW": 0.5, "CHALLENGE": 0.9, "BLOCK": 0.99}, tmp_path,
                 plots=False, progress=False, quiet=True)
    s = m["scorers"]
    assert s["perfect"]["all"]["roc_auc"] == 1.0 and s["perfect"]["all"]["pr_auc"] == pytest.approx(1.0)
    assert s["perfect"]["all"]["at_fpr"]["0.01"]["recall"] == 1.0
    assert s["perfect"]["all"]["at_fpr"]["0.001"]["recall"] == 1.0
    assert s["perfect"]["payments"]["roc_auc"] == 1.0
    assert s["perfect"]["user"]["roc_auc"] == 1.0
    assert all(v == 1.0 for v in s["perfect"]["family_recall_at_1pct_fpr"].values())
    assert abs(s["random"]["all"]["roc_auc"] - 0.5) < 0.05
    assert s["random"]["all"]["at_fpr"]["0.01"]["recall"] < 0.05
    assert s["inverse"]["all"]["roc_auc"] == 0.0

    # CHALLENGE for the model: risk >= 0.9, by hand
    flag = model >= 0.9
    tp, fp = int((flag & (y == 1)).sum()), int((flag & (y == 0)).sum())
    ch = s["seqguard"]["challenge"]
    assert (ch["tp"], ch["fp"]) == (tp, fp)
    assert ch["precision"] == pytest.approx(tp / (tp + fp)) and ch["recall"] == pytest.approx(tp / y.sum())
    assert ch["f1"] == pytest.approx(2 * ch["precision"] * ch["recall"] / (ch["precision"] + ch["recall"]))
    # a baseline gets (at most) the same label-0 flag rate as the model at each action
    for a in ("REVIEW", "CHALLENGE", "BLOCK"):
        target = m["thresholds"]["model_label0_flag_rate"][a]
        for k in ("random", "perfect"):
            assert s[k]["actions"][a]["fpr"] <= target + 1e-12
            assert s[k]["actions"][a]["fpr"] >= target - 0.002      # continuous scores: hits it closely
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report.md").is_file()

    # every family / variant where a scorer out-recalls the model is listed, and nothing else
    wins = {(w["level"], w["name"], w["scorer"]) for w in m["baseline_wins"]}
    expected = set()
    for level, key in (("family", "family_recall_at_1pct_fpr"), ("variant", "family_variant_recall_at_1pct_fpr")):
        for name, mine in s["seqguard"][key].items():
            for k in ("perfect", "random", "inverse"):
                if s[k][key][name] > mine + 0.0005:
                    expected.add((level, name, k))
    assert wins == expected
    assert any(k == "perfect" for _, _, k in wins)        # the imperfect model misses some attack events
    assert all(w["recall"] > w["model_recall"] for w in m["baseline_wins"])
    assert "Where another scorer recalls more than the model" in (tmp_path / "report.md").read_text()


def test_labels_errors_name_the_line_and_count_missing(tmp_path):
    p = tmp_path / "lab.jsonl"
    p.write_text('{"event_id": "a", "label": 0}\n{"event_id": "b", "label": 2}\n')
    with pytest.raises(LabelError, match="line 2"):
        read_labels(str(p))
    p.write_text('{"event_id": "a", "label": 0}\nnot json\n')
    with pytest.raises(LabelError, match="line 2"):
        read_labels(str(p))
    p.write_text('{"event_id": "a", "label": 1, "family": "card_testing", "variant": "fast"}\n')
    labels = read_labels(str(p))
    evs = [Event("a", "u", T0, "login"), Event("b", "u", T0 + 1, "login"), Event("c", "u", T0 + 2, "login")]
    with pytest.raises(LabelError, match="2 of 3 events have no label"):
        align_labels(evs, labels)
    y, fam, var = align_labels(evs[:1], labels)
    assert y.tolist() == [1] and fam.tolist() == ["card_testing"] and var.tolist() == ["fast"]


# --------------------------------------------------------------------------- baselines

def _features_in_input_order(events):
    fz = Featurizer(Vocabulary.learn((e.event_type for e in events), 1), TokenHasher())
    order, _, feats = featurize_log(fz, events, ContextStore())
    out = np.empty_like(feats)
    out[order] = feats
    return out


def test_hand_rules_rank_takeover_event_above_normal():
    evs = []
    t = T0
    for d in range(10):                     # ten days of ordinary use from one device in the US
        for k, et in enumerate(("login", "view_item", "add_to_cart", "checkout", "payment", "logout")):
            t = T0 + d * 86_400_000 + k * 120_000
            evs.append(Event(f"n{d}-{k}", "alice", t, et, amount=30.0 if et == "payment" else None,
                             device_id="d-home", ip="81.2.3.4", country="US", session_id=f"s{d}"))
    t += 86_400_000
    normal = Event("normal", "alice", t, "login", device_id="d-home", ip="81.2.3.4", country="US", session_id="s-x")
    evs.append(normal)
    base = t + 86_400_000
    for k in range(6):                      # a burst of failed logins from a new device and a new country
        evs.append(Event(f"f{k}", "alice", base + k * 5_000, "login_failed", device_id="d-evil",
                         ip="203.0.113.9", country="RU", session_id="s-evil"))
    evs.append(Event("ato", "alice", base + 40_000, "login", device_id="d-evil", ip="203.0.113.9",
                     country="RU", session_id="s-evil"))
    feats = _features_in_input_order(evs)
    score = hand_rules_score(evs, feats)
    i_norm, i_ato = evs.index(normal), len(evs) - 1
    hits = {k: bool(v[i_ato]) for k, v in rule_hits(evs, feats).items()}
    assert hits["login_failure_burst"]
    assert score[i_ato] > score[i_norm] + 3.0
    assert score[i_norm] < min(r.score for r in default_rules().rules)        # an ordinary login hits no rule
    first_evil = next(i for i, e in enumerate(evs) if e.event_id == "f0")   # novelty fires here
    h0 = {k: bool(v[first_evil]) for k, v in rule_hits(evs, feats).items()}
    assert h0["new_device"] and h0["new_country"] and h0["new_device_and_country"]
    assert np.isfinite(score).all() and score.shape == (len(evs),)


def test_user_aggregates_match_brute_force():
    events, _ = _toy(n_users=30, per_user=12, attack_users=0)
    rng = np.random.default_rng(3)
    # vary devices / countries / failures / amounts, shuffle input order
    evs = []
    for e in events:
        r = rng.random()
        evs.append(e._replace(device_id=None if r < 0.1 else f"d{rng.integers(0, 5)}",
                              country=f"C{rng.integers(0, 3)}", ip=f"1.2.{rng.integers(0, 4)}.{rng.integers(0, 3)}",
                              event_type="login_failed" if r > 0.9 else e.event_type,
                              amount=float(rng.integers(1, 500)) if e.event_type == "payment" else None))
    evs = [evs[i] for i in rng.permutation(len(evs))]
    X = user_aggregates(evs)
    assert X.shape == (len(evs), len(AGGREGATE_NAMES))
    col = {n: i for i, n in enumerate(AGGREGATE_NAMES)}
    st = defaultdict(lambda: {"n": 0, "dev": set(), "cty": set(), "ip": set(), "pfx": set(), "fail": 0, "amt": []})
    dev_users = defaultdict(set)
    for i in sorted(range(len(evs)), key=lambda i: (evs[i].ts, i)):
        e = evs[i]
        if e.device_id:
            dev_users[e.device_id].add(e.user_id)
            assert X[i, col["log_device_users_so_far"]] == pytest.approx(math.log1p(len(dev_users[e.device_id])))
    for i in sorted(range(len(evs)), key=lambda i: (evs[i].user_id, evs[i].ts, i)):
        e, s = evs[i], st[evs[i].user_id]
        s["n"] += 1
        if e.device_id:
            s["dev"].add(e.device_id)
        s["cty"].add(e.country)
        s["ip"].add(e.ip)
        s["pfx"].add(ip_prefix(e.ip))
        s["fail"] += e.event_type == "login_failed"
        if e.amount is not None:
            s["amt"].append(math.log1p(e.amount))
        expect = {"log_events_so_far": math.log1p(s["n"]), "log_distinct_devices": math.log1p(len(s["dev"])),
                  "log_distinct_countries": math.log1p(len(s["cty"])), "log_distinct_ips": math.log1p(len(s["ip"])),
                  "log_distinct_prefixes": math.log1p(len(s["pfx"])), "failure_ratio": s["fail"] / s["n"],
                  "log_mean_amount": float(np.mean(s["amt"])) if s["amt"] else 0.0,
                  "log_max_amount": max(s["amt"]) if s["amt"] else 0.0}
        for name, v in expect.items():
            assert X[i, col[name]] == pytest.approx(v, abs=1e-9), name


# --------------------------------------------------------------------------- end to end on a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from seqguard.training.generate import generate, write_events, write_labels
    from seqguard.training.train import TrainConfig, train
    d = tmp_path_factory.mktemp("evaluate")
    train_ev, _ = generate(250, 101)
    write_events(train_ev, d / "train.jsonl")
    model = train(str(d / "train.jsonl"), str(d / "model"),
                  TrainConfig(hidden=16, epochs=1, n_estimators=50, max_samples=128), log=lambda m: None)
    ev, lab = generate(250, 202)
    write_events(ev, d / "ev.jsonl")
    write_labels(lab, d / "lab.jsonl")
    return {"dir": d, "model": model, "events": d / "ev.jsonl", "labels": d / "lab.jsonl", "label_rows": lab}


def test_main_evaluate_writes_report_naming_scorers_and_families(tiny, capsys):
    d = tiny["dir"]
    args = argparse.Namespace(events=str(tiny["events"]), labels=str(tiny["labels"]), model=str(tiny["model"]),
                              report=str(d / "report"), column_map=None, on_bad_row="error")
    assert main_evaluate(args) == 0
    rep = d / "report"
    for f in ("report.md", "metrics.json", "roc.png", "pr.png", "risk_by_family.png", "family_recall.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    md = (rep / "report.md").read_text()
    for name in ("seqguard", "hand rules", "user aggregates + IForest"):
        assert name in md
    families = {r["family"] for r in tiny["label_rows"]}
    for fam in families:
        assert fam in md, fam
    m = json.loads((rep / "metrics.json").read_text())
    assert list(m["scorers"]) == ["seqguard", "seqguard_event_only", "seqguard_view_forests", "seqguard_view_sequence",
                                  "seqguard_view_rules", "hand_rules", "user_agg_iforest"]
    assert "each event alone (no session stage)" in md       # the model's own ablation row
    # the ablation differs from the served risk (the stage moved some events) but ranks similarly
    assert m["scorers"]["seqguard_event_only"]["all"]["roc_auc"] != m["scorers"]["seqguard"]["all"]["roc_auc"]
    assert m["model_version"] and m["data"]["events"] == len(tiny["label_rows"])
    for k, s in m["scorers"].items():
        assert 0.0 <= s["all"]["roc_auc"] <= 1.0 and 0.0 <= s["user"]["roc_auc"] <= 1.0
        assert set(s["actions"]) == {"REVIEW", "CHALLENGE", "BLOCK"}
    out = capsys.readouterr().out
    assert "| seqguard" in out and "| hand rules" in out


def test_main_evaluate_rejects_missing_labels(tiny, tmp_path):
    rows = tiny["label_rows"][:-7]
    p = tmp_path / "partial.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(events=str(tiny["events"]), labels=str(p), model=str(tiny["model"]),
                              report=str(tmp_path / "r"), column_map=None, on_bad_row="error")
    with pytest.raises(LabelError, match="7 of .* events have no label"):
        main_evaluate(args)


def test_baselines_one_finite_score_per_event(tiny):
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import score_events
    from seqguard.schema import read_events
    events = list(read_events(str(tiny["events"])))
    risk, _, enc = score_events(ModelArtifact.load(tiny["model"]), events)
    feats_in = np.empty_like(enc.feats)
    feats_in[enc.order] = enc.feats
    r = hand_rules_score(events, feats_in)
    a = user_aggregate_iforest_score(events, seed=0)
    for s in (risk, r, a):
        assert s.shape == (len(events),) and np.isfinite(s).all()
    assert a.std() > 0 and r.std() > 0
    # deterministic in the seed
    assert np.array_equal(a, user_aggregate_iforest_score(events, seed=0))


# --------------------------------------------------------------------------- thresholds config file

def test_thresholds_file_toml_json_and_errors(tmp_path):
    from pathlib import Path
    from seqguard.training.thresholds import ThresholdConfigError, load_action_fpr, load_thresholds
    shipped = Path(__file__).resolve().parents[1] / "configs" / "thresholds.toml"
    assert load_action_fpr(str(shipped)) == {"REVIEW": 0.05, "CHALLENGE": 0.01, "BLOCK": 0.001}
    t = tmp_path / "t.toml"
    t.write_text("[action_fpr]\nreview = 0.1\nCHALLENGE = 0.02\n")
    th = load_thresholds(str(t))                      # BLOCK keeps its default
    assert th == pytest.approx({"REVIEW": 0.9, "CHALLENGE": 0.98, "BLOCK": 0.999})
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"REVIEW": 0.2, "CHALLENGE": 0.05, "BLOCK": 0.005}))
    assert load_action_fpr(str(j)) == {"REVIEW": 0.2, "CHALLENGE": 0.05, "BLOCK": 0.005}
    for body, msg in (("[action_fpr]\nCHALLENGE = 1.5\n", "CHALLENGE target FPR must be"),
                      ("[action_fpr]\nDENY = 0.01\n", "unknown action 'DENY'"),
                      ("[action_fpr]\nREVIEW = 0.001\n", "must shrink from REVIEW to BLOCK"),
                      ("[action_fpr\n", "cannot parse")):
        t.write_text(body)
        with pytest.raises(ThresholdConfigError, match=msg):
            load_action_fpr(str(t))
    (tmp_path / "t.yaml").write_text("CHALLENGE: 0.01\n")
    with pytest.raises(ThresholdConfigError, match=r"\.toml or \.json"):
        load_action_fpr(str(tmp_path / "t.yaml"))


def test_train_and_evaluate_use_thresholds_file(tiny, tmp_path, capsys):
    """`seqguard train --thresholds` stores the cut-offs; `seqguard evaluate --thresholds` reports at them."""
    from seqguard.artifact import ModelArtifact
    from seqguard.cli import main as cli_main
    cfg = tmp_path / "th.json"
    cfg.write_text(json.dumps({"action_fpr": {"REVIEW": 0.1, "CHALLENGE": 0.03, "BLOCK": 0.002}}))
    out = tmp_path / "m"
    assert cli_main(["train", "--events", str(tiny["events"]), "--out", str(out), "--hidden", "16", "--epochs", "1",
                     "--trees", "20", "--thresholds", str(cfg)]) == 0
    th = ModelArtifact.load(out).detector.thresholds
    assert th == pytest.approx({"REVIEW": 0.9, "CHALLENGE": 0.97, "BLOCK": 0.998})
    # evaluate the 250-user tiny model at other cut-offs than its own
    cfg2 = tmp_path / "th2.toml"
    cfg2.write_text("[action_fpr]\nREVIEW = 0.2\nCHALLENGE = 0.1\nBLOCK = 0.05\n")
    assert cli_main(["evaluate", "--events", str(tiny["events"]), "--labels", str(tiny["labels"]),
                     "--model", str(tiny["model"]), "--report", str(tmp_path / "rep"), "--thresholds", str(cfg2)]) == 0
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["thresholds"]["model_risk"] == pytest.approx({"REVIEW": 0.8, "CHALLENGE": 0.9, "BLOCK": 0.95})
    acts = m["scorers"]["seqguard"]["actions"]
    rows = tiny["label_rows"]
    y = np.array([r["label"] for r in rows])
    risk = None
    from seqguard.batch import score_events
    from seqguard.schema import read_events
    risk, _, _ = score_events(ModelArtifact.load(tiny["model"]), list(read_events(str(tiny["events"]))))
    for a, t in (("REVIEW", 0.8), ("CHALLENGE", 0.9), ("BLOCK", 0.95)):
        flagged = risk >= t
        assert acts[a]["threshold"] == pytest.approx(t)
        assert acts[a]["tp"] == int((flagged & (y == 1)).sum()) and acts[a]["fp"] == int((flagged & (y == 0)).sum())
        if acts[a]["recall"] is not None:
            assert acts[a]["recall"] == pytest.approx(int((flagged & (y == 1)).sum()) / int(y.sum()))
    assert "thresholds file" in (tmp_path / "rep" / "report.md").read_text()
