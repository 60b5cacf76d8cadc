"""FlatIsolationForest reproduces scikit-learn's score_samples bit for bit."""
import numpy as np
from sklearn.ensemble import IsolationForest

from seqguard.forest import FlatIsolationForest, RiskCalibrator


def test_flat_forest_equals_sklearn_exactly():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(3000, 12)), rng.normal(4, 1, size=(30, 12))])
    X[:, 3] = (X[:, 3] > 0).astype(float)          # binary columns like the featuriser's flags
    for kw in ({"max_samples": 256}, {"max_samples": 512, "max_features": 0.6}):
        f = IsolationForest(n_estimators=80, random_state=1, **kw).fit(X)
        flat = FlatIsolationForest.from_sklearn(f)
        Y = np.concatenate([X[:500], rng.normal(size=(200, 12)) * 3])
        assert np.array_equal(flat.score_samples(Y), f.score_samples(Y))
        assert np.array_equal(flat.score_samples(Y[7:8]), f.score_samples(Y[7:8]))
        flat2 = FlatIsolationForest.from_arrays(flat.to_arrays())
        assert np.array_equal(flat2.score_samples(Y), flat.score_samples(Y))


def test_calibrated_risk_is_a_monotone_cdf():
    rng = np.random.default_rng(1)
    s = rng.normal(size=20000)
    cal = RiskCalibrator.fit(s)
    r = cal.risk(np.sort(s))
    assert np.all(np.diff(r) >= 0) and r[0] >= 0 and r[-1] <= 1
    assert abs((cal.risk(s) >= 0.99).mean() - 0.01) < 0.002      # threshold 1-FPR flags ~FPR of training traffic
