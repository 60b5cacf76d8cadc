"""FlatIsolationForest reproduces scikit-learn's score_samples bit for bit, on every backend."""
import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from seqguard.forest import FlatIsolationForest, MarginalTails, RiskCalibrator


@pytest.mark.parametrize("backend", ["numba", "onnx", "numpy"])
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


@pytest.mark.parametrize("backend", ["numba", "onnx"])
def test_forest_big_batches_and_degenerate_trees_match_sklearn(backend, monkeypatch):
    """Batches above the thread-split size, and one-leaf trees (a constant column), stay exact."""
    monkeypatch.setenv("SEQGUARD_FOREST", backend)
    monkeypatch.setenv("SEQGUARD_FOREST_THREADS", "2")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20000, 6))
    f = IsolationForest(n_estimators=50, max_samples=2000, random_state=0).fit(X)
    flat = FlatIsolationForest.from_sklearn(f)
    Y = rng.normal(size=(9000, 6)) * 2
    assert flat.backend == backend
    assert np.array_equal(flat.score_samples(Y), f.score_samples(Y))
    const = IsolationForest(n_estimators=5, max_samples=8, random_state=0).fit(np.ones((50, 3)))
    flat_c = FlatIsolationForest.from_sklearn(const)
    assert np.array_equal(flat_c.score_samples(Y[:10, :3]), const.score_samples(Y[:10, :3]))


def test_numba_forest_equals_onnx_on_odd_inputs(monkeypatch):
    """NaN (goes right, as `x <= t` is false), infinities, values on a threshold, and batch sizes
    around the kernel's 8-row and 32-row steps: the compiled walk and ONNX Runtime agree bit for bit."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(4000, 7))
    f = IsolationForest(n_estimators=60, max_samples=256, random_state=2).fit(X)
    monkeypatch.setenv("SEQGUARD_FOREST", "onnx")
    ref = FlatIsolationForest.from_sklearn(f)
    monkeypatch.setenv("SEQGUARD_FOREST", "numba")
    fast = FlatIsolationForest.from_arrays(ref.to_arrays())
    assert (ref.backend, fast.backend) == ("onnx", "numba")
    Y = rng.normal(size=(300, 7)) * 2
    Y[3, 2] = np.nan
    Y[4, :] = np.nan
    Y[5, 1], Y[6, 4] = np.inf, -np.inf
    t = ref.threshold[ref.left != np.arange(ref.left.shape[1])]
    Y[7, :] = np.float32(t[:7])                      # on (float32 rounding of) split points
    for n in (1, 7, 8, 9, 31, 32, 33, 300):
        assert np.array_equal(fast.score_samples(Y[:n]), ref.score_samples(Y[:n]))
    ok = ~np.isnan(Y).any(axis=1)                    # (sklearn itself routes NaN by its own missing-value rule)
    assert np.array_equal(fast.score_samples(Y[ok]), f.score_samples(Y[ok]))


def test_marginal_tails_measure_rarity_on_either_side():
    rng = np.random.default_rng(2)
    n = 50_000
    X = np.stack([rng.normal(size=n),                       # symmetric
                  rng.exponential(size=n),                  # heavy right tail, floor at 0
                  (rng.random(n) < 0.03).astype(float),     # a rare binary flag
                  np.full(n, 7.0)], axis=1)                 # constant column
    mt = MarginalTails.fit(X)
    T = mt.transform(X)
    assert T.shape == X.shape and np.all(T >= 0)
    # t = -log(2 min(F, 1 - F)): the median is ~0, a 1-in-100 value either side is ~4.6 - log(2)
    q = np.quantile(X[:, 0], [0.005, 0.5, 0.995])
    t = mt.transform(np.array([[v, 1.0, 0.0, 7.0] for v in q]))[:, 0]
    assert t[1] < 0.05 and abs(t[0] - np.log(100)) < 0.25 and abs(t[2] - np.log(100)) < 0.25
    # monotone away from the median, on both sides; beyond the training range rarer still
    grid = np.linspace(0.0, 6.0, 61)
    right = mt.transform(np.stack([grid, np.ones_like(grid), np.zeros_like(grid), np.full_like(grid, 7.0)], 1))[:, 0]
    assert np.all(np.diff(right) >= -1e-12) and right[-1] > t[2]
    # a tie (the binary flag) reads its own mid-rank: 0 is common, 1 is a ~3% event
    flag = mt.transform(np.array([[0, 1, 0, 7], [0, 1, 1, 7]], float))[:, 2]
    assert flag[0] < 0.1 and abs(flag[1] - -np.log(2 * 0.015)) < 0.3
    # a constant column: its value is typical, anything else is rare
    const = mt.transform(np.array([[0, 1, 0, 7], [0, 1, 0, 9]], float))[:, 3]
    assert const[0] < 1e-9 and const[1] > 5
    # rows are independent: one row at a time gives the same bits as the batch (online == offline)
    Y = np.concatenate([X[:300], rng.normal(size=(50, 4)) * 10])
    assert np.array_equal(np.concatenate([mt.transform(Y[i:i + 1]) for i in range(len(Y))]), mt.transform(Y))
    mt2 = MarginalTails.from_arrays(mt.to_arrays("x_"), "x_")
    assert np.array_equal(mt2.transform(Y), mt.transform(Y))


def test_marginal_tails_let_a_forest_see_a_rare_value_near_the_bulk():
    """The reason for the tail scale: a value rare in one column but close to the bulk (a bot's
    machine-regular gap spread) among many noise columns is found far better after it."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    n, d = 20_000, 40
    X = rng.normal(size=(n, d))
    X[:, 0] = rng.gamma(9.0, 0.25, size=n)                 # a spread: bulk well above 0
    out = rng.random(n) < 0.005
    X[out, 0] = rng.uniform(0.05, 0.3, size=out.sum())     # regular: rare, but only just below the bulk
    def auc(Z):
        f = FlatIsolationForest.from_sklearn(IsolationForest(n_estimators=100, random_state=0).fit(Z))
        return roc_auc_score(out, -f.score_samples(Z))
    mt = MarginalTails.fit(X)
    raw, tail = auc(X), auc(mt.transform(X))
    assert tail > raw + 0.05, (raw, tail)


def test_detector_raises_its_score_by_the_tail_scaled_twin_and_persists_it():
    """Detector stage 1 with a TailView: the group score is the raw forest's tail-scale score, raised by half
    of the twin's excess,
    batch == one row at a time, the arrays round-trip, and an artifact written before the twin
    (no TailView arrays) still scores with its raw forest alone."""
    from seqguard.detector import Detector, TailView
    rng = np.random.default_rng(4)
    n = 4000
    emb, sur, feats = rng.normal(size=(n, 4)), rng.exponential(size=(n, 2)), rng.normal(size=(n, 40))
    types = np.zeros(n, np.int64)
    det = Detector(np.zeros(4), np.eye(4), np.arange(2), [], [], np.zeros(3, np.int64))
    X = det.inputs(det.project(emb), sur, feats)
    raw = FlatIsolationForest.from_sklearn(IsolationForest(n_estimators=50, random_state=0).fit(X))
    raw_anomaly = -raw.score_samples(X)

    old = Detector(np.zeros(4), np.eye(4), np.arange(2), [raw], [RiskCalibrator.fit(raw_anomaly)], np.zeros(3, np.int64))
    arrays = old.to_arrays()
    assert not any("_tv_" in k for k in arrays)
    back_old = Detector.from_arrays(arrays)
    assert back_old.tail_views is None
    assert np.array_equal(back_old.risk(emb, sur, feats, types), old.calibrators[0].risk(raw_anomaly))

    tails = MarginalTails.fit(X)
    twin = FlatIsolationForest.from_sklearn(IsolationForest(n_estimators=50, random_state=0).fit(tails.transform(X)))
    twin_anomaly = -twin.score_samples(tails.transform(X))
    view = TailView(tails, twin, RiskCalibrator.fit(twin_anomaly), RiskCalibrator.fit(raw_anomaly))
    a_raw, a_twin = view.raw_calibrator.tail(raw_anomaly), view.calibrator.tail(twin_anomaly)
    score = np.maximum(a_raw, 0.5 * (a_raw + a_twin))       # the raw verdict is a floor; the twin raises it
    assert np.any(score > a_raw) and np.all(score >= a_raw)
    det.forests, det.calibrators, det.tail_views = [raw], [RiskCalibrator.fit(score)], [view]
    r = det.risk(emb, sur, feats, types)
    assert np.array_equal(r, det.calibrators[0].risk(score))
    assert np.array_equal(np.concatenate([det.risk(emb[i:i + 1], sur[i:i + 1], feats[i:i + 1], types[:1])
                                          for i in range(200)]), r[:200])
    back = Detector.from_arrays(det.to_arrays())
    assert back.tail_views is not None and np.array_equal(back.risk(emb, sur, feats, types), r)
    # about 1% of the training rows above the 0.99 cut-off, as for the raw forest alone
    assert abs(np.mean(r >= 0.99) - 0.01) < 0.004


def test_signal_floors_read_a_signal_directly_in_their_group_only():
    """SignalFloor: -log((1 + n) / (1 + N)) with n the group's training events at least as extreme, on either
    side, 0 where nothing is rare; the detector takes it as a floor in its own group only, batch ==
    single rows, and it persists."""
    from seqguard.detector import SIGNAL_FLOORS, Detector, SignalFloor
    from seqguard.featurizer import FEATURE_INDEX, N_FEATURES
    rng = np.random.default_rng(6)
    counts = np.where(rng.random(5000) < 0.01, rng.integers(1, 4, 5000), 0)
    grid = dict((s[0], s[3]) for s in SIGNAL_FLOORS)
    ring = SignalFloor.fit("log_device_failed_accounts_7d", 1, "upper", grid["log_device_failed_accounts_7d"],
                           np.log1p(counts).astype(np.float32))
    p1 = (1 + (counts >= 1).sum()) / (1 + len(counts))
    assert ring(np.log1p(np.array([0, 1, 200]))) == pytest.approx([0.0, -np.log(p1), -np.log(1 / 5001)])
    assert np.all(np.diff(ring.tail) >= 0)
    jit = rng.exponential(1.0, 5000)
    low = SignalFloor.fit("gap_jitter", 0, "lower", grid["gap_jitter"], jit)
    share = (1 + (jit <= 0.05).sum()) / (1 + len(jit))
    got = low(np.array([0.0, 0.05, 3.0, 10.0]))
    assert got[0] == pytest.approx(-np.log(1 / 5001)) and got[3] == 0.0 and got[2] < 0.1
    assert -np.log(share) - 0.05 <= got[1] <= -np.log(share) + 1e-9      # a grid point at or above 0.05: never higher
    assert np.all(np.diff(low.tail) <= 0)

    n = 3000
    emb, sur, feats = rng.normal(size=(n, 4)), rng.exponential(size=(n, 2)), rng.normal(size=(n, N_FEATURES))
    col = FEATURE_INDEX["log_device_failed_accounts_7d"]
    feats[:, col] = np.log1p(np.where(np.arange(n) % 49 == 0, 3, 0))
    feats[:, FEATURE_INDEX["gap_jitter"]] = 10.0                # beyond the grid: never a floor
    types = (np.arange(n) % 2).astype(np.int64)                  # type 0 -> group 0, type 1 -> group 1
    det = Detector(np.zeros(4), np.eye(4), np.arange(2), [], [], np.array([0, 1], np.int64))
    X = det.inputs(det.project(emb), sur, feats)
    forests = [FlatIsolationForest.from_sklearn(IsolationForest(n_estimators=30, random_state=k).fit(X))
               for k in range(2)]
    det.forests = forests
    det.calibrators = [RiskCalibrator.fit(-f.score_samples(X)) for f in forests]
    before = det.tail_from_inputs(det.inputs(det.project(emb), sur, feats), types)
    det.floors = [ring, low]
    Xf = det.inputs(det.project(emb), sur, feats)
    assert Xf.shape[1] == X.shape[1] + 2
    after = det.tail_from_inputs(Xf, types)
    hit = feats[:, col] > 0
    in_group = types == 1
    assert np.array_equal(after[~in_group], before[~in_group])            # no rare jitter: group 0 unchanged
    assert np.all(after[in_group] >= before[in_group])
    assert np.any(after[in_group & hit] > before[in_group & hit])
    assert np.array_equal(after[in_group & ~hit], before[in_group & ~hit])
    assert np.array_equal(np.concatenate([det.tail_from_inputs(Xf[i:i + 1], types[i:i + 1]) for i in range(100)]),
                          after[:100])
    back = Detector.from_arrays(det.to_arrays())
    assert [(f.feature, f.group, f.side) for f in back.floors] == [(f.feature, f.group, f.side) for f in det.floors]
    assert np.array_equal(back.tail_from_inputs(back.inputs(back.project(emb), sur, feats), types), after)
    old = {k: v for k, v in det.to_arrays().items() if not k.startswith(("floor", "n_floors"))}
    assert Detector.from_arrays(old).floors == []                 # artifacts from before the floors


def test_marginal_tails_compiled_transform_equals_numpy():
    """The compiled transform gives numpy's bits: in range, far outside it, +-inf, -0.0, tiny values."""
    rng = np.random.default_rng(4)
    X = np.stack([rng.normal(size=5000), rng.exponential(size=5000), (rng.random(5000) < 0.1).astype(float)], axis=1)
    mt = MarginalTails.fit(X)
    Y = np.concatenate([X[:1000], rng.normal(size=(300, 3)) * 1e6, rng.normal(size=(10, 3)) * 1e-300])
    Y[3, 0], Y[4, 1], Y[5, :] = np.inf, -np.inf, -0.0
    for A in (Y, Y[:1], Y[7:9]):
        assert np.array_equal(mt.transform(A).view(np.int64), mt._transform_numpy(A).view(np.int64))
