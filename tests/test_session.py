"""The detector's session stage (seqguard/detector.py stage 2): the offline lock-step scan equals
the event-by-event recurrence the gateway runs, it persists with the artifact, older artifacts and
older user-state blobs still load, and the reason code fires."""
import numpy as np
import pytest

from seqguard.detector import Detector
from seqguard.explain import explain
from seqguard.featurizer import N_FEATURES
from seqguard.forest import RiskCalibrator


def _detector(alpha=0.3, calib_on=None) -> Detector:
    """A detector whose only meaningful parts are the session stage (the scan never touches the forests)."""
    rng = np.random.default_rng(1)
    scal = RiskCalibrator.fit(rng.exponential(1.0, 5000) if calib_on is None else calib_on)
    return Detector(np.zeros(4), np.eye(4), np.arange(2), [], [], np.zeros(3, np.int64),
                    session_alpha=alpha, session_calibrator=scal)


def test_lockstep_scan_equals_event_by_event_recurrence():
    rng = np.random.default_rng(0)
    n, n_users = 5000, 300
    user_idx = rng.integers(0, n_users, n)                  # users interleaved, as in a replayed log
    a = rng.exponential(1.0, n) * (rng.random(n) < 0.3)     # many exact zeros, some large tails
    det = _detector()
    c, m_final = det.session_scan(a, user_idx, n_users)

    m = np.zeros(n_users)                                   # what the gateway does: one event at a time
    for i in range(n):
        u = user_idx[i]
        ci, mi = det.session_step(a[i:i + 1], m[u:u + 1])
        assert ci[0] == c[i]                                # bit-identical, not approximately
        m[u] = mi[0]
    assert np.array_equal(m, m_final)
    # and the definition: c = max(a, m_prev), m <- 0.3 a + 0.7 m
    seq = np.array([9.0, 9.0, 0.1, 0.0])
    c4, _ = det.session_scan(seq, np.zeros(4, np.int64), 1)
    assert c4[0] == 9.0 and c4[1] == 9.0
    assert c4[2] == pytest.approx(0.3 * 9 + 0.7 * 0.3 * 9)  # an ordinary event after two odd ones inherits their average
    assert c4[3] < c4[2]                                    # and it fades event by event


def test_scan_can_continue_from_saved_averages():
    rng = np.random.default_rng(2)
    a = rng.exponential(1.0, 400)
    u = rng.integers(0, 20, 400)
    det = _detector()
    c_all, m_all = det.session_scan(a, u, 20)
    c1, m1 = det.session_scan(a[:250], u[:250], 20)
    c2, m2 = det.session_scan(a[250:], u[250:], 20, m0=m1)
    assert np.array_equal(np.concatenate([c1, c2]), c_all) and np.array_equal(m2, m_all)


def test_session_stage_persists_and_old_artifacts_have_none():
    det = _detector(alpha=0.25)
    arrays = det.to_arrays()
    assert float(arrays["session_alpha"]) == 0.25
    back = Detector.from_arrays(arrays)
    assert back.has_session and back.session_alpha == 0.25
    x = np.linspace(0, 8, 50)
    assert np.array_equal(back.session_risk(x), det.session_risk(x))
    old = {k: v for k, v in arrays.items() if not k.startswith("session_")}
    assert not Detector.from_arrays(old).has_session        # trained before the stage: stage 1 alone


def test_tail_scale_is_monotone_in_risk():
    cal = RiskCalibrator.fit(np.random.default_rng(3).normal(size=20000))
    x = np.linspace(-5, 5, 1001)
    r, t = cal.risk(x), cal.tail(x)
    assert np.all(np.diff(t) >= 0) and t[0] == 0.0
    body = r <= 0.99                                        # the level table is dense here: ~ -log(1 - risk)
    assert np.allclose(t[body], -np.log(1 - r[body]), atol=0.05)
    assert np.all(t[r > 0.99] >= -np.log(0.01) - 1e-9)       # the top 1% keeps its order, up to -log(1e-6)
    assert t[-1] == pytest.approx(-np.log(1e-6))


def test_risky_session_reason():
    row = np.zeros(N_FEATURES, np.float32)
    recent = [(f"e{k}", "login_failed", k) for k in range(5)]
    got = explain(row, np.zeros(2), "now", "payment", recent, session_lift=6.0)
    r = [x for x in got if x.code == "RISKY_SESSION"]
    assert r and r[0].event_ids == ["e2", "e3", "e4", "now"]
    assert not [x for x in explain(row, np.zeros(2), "now", "payment", recent, session_lift=1.0)
                if x.code == "RISKY_SESSION"]


def test_ring_reason_names_the_other_accounts():
    from seqguard.featurizer import FEATURE_INDEX
    row = np.zeros(N_FEATURES, np.float32)
    code = "DEVICE_FAILED_LOGINS_OTHER_ACCOUNTS"
    assert not any(r.code == code for r in explain(row, (0.0, 0.0), "e9", "login_failed"))
    row[FEATURE_INDEX["log_device_failed_accounts_7d"]] = np.log1p(3)
    r = [x for x in explain(row, (0.0, 0.0), "e9", "login_failed") if x.code == code]
    assert r and "3 other accounts" in r[0].message and r[0].event_ids == ["e9"]
