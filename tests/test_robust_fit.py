"""Per-account caps for contamination-robust fitting (seqguard/robust_fit.py)."""
from __future__ import annotations

import numpy as np

from seqguard.robust_fit import capped_rows, user_cap


def test_heavy_account_is_capped_and_others_keep_everything():
    rng = np.random.default_rng(0)
    # 200 ordinary accounts with 5-15 events each, one crawler with 5000 (most of the rows)
    users = np.concatenate([np.repeat(np.arange(200), rng.integers(5, 16, 200)), np.full(5000, 999)])
    users = users[rng.permutation(len(users))]
    k = user_cap(users, cap_factor=3.0, min_cap=20)
    assert 20 <= k <= 3 * 15
    keep = capped_rows(users, 3.0, 20, np.random.default_rng(1))
    kept = users[keep]
    assert np.all(np.diff(keep) > 0)
    assert np.sum(kept == 999) == k
    ordinary = users != 999
    assert np.sum(kept != 999) == np.sum(ordinary)          # nobody else loses an event
    assert np.mean(users == 999) > 0.7 and np.mean(kept == 999) < 0.05


def test_capped_rows_is_seeded_and_random_within_an_account():
    users = np.repeat([0, 1, 2], [1000, 10, 10])
    a = capped_rows(users, 2.0, 20, np.random.default_rng(5))
    b = capped_rows(users, 2.0, 20, np.random.default_rng(5))
    c = capped_rows(users, 2.0, 20, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    heavy = a[users[a] == 0]
    assert len(heavy) == 20 and heavy.max() > 500           # not simply the first 20 events
    assert len(capped_rows(np.array([], np.int64), 2.0, 20, np.random.default_rng(0))) == 0


def test_fit_detector_cap_keeps_a_heavy_account_from_defining_normal():
    """One account with most of a group's events: per event it IS normal; capped, it is an outlier."""
    from seqguard.detector import Detector, action_thresholds
    from seqguard.featurizer import N_FEATURES
    from seqguard.detector_fit import fit_detector
    from seqguard.training.train import TrainConfig

    rng = np.random.default_rng(0)
    n_normal_users, per_user, n_heavy = 400, 10, 12_000
    n = n_normal_users * per_user + n_heavy
    users = np.r_[np.repeat(np.arange(n_normal_users), per_user), np.full(n_heavy, n_normal_users)]
    emb = rng.normal(0, 1, (n, 4))
    emb[users == n_normal_users] = 4.0 + 0.01 * rng.normal(0, 1, (n_heavy, 4))   # a script: one tight spot
    surprise = rng.normal(0, 1, (n, 2))
    feats = np.zeros((n, N_FEATURES), np.float32)
    tokens = ["<unk>", "view_item"]
    type_ids = np.ones(n, np.int64)
    heavy = users == n_normal_users

    def heavy_risk(cap):
        cfg = TrainConfig(n_estimators=50, max_samples=256, tail_forest=False, signal_floors=False, user_cap=cap)
        f = fit_detector(cfg, emb, surprise, feats, type_ids, tokens, log=lambda m: None, user_idx=users)
        det = Detector(np.zeros(4), np.eye(4), f.signal_cols, f.forests, f.calibrators, f.groups,
                       action_thresholds(None))
        return float(np.median(det.risk(emb[heavy], surprise[heavy], feats[heavy], type_ids[heavy])))

    assert heavy_risk(0.0) < 0.9          # per event, the script is three quarters of "normal"
    assert heavy_risk(3.0) > 0.99         # capped at 30 events it is rarer than 99% of training traffic
