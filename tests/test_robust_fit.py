"""Per-account caps for contamination-robust fitting (training/robust_fit.py)."""
from __future__ import annotations

import numpy as np

from training.robust_fit import capped_rows, user_cap


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
