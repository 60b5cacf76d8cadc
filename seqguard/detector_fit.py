"""Fitting the Detector (seqguard/detector.py) on a training log's encoder outputs, unlabelled.

`cfg` is any object with the fitting fields of seqguard.training.train.TrainConfig (n_estimators,
max_samples, forest_fit_events, seed, tail_forest, signal_floors, user_cap, user_cap_min,
sequence_weight, rules_weight, view_rules): the core does not import training, which composes these
steps (stage 1 forests, the views beside them, the session stage) into `seqguard train`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .detector import (DETECTOR_SIGNALS, MIN_GROUP_EVENTS, SIGNAL_FLOORS, TYPE_GROUPS, TYPE_NLL, Detector,
                       SequenceView, SignalFloor, TailView, signal_indices, type_groups)
from .featurizer import FEATURE_INDEX
from .forest import FlatIsolationForest, MarginalTails, RiskCalibrator, by_row_blocks
from .robust_fit import capped_rows


@dataclass
class FittedDetector:
    """What fit_detector learns: the Detector's served parts, and the sklearn originals kept as artifacts."""
    signal_cols: np.ndarray             # featuriser columns the detector takes (DETECTOR_SIGNALS)
    groups: np.ndarray                  # event type id -> type group
    forests: list                       # FlatIsolationForest per group (served)
    calibrators: list                   # RiskCalibrator per group
    tail_views: list | None             # TailView per group (the twin forest), None without cfg.tail_forest
    sklearn_forests: list               # isolation_forest.joblib
    sklearn_tail_forests: list | None   # isolation_forest_tail_scaled.joblib
    floors: list = field(default_factory=list)   # SignalFloor (detector.SIGNAL_FLOORS whose group exists)


def fit_detector(cfg, emb_proj, surprise, feats, type_ids, vocab_tokens, log=print,
                 user_idx=None) -> FittedDetector:
    """One IsolationForest per event-type group, each calibrated on its own group's training scores.

    With cfg.tail_forest each group gets a second forest on the same rows with every input column
    on its two-sided tail scale among the group's events (seqguard.forest.MarginalTails); the
    group's score combines both forests' tail-scale scores (detector.tail_view_score) and is
    calibrated again (detector.TailView). With cfg.signal_floors, each of detector.SIGNAL_FLOORS is
    fitted on its group's events and raises that group's score to the signal's own rarity.
    Evidence for each part: docs/results/worlds_design_views.md, worlds_ablation.md.
    With cfg.user_cap > 0 (and `user_idx`, the account of each row), each group's forest sample,
    tail scales, floors and calibrator see at most K events per account (seqguard/robust_fit.py).
    """
    sig = signal_indices(DETECTOR_SIGNALS)
    X = np.concatenate([emb_proj, np.asarray(surprise, np.float64), np.asarray(feats, np.float64)[:, sig]], axis=1)
    groups, ev_group = _type_groups_with_data(vocab_tokens, type_ids)
    tokens = list(vocab_tokens)
    floor_specs = [(name, int(groups[tokens.index(t)]), side, grid) for name, t, side, grid in SIGNAL_FLOORS
                   if cfg.signal_floors and t in tokens]

    rng = np.random.default_rng(cfg.seed)
    out = FittedDetector(sig, groups, [], [], [] if cfg.tail_forest else None, [],
                         [] if cfg.tail_forest else None)
    for g in range(len(TYPE_GROUPS)):
        rows = np.flatnonzero(ev_group == g)
        if len(rows) == 0:                            # keep indices aligned; never used for scoring
            rows = np.arange(len(X))
        Xg = X[rows]
        keep, fit_rows = _sample(cfg, rows, user_idx, rng)
        sk, flat, score = _forest_on(cfg, Xg, fit_rows)
        out.sklearn_forests.append(sk)
        out.forests.append(flat)
        if cfg.tail_forest:
            tails = MarginalTails.fit(Xg[keep])
            sk_t, flat_t, anomaly_t = _forest_on(cfg, by_row_blocks(tails.transform, Xg), fit_rows)
            view = TailView(tails, flat_t, RiskCalibrator.fit(anomaly_t[keep]), RiskCalibrator.fit(score[keep]))
            out.sklearn_tail_forests.append(sk_t)
            out.tail_views.append(view)
            score = view.combine(score, anomaly_t)
        mine = [s for s in floor_specs if s[1] == g]
        for name, _, side, grid in mine:
            col = np.asarray(feats[rows, FEATURE_INDEX[name]], np.float64)
            floor = SignalFloor.fit(name, g, side, grid, col[keep])
            out.floors.append(floor)
            score = np.maximum(score, floor(col))
        out.calibrators.append(RiskCalibrator.fit(score[keep]))
        log(f"forest '{TYPE_GROUPS[g][0]}': fitted on {len(fit_rows)} of {len(rows)} events"
            + (f" ({len(keep)} after the per-account cap)" if isinstance(keep, np.ndarray) else "")
            + f"{' (+ its tail-scaled twin)' if cfg.tail_forest else ''}"
            + "".join(f" (+ the {s[0]} floor)" for s in mine))
    return out


def _type_groups_with_data(vocab_tokens, type_ids) -> tuple[np.ndarray, np.ndarray]:
    """(event type id -> group, group per training row): a group with too few training events to
    learn is judged with the default group."""
    groups = type_groups(vocab_tokens)
    ev_group = groups[type_ids]
    default = len(TYPE_GROUPS) - 1
    for g in range(default):
        if (ev_group == g).sum() < MIN_GROUP_EVENTS:
            groups[groups == g] = default
            ev_group[ev_group == g] = default
    return groups, ev_group


def _sample(cfg, rows: np.ndarray, user_idx, rng: np.random.Generator):
    """(rows kept for tail scales, floors and calibration, rows the forest is fitted on), positions in
    `rows`; with the per-account cap, both from the capped rows."""
    if cfg.user_cap > 0 and user_idx is not None:
        keep = capped_rows(user_idx[rows], cfg.user_cap, cfg.user_cap_min, rng)
        return keep, rng.choice(keep, size=min(cfg.forest_fit_events, len(keep)), replace=False)
    return slice(None), rng.choice(len(rows), size=min(cfg.forest_fit_events, len(rows)), replace=False)


def _forest_on(cfg, Z: np.ndarray, fit_rows):
    """(sklearn forest, its flattened served form, anomaly of every row of Z)."""
    from sklearn.ensemble import IsolationForest
    sk = IsolationForest(n_estimators=cfg.n_estimators, max_samples=min(cfg.max_samples, len(fit_rows)),
                         random_state=cfg.seed, n_jobs=1).fit(Z[fit_rows].astype(np.float32))
    flat = FlatIsolationForest.from_sklearn(sk)
    return sk, flat, -by_row_blocks(flat.score_samples, Z)


def fit_views(detector: Detector, enc_log, cfg, vocab_tokens, log) -> None:
    """Calibrate the views beside the forests on the training log and the per-group tables of their
    weighted min-p (detector.Detector.combine_views): the sequence view (next-type NLL, all events)
    and the rules view (the pack's ranked score, all events, with the per-account cap of the
    forests' tables). Costs one more stage-1 pass over the training log."""
    from .batch import stage1_scores
    from .rules import DEFAULT_RULES_PATH
    from .rules_view import RulesView
    if cfg.sequence_weight <= 0 and cfg.rules_weight <= 0:
        return
    t0 = time.time()
    forest_tail = stage1_scores(detector, enc_log.emb, enc_log.surprise, enc_log.feats, enc_log.type_ids, tail=True)
    groups, G = detector.groups(enc_log.type_ids), len(detector.forests)
    keep = (capped_rows(enc_log.user_idx, cfg.user_cap, cfg.user_cap_min, np.random.default_rng(cfg.seed + 2))
            if cfg.user_cap > 0 else np.arange(len(groups)))
    tails = {"forests": forest_tail}
    if cfg.sequence_weight > 0:
        detector.sequence_view = SequenceView(RiskCalibrator.fit(enc_log.surprise[:, TYPE_NLL]), float(cfg.sequence_weight))
        tails["sequence"] = detector.sequence_view.tail(enc_log.surprise[:, TYPE_NLL])
    if cfg.rules_weight > 0:
        path = Path(cfg.view_rules or DEFAULT_RULES_PATH)
        view = RulesView.from_text(path.read_text(encoding="utf-8"), vocab_tokens, source=str(path))
        score = view.score(enc_log.feats, enc_log.type_ids)
        detector.rules_view, detector.rules_weight = view.fit(score[keep]), float(cfg.rules_weight)
        tails["rules"] = view.tail(score)
    a = detector.combine_views(tails)
    kept = np.zeros(len(a), bool)
    kept[keep] = True
    detector.combined = [RiskCalibrator.fit(a[(groups == k) & kept] if ((groups == k) & kept).any() else a)
                         for k in range(G)]
    log(f"views {detector.view_weights()} calibrated on {len(a)} training events ({time.time() - t0:.0f}s)")


def fit_session_stage(detector: Detector, enc_log, alpha: float, log, cfg=None) -> np.ndarray:
    """Stage 2 of the detector (see seqguard/detector.py): fit the calibrator of the session
    score c over the whole training log, replayed per user. Returns the served risk of every
    training event (replay order), exactly as score-file computes it. alpha 0 leaves stage 1 alone."""
    from .batch import detector_risk, stage1_scores
    t0 = time.time()
    if alpha > 0:
        detector.session_alpha = float(alpha)
        a = stage1_scores(detector, enc_log.emb, enc_log.surprise, enc_log.feats, enc_log.type_ids, tail=True)
        c, _ = detector.session_scan(a, enc_log.user_idx, len(enc_log.users))
        if cfg is not None and cfg.user_cap > 0:     # the same per-account cap as the group tables
            keep = capped_rows(enc_log.user_idx, cfg.user_cap, cfg.user_cap_min, np.random.default_rng(cfg.seed + 1))
            detector.session_calibrator = RiskCalibrator.fit(c[keep])
        else:
            detector.session_calibrator = RiskCalibrator.fit(c)
        log(f"session stage (alpha {alpha}) calibrated on {len(c)} training events ({time.time() - t0:.0f}s)")
        return detector.session_risk(c)
    return detector_risk(detector, enc_log.emb, enc_log.surprise, enc_log.feats, enc_log.type_ids)
