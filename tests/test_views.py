"""The detector's views beside the forests (seqguard/detector.py SequenceView, seqguard/rules_view.py):
the encoder's next-type NLL and the hand rules' score, each calibrated on training events, combined
with the forests by a weighted min-p (Detector.combine_views)."""
import numpy as np
import pytest

from seqguard.artifact import ModelArtifact
from seqguard.batch import encode_log, score_events, stage1_scores
from seqguard.detector import RULES_WEIGHT, SEQUENCE_WEIGHT, TYPE_NLL, Detector
from seqguard.explain import explain
from seqguard.rules import DEFAULT_RULES_PATH
from seqguard.rules_view import RulesView
from seqguard.schema import events_from_dicts, read_events
from seqguard.training.baselines import hand_rules_score

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
    # the sequence view is the subject: the per-account cap (on by default) draws the forests' samples with
    # the same generator and moved this tiny model's calibration enough to matter at the 0.999 mark, and
    # the rules view's share of the FPR budget (its velocity rule fires on these 5 s cycles) would too
    cfg = TrainConfig(hidden=32, epochs=5, batch_users=8, n_estimators=60, max_samples=256, seed=1, threads=2,
                      user_cap=0, rules_weight=0.0)
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
    X = det.inputs(enc.emb, enc.surprise, enc.feats, enc.type_ids)
    row = int(np.flatnonzero(odd[enc.order])[14])
    nll = enc.surprise[row:row + 1, TYPE_NLL]
    assert det.sequence_view.calibrator.risk(nll)[0] > 0.999, nll
    assert det.tail_from_inputs(X[row:row + 1], enc.type_ids[row:row + 1])[0] >= det.sequence_view.tail(nll)[0]


def test_stage1_is_the_weighted_min_p_of_the_views_and_persists(small_model, small_log):
    art = ModelArtifact.load(small_model)
    det = art.detector
    assert det.sequence_view is not None and det.rules_view is not None
    assert det.view_weights() == pytest.approx({"forests": 1 - SEQUENCE_WEIGHT - RULES_WEIGHT,
                                                "sequence": SEQUENCE_WEIGHT, "rules": RULES_WEIGHT})
    events = events_from_dicts(small_log[2][:3000])
    enc = encode_log(art, events, reduce=det.project)
    a = stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids, tail=True)
    tails = det.view_tails(det.inputs(enc.emb, enc.surprise, enc.feats, enc.type_ids), enc.type_ids)
    m = det.combine_views(tails)
    for v, w in det.view_weights().items():            # the min-p is at least every view's weighted tail
        assert (m >= tails[v] + np.log(w) - 1e-12).all(), v
    np.testing.assert_array_equal(a, det._per_group(enc.type_ids, lambda k, r: det.combined[k].tail(m[r])))
    again = Detector.from_arrays(det.to_arrays())           # round trip, the rules pack's text included: same bits
    assert again.rules_view.text == DEFAULT_RULES_PATH.read_text()
    np.testing.assert_array_equal(stage1_scores(again, enc.emb, enc.surprise, enc.feats, enc.type_ids),
                                  stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids))
    arrays = {k: v for k, v in det.to_arrays().items() if not k.startswith(("seq_", "rules_", "combined_"))}
    plain = Detector.from_arrays(arrays)                     # a model trained without views: the forests alone
    assert not plain.has_views
    np.testing.assert_array_equal(stage1_scores(plain, enc.emb, enc.surprise, enc.feats, enc.type_ids, tail=True),
                                  tails["forests"])


def test_rules_view_scores_what_the_hand_rules_baseline_ranks_by(small_model, small_log):
    """The view reads a step's type id and featuriser row only (what a deferred gateway step keeps),
    and gives the hand rules baseline's score (training/baselines.py) on the same events."""
    art = ModelArtifact.load(small_model)
    view = art.detector.rules_view
    events = list(read_events(str(small_log[0])))[:20000]
    enc = encode_log(art, events, reduce=art.detector.project)
    feats_in = np.empty_like(enc.feats)
    feats_in[enc.order] = enc.feats
    types_in = np.empty_like(enc.type_ids)
    types_in[enc.order] = enc.type_ids
    np.testing.assert_array_equal(view.score(feats_in, types_in), hand_rules_score(events, feats_in))
    assert (view.score(feats_in, types_in) >= 1.0).mean() > 0.01          # rules do fire on this log


def test_rules_view_refuses_packs_it_cannot_replay():
    text = DEFAULT_RULES_PATH.read_text()
    RulesView.from_text(text, ["<unk>", "payment"])
    bad_field = text + '\n[[rule]]\nname = "x"\ndescription = "d"\nwhen = ["country == DE"]\nscore = 1.0\n'
    with pytest.raises(ValueError, match="country"):
        RulesView.from_text(bad_field, ["<unk>"])
    bad_model = text + '\n[[rule]]\nname = "x"\ndescription = "d"\nwhen = ["risk >= 0.9"]\nscore = 1.0\n'
    with pytest.raises(ValueError, match="model"):
        RulesView.from_text(bad_model, ["<unk>"])


def test_rules_reasons_name_the_rules_where_that_view_alone_flags(small_model, small_log):
    art = ModelArtifact.load(small_model)
    det = art.detector
    events = events_from_dicts(small_log[2][:6000])
    enc = encode_log(art, events, reduce=det.project)
    named = det.rules_reasons(det.rules_view.score(enc.feats, enc.type_ids), enc.feats, enc.type_ids)
    fired = det.rules_view.hits(enc.feats, enc.type_ids).fired_lists()
    risk = stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids)
    some = [i for i, n in enumerate(named) if n]
    assert some and len(some) < len(named) // 2
    for i in some:
        assert named[i] == fired[i] and risk[i] >= det.thresholds["REVIEW"]     # the combination is at least as high
    quiet = [i for i, f in enumerate(fired) if f and not named[i]]
    assert quiet                                        # a weak rule alone (e.g. new_device) names nothing
    r = explain(enc.feats[some[0]], enc.surprise[some[0]], "e1", "payment", view_rules=named[some[0]])
    assert r[0].code == "RULES_VIEW" and all(n in r[0].message for n in named[some[0]])
    assert r[0].weight > max(x.weight for x in r[1:]) if len(r) > 1 else True


def test_combined_risk_is_a_quantile_of_training_events(small_model, small_log):
    """The combination is re-calibrated per type group on the training events each account keeps under
    the per-account cap (seqguard/robust_fit.py), so an action's FPR on that (unlabelled) traffic
    stays what was asked for; the heavy accounts the cap trims sit above it."""
    from seqguard.robust_fit import capped_rows
    from seqguard.training.train import TrainConfig
    art = ModelArtifact.load(small_model)
    det = art.detector
    enc = encode_log(art, list(read_events(str(small_log[0]))), reduce=det.project)
    risk = stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids)
    cfg = TrainConfig(**art.metadata["training"]["config"])
    kept = np.zeros(len(risk), bool)
    kept[capped_rows(enc.user_idx, cfg.user_cap, cfg.user_cap_min, np.random.default_rng(cfg.seed + 2))] = True
    g = det.groups(enc.type_ids)
    for k in np.unique(g):
        if (g[kept] == k).sum() > 5000:
            assert abs(np.mean(risk[kept & (g == k)] >= 0.99) - 0.01) < 0.003, k
    assert np.mean(risk[~kept] >= 0.99) > 0.01
