"""training.compare / training.feedback: other detectors on the same embeddings, held-out families, feedback."""
from __future__ import annotations

import json

import numpy as np
import pytest

from seqguard.training.compare import GroupDetector, _FlatIF, detector_factories, encode_cached, load_labels_aligned, main
from seqguard.training.feedback import FeedbackRanker, risk_tail, sample_user_labels


def _blobs(n=3000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    group = rng.integers(0, 2, size=n)
    y = np.zeros(n, np.int8)
    out = rng.choice(n, size=30, replace=False)
    X[out] += 6.0                                      # far outliers
    y[out] = 1
    return X, group, y


@pytest.mark.parametrize("name", ["iforest", "lof", "ocsvm_nystroem", "mahalanobis", "iforest_raw"])
def test_every_detector_calibrates_per_group_and_finds_far_outliers(name):
    from sklearn.metrics import roc_auc_score
    X, g, y = _blobs()
    det = detector_factories(0)[name].fit(X, g)
    risk = det.risk(X, g)
    assert risk.shape == (len(X),) and np.all((risk >= 0) & (risk <= 1))
    # calibrated on the fit data: about 1% of each group's fit events at risk >= 0.99
    for k in (0, 1):
        assert abs(np.mean(risk[g == k] >= 0.99) - 0.01) < 0.006
    assert roc_auc_score(y, risk) > 0.95


def test_flat_iforest_matches_sklearn():
    from sklearn.ensemble import IsolationForest
    X, _, _ = _blobs(800)
    a = _FlatIF(50, 128, seed=1).fit(X).score_samples(X)
    b = IsolationForest(n_estimators=50, max_samples=128, random_state=1, n_jobs=1).fit(
        X.astype(np.float32)).score_samples(X.astype(np.float32))
    assert np.allclose(a, b, atol=1e-9)


def _fb_data(n=4000, seed=0):
    from seqguard.featurizer import FEATURE_INDEX
    rng = np.random.default_rng(seed)
    risk = rng.uniform(0, 1, n)
    surprise = rng.normal(size=(n, 2))
    feats = rng.normal(size=(n, len(FEATURE_INDEX))).astype(np.float32)
    y = (rng.uniform(size=n) < 0.05).astype(np.int8)
    feats[y == 1, FEATURE_INDEX["log_coupons_24h"]] += 3.0   # the fraud signal the detector under-weights
    users = np.array([f"u{i % 400}" for i in range(n)])
    return risk, surprise, feats, y, users


def test_feedback_falls_back_to_unsupervised_and_learns_from_labels():
    from sklearn.metrics import roc_auc_score
    risk, sur, feats, y, users = _fb_data()
    none = FeedbackRanker().fit(risk, sur, feats, np.full(len(y), -1))
    assert not none.active and np.array_equal(none.score(risk, sur, feats), risk_tail(risk))
    only_neg = FeedbackRanker().fit(risk, sur, feats, np.where(y == 1, -1, 0))
    assert not only_neg.active                         # one class: nothing to learn, fallback
    lab = sample_user_labels(users, y, 0.2, seed=0)
    assert set(np.unique(users[lab >= 0])).__len__() == 80          # 20% of 400 users, all their events
    assert np.array_equal(lab[lab >= 0], y[lab >= 0])
    fb = FeedbackRanker().fit(risk, sur, feats, lab, users)
    assert fb.active
    # the same strong signal, but on only 9 distinct fraud users: not enough to trust, unsupervised only
    few = lab.copy()
    pos_users = np.unique(users[few == 1])
    few[(few == 1) & ~np.isin(users, pos_users[:9])] = 0
    assert len(np.unique(users[few == 1])) == 9
    assert not FeedbackRanker().fit(risk, sur, feats, few, users).active
    assert roc_auc_score(y, fb.score(risk, sur, feats)) > roc_auc_score(y, risk) + 0.2
    # what the detector already flags (risk >= 0.99) is never pushed down by feedback, only raised
    flagged = risk >= FeedbackRanker.PROTECTED_RISK
    assert flagged.any() and (~flagged).any()
    delta = fb.score(risk, sur, feats) - risk_tail(risk)
    assert np.all(delta[flagged] >= 0) and np.any(delta[~flagged] < 0)


def test_compare_main_on_small_model_writes_all_sections(small_log, small_model, tmp_path):
    from seqguard.artifact import ModelArtifact
    ev, lab, _ = small_log
    out = tmp_path / "cmp.md"
    assert main(["--model", str(small_model), "--fit-events", str(ev), "--fit-labels", str(lab),
                 "--events", str(ev), "--labels", str(lab), "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--feedback-seeds", "0"]) == 0
    md = out.read_text()
    for s in ("## 1. Alternative detectors", "## 2. Held-out attack family", "## 3. Feedback labels",
              "LocalOutlierFactor", "OneClassSVM", "Mahalanobis", "IsolationForest (default)"):
        assert s in md, s
    res = json.loads(out.with_suffix(".json").read_text())
    y, fam = load_labels_aligned(str(lab), str(ev))
    assert set(res["heldout"]) == set(fam[y == 1])
    assert res["feedback"]["fallback_identical"] is True
    for k, m in res["detectors"].items():
        assert 0 <= m["pay_roc_auc"] <= 1, k
        if k != "shipped" and not k.endswith("+session"):
            assert m["batch_us"] > 0 and m["single_us"] > 0
    assert {"iforest+session", "lof+session"} <= set(res["detectors"])      # the production stage 2 on each
    assert all(m["session_stage"] for m in res["heldout"].values())
    # the cached encoding reproduces the model's own batch risk, in input order
    enc = encode_cached(ModelArtifact.load(small_model), str(ev), str(tmp_path / "c"))
    det = ModelArtifact.load(small_model).detector
    from seqguard.detector import Detector  # noqa: F401  (same arithmetic as production)
    a = np.empty(len(enc.X))
    for g in np.unique(enc.group):
        r = enc.group == g
        a[r] = det.calibrators[g].tail(det.group_score(g, enc.X[r]))
    if det.has_views:                                 # the views, combined as in Detector._calibrated
        from seqguard.detector import TYPE_NLL
        vocab = ModelArtifact.load(small_model).featurizer.vocab
        type_ids = np.array([vocab.id(t) for t in enc.event_types], np.int64)
        rules = det.rules_view.score(enc.feats, type_ids)
        tails = {"forests": a, "sequence": det.sequence_view.tail(enc.surprise[:, TYPE_NLL]),
                 "rules": det.rules_view.tail(rules)}
        a = det.combine_views(tails)
        a = det._per_group(type_ids, lambda k, r: det.combined[k].tail(a[r]))
    assert det.has_session
    _, uidx = np.unique(enc.users[enc.order], return_inverse=True)     # session stage in replay order
    c_replay, _ = det.session_scan(a[enc.order], uidx, int(uidx.max()) + 1)
    c = np.empty_like(c_replay)
    c[enc.order] = c_replay
    assert np.allclose(det.session_risk(c), enc.risk)


def test_group_detector_applies_the_production_signal_floors():
    """GroupDetector with floors: the last input column is a floor signal, not a model input; refitted on the
    fit rows, it raises only its own group's scores (as seqguard.detector.Detector does)."""
    from seqguard.detector import SIGNAL_FLOORS
    X, g, _ = _blobs()
    rng = np.random.default_rng(1)
    ring = np.log1p(np.where(rng.random(len(X)) < 0.01, 3, 0))
    spec = [s for s in SIGNAL_FLOORS if s[0] == "log_device_failed_accounts_7d"][0]
    plain = detector_factories(0)["iforest"].fit(X, g)
    floored = detector_factories(0, [(spec[0], 1, spec[2], spec[3])])["iforest"].fit(np.c_[X, ring], g)
    a0, a1 = plain.risk(X, g, "tail"), floored.risk(np.c_[X, ring], g, "tail")
    hit = (g == 1) & (ring > 0)
    assert np.mean(a1[hit]) > np.mean(a0[hit]) + 1.0
    assert np.allclose(a1[g == 0], a0[g == 0])            # the other group: same forest, same calibration
