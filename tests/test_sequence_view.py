"""The sequence view (seqguard/detector.py SequenceView): the encoder's next-type NLL as a calibrated
view of its own, combined with the forests by the max of their tails."""
import numpy as np
import pytest

from seqguard.artifact import ModelArtifact
from seqguard.batch import encode_log, score_events, stage1_scores
from seqguard.detector import SEQUENCE_WEIGHT, TYPE_NLL, Detector, SequenceView
from seqguard.schema import events_from_dicts

pytestmark = pytest.mark.slow

CYCLE = ["step_a", "step_b", "step_c", "step_d", "step_e", "step_f"]
T0 = 1767225600000


def _cycle_user(user: str, types: list[str], start_ms: int) -> list[dict]:
    return [dict(event_id=f"{user}-{k}", user_id=user, ts=start_ms + 5000 * k, event_type=t)
            for k, t in enumerate(types)]


@pytest.fixture(scope="module")
def cycle_model(tmp_path_factory):
    """A tiny model trained on users who all walk the same fixed cycle of six event types."""
    import json
    from seqguard.training.train import TrainConfig, train
    d = tmp_path_factory.mktemp("cycle")
    rng = np.random.default_rng(0)
    rows = []
    for u in range(240):
        start = int(rng.integers(0, 6))
        rows += _cycle_user(f"u{u}", [CYCLE[(start + k) % 6] for k in range(24)], T0 + 200_000 * u)
    (d / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the view alone is the subject: the per-account cap (on by default) draws the forests' samples with
    # the same generator and moved this tiny model's calibration enough to matter at the 0.999 mark
    cfg = TrainConfig(hidden=32, epochs=5, batch_users=8, n_estimators=60, max_samples=256, seed=1, threads=2,
                      user_cap=0)
    train(str(d / "events.jsonl"), str(d / "model"), cfg, log=lambda m: None)
    return d / "model"


def test_out_of_order_event_is_flagged_by_the_view(cycle_model):
    art = ModelArtifact.load(cycle_model)
    det = art.detector
    assert det.sequence_view is not None and art.metadata["detector"]["sequence_weight"] == SEQUENCE_WEIGHT
    t = T0 + 7 * 86_400_000                         # a week later: same hours and weekday as training
    normal = [_cycle_user(f"n{u}", CYCLE * 3, t + 200_000 * u) for u in range(12)]    # start as "odd" does
    swapped = CYCLE * 2 + ["step_a", "step_b", "step_d", "step_c", "step_e", "step_f"]    # event 14: d after b
    events = events_from_dicts([r for rows in normal for r in rows] + _cycle_user("odd", swapped, t - 100_000))
    risk, _, enc = score_events(art, events)
    odd = np.array([e.user_id == "odd" for e in events])
    assert risk[odd][14] > det.thresholds["BLOCK"], (risk[odd], enc.surprise[odd[enc.order], TYPE_NLL])
    assert risk[odd][14] > risk[~odd].max(), (risk[odd][14], np.sort(risk[~odd])[-5:], np.flatnonzero(risk[~odd] > 0.99) % 18)
    # the view alone flags it (its next-type NLL is beyond every training event's), and the event's
    # stage-1 tail is at least the view's
    X = det.inputs(enc.emb, enc.surprise, enc.feats)
    row = int(np.flatnonzero(odd[enc.order])[14])
    nll = enc.surprise[row:row + 1, TYPE_NLL]
    assert det.sequence_view.calibrator.risk(nll)[0] > 0.999, nll
    assert det.tail_from_inputs(X[row:row + 1], enc.type_ids[row:row + 1])[0] >= det.sequence_view.tail(nll)[0]


def test_view_tail_is_at_least_both_views_and_persists(small_model, small_log):
    art = ModelArtifact.load(small_model)
    det = art.detector
    assert det.sequence_view is not None
    events = events_from_dicts(small_log[2][:3000])
    enc = encode_log(art, events, reduce=det.project)
    a = stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids, tail=True)
    arrays = det.to_arrays()
    without = Detector.from_arrays({k: v for k, v in arrays.items() if not k.startswith("seq_")})
    assert without.sequence_view is None                     # artifacts from before the view load without it
    forest = stage1_scores(without, enc.emb, enc.surprise, enc.feats, enc.type_ids, tail=True)
    np.testing.assert_array_equal(a, det.sequence_view.combine(forest, enc.surprise[:, TYPE_NLL]))
    assert (a >= forest + np.log1p(-SEQUENCE_WEIGHT)).all() and (a >= det.sequence_view.tail(enc.surprise[:, 0])).all()
    again = Detector.from_arrays(arrays)                     # round trip: the same bits
    np.testing.assert_array_equal(stage1_scores(again, enc.emb, enc.surprise, enc.feats, enc.type_ids),
                                  stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids))


def test_combined_risk_is_a_quantile_of_training_events():
    """SequenceView.fit on known tails: the combined risk of the training events is uniform per group,
    so an action's FPR on training traffic stays what was asked for; the view's weight shifts its tail
    by log(w) (its share of the false-positive budget)."""
    rng = np.random.default_rng(0)
    nll, forest = rng.exponential(1.0, 20_000), rng.exponential(1.0, 20_000)
    groups = rng.integers(0, 2, 20_000)
    view = SequenceView.fit(nll, forest, groups, 3, weight=0.1)
    a = view.combine(forest, nll)
    assert view.tail(nll) == pytest.approx(view.calibrator.tail(nll) + np.log(0.1))
    for k in (0, 1):
        r = view.combined[k].risk(a[groups == k])
        assert abs(np.mean(r >= 0.99) - 0.01) < 0.003
    assert (view.tail(np.array([1e9])) > view.tail(np.array([5.0]))).all()
    assert view.tail(np.array([0.0]))[0] < 0.01 + np.log(0.1)
    with pytest.raises(ValueError, match="weight"):
        SequenceView.fit(nll, forest, groups, 3, weight=1.0)
