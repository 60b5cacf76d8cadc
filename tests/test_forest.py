"""FlatIsolationForest reproduces scikit-learn's score_samples bit for bit, on both backends."""
import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from seqguard.forest import FlatIsolationForest, RiskCalibrator


@pytest.mark.parametrize("backend", ["onnx", "numpy"])
def test_flat_forest_equals_sklearn_exactly(backend, monkeypatch):
    monkeypatch.setenv("SEQGUARD_FOREST", backend)
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(3000, 12)), rng.normal(4, 1, size=(30, 12))])
    X[:, 3] = (X[:, 3] > 0).astype(float)          # binary columns like the featuriser's flags
    for kw in ({"max_samples": 256}, {"max_samples": 512, "max_features": 0.6}):
        f = IsolationForest(n_estimators=80, random_state=1, **kw).fit(X)
        flat = FlatIsolationForest.from_sklearn(f)
        assert flat.backend == backend
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


def test_onnx_forest_big_batches_and_degenerate_trees_match_sklearn(monkeypatch):
    """Batches above the thread-split size, and one-leaf trees (a constant column), stay exact."""
    monkeypatch.setenv("SEQGUARD_FOREST", "onnx")
    monkeypatch.setenv("SEQGUARD_FOREST_THREADS", "2")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20000, 6))
    f = IsolationForest(n_estimators=50, max_samples=2000, random_state=0).fit(X)
    flat = FlatIsolationForest.from_sklearn(f)
    Y = rng.normal(size=(9000, 6)) * 2
    assert flat.backend == "onnx"
    assert np.array_equal(flat.score_samples(Y), f.score_samples(Y))
    const = IsolationForest(n_estimators=5, max_samples=8, random_state=0).fit(np.ones((50, 3)))
    flat_c = FlatIsolationForest.from_sklearn(const)
    assert np.array_equal(flat_c.score_samples(Y[:10, :3]), const.score_samples(Y[:10, :3]))
