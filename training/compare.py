"""`python -m seqguard.training.compare`: other detectors on the SAME embeddings as the shipped model.

The encoder (LSTM) is fixed: both logs are encoded once with the artifact's ONNX step and its
PCA, giving the detector inputs X = [projected embedding, surprise, named signals] per event.
Every candidate detector is then fitted per event-type group on a fit log (unlabelled), its
anomaly score calibrated to a risk (quantile among fit events of the group, like production),
and scored on a labelled test log. Labels are used for metrics only (and, in the held-out-family
and feedback sections, to DROP users from fit data or to train the optional feedback ranker).

`--sections encoders` (not in the default sections) instead swaps the ENCODER and keeps the detector: the
LSTM vs the causal Transformer of training/transformer.py, same data, same IsolationForest code path, plus
the online cost of one event update; it writes its own report (--encoder-out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqguard.detector import TYPE_GROUPS, SignalFloor, TailView, apply_floors, split_floor_inputs
from seqguard.forest import FlatIsolationForest, MarginalTails, RiskCalibrator, by_row_blocks


def forest_inputs(det, X: np.ndarray) -> np.ndarray:
    """The detector's input rows without the rules view's column (the last one): what the forests
    and floors read, whatever the width of the embedding part (the transformer's PCA differs)."""
    return X[:, :-1] if det.rules_view is not None else X


@dataclass
class Encoded:
    """Detector inputs of one log, in INPUT order (aligned with the events/labels files)."""
    X: np.ndarray              # [n, d] float64
    group: np.ndarray          # type group per event
    users: np.ndarray          # user_id per event (str)
    event_types: np.ndarray    # event_type per event (str)
    surprise: np.ndarray       # [n, 2]
    feats: np.ndarray          # [n, F] featuriser output
    risk: np.ndarray           # the shipped model's risk
    order: np.ndarray | None = None   # replay position -> input index (each user's events in order)


def encode_cached(model, events_path: str, cache_dir: str) -> Encoded:
    """Encode a log with the artifact (ONNX + PCA) once; later runs load the npz."""
    from seqguard.batch import score_events
    from seqguard.schema import read_events
    cache = Path(cache_dir) / f"{Path(events_path).stem}__{model.model_version}.npz"
    if cache.exists():
        a = np.load(cache, allow_pickle=True)
        return Encoded(*(a[k] for k in ("X", "group", "users", "event_types", "surprise", "feats", "risk")),
                       order=a["order"] if "order" in a.files else None)
    events = list(read_events(events_path))
    det = model.detector
    risk, _, enc = score_events(model, events, progress=True)
    inv = np.empty_like(enc.order)
    inv[enc.order] = np.arange(len(enc.order))     # input index -> replay position
    X = forest_inputs(det, det.inputs(enc.emb, enc.surprise, enc.feats, enc.type_ids))[inv]
    out = Encoded(X, det.groups(enc.type_ids)[inv], np.array([e.user_id for e in events], dtype=object).astype(str),
                  np.array([e.event_type for e in events], dtype=object).astype(str),
                  np.asarray(enc.surprise, np.float64)[inv], np.asarray(enc.feats, np.float32)[inv], risk,
                  np.asarray(enc.order, np.int64))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out.__dict__)
    return out


# --------------------------------------------------------------------------- detectors

CAL_MAX = 100_000           # fit-log events per group used for the risk quantiles


class GroupDetector:
    """One unsupervised model per event-type group + a per-group RiskCalibrator (as production).

    `make()` returns a fresh sklearn-style estimator with `score_samples` (higher = more normal).
    `twin`: as the production detector (seqguard/detector.py TailView), each group also gets a
    second model on the inputs mapped to each column's tail scale among the group's fit events,
    combined on their tail scales by detector.tail_view_score; False: the raw model alone.
    `floors`: the production detector's signal floors as (feature, group, side, grid); the LAST
    len(floors) input columns are their signals (Detector.inputs). Each is refitted on the fit log
    and raises its group's score as in production, whatever the model underneath.
    """

    def __init__(self, name: str, make, max_fit: int, seed: int = 0, twin: bool = True, floors=()):
        self.name, self.make, self.max_fit, self.seed, self.twin = name, make, max_fit, seed, twin
        self.floor_specs = list(floors)
        self.floors: list[SignalFloor] = []
        self.models: dict[int, object] = {}
        self.cals: dict[int, RiskCalibrator] = {}
        self.twins: dict[int, TailView] = {}   # group -> TailView with this detector's model as its forest

    def fit(self, X: np.ndarray, group: np.ndarray) -> "GroupDetector":
        rng = np.random.default_rng(self.seed)
        X, cols = split_floor_inputs(X, len(self.floor_specs))
        self.floors = [SignalFloor.fit(name, g, side, grid, cols[group == g, j])
                       for j, (name, g, side, grid) in enumerate(self.floor_specs)]
        for g in np.unique(group):
            rows = np.flatnonzero(group == g)
            fit_rows = rng.choice(rows, size=min(self.max_fit, len(rows)), replace=False)
            m = self.make().fit(X[fit_rows])
            self.models[int(g)] = m
            cal_rows = rng.choice(rows, size=min(CAL_MAX, len(rows)), replace=False)
            raw = -self._score(m, X[cal_rows])
            if self.twin:
                tails = MarginalTails.fit(X[rows])
                mt = self.make().fit(tails.transform(X[fit_rows]))
                anomaly_t = -self._score(mt, tails.transform(X[cal_rows]))
                self.twins[int(g)] = TailView(tails, mt, RiskCalibrator.fit(anomaly_t), RiskCalibrator.fit(raw))
                raw = self.twins[int(g)].combine(raw, anomaly_t)
            raw = apply_floors(self.floors, int(g), raw, None if cols is None else cols[cal_rows])
            self.cals[int(g)] = RiskCalibrator.fit(raw)
        return self

    def group_score(self, g: int, X: np.ndarray) -> np.ndarray:
        X, cols = split_floor_inputs(X, len(self.floor_specs))
        raw = -self._score(self.models[g], X)
        if g in self.twins:
            v = self.twins[g]
            raw = v.combine(raw, -self._score(v.forest, v.tails.transform(X)))
        return apply_floors(self.floors, g, raw, cols)

    @staticmethod
    def _score(m, X):
        return by_row_blocks(m.score_samples, X, 32768).astype(np.float64) if len(X) else np.zeros(0)

    def _key(self, g) -> int:
        return int(g) if int(g) in self.models else next(iter(self.models))

    def anomaly(self, X: np.ndarray, group: np.ndarray) -> np.ndarray:
        out = np.zeros(len(X))
        for g in np.unique(group):
            rows = np.flatnonzero(group == g)
            out[rows] = self.group_score(self._key(g), X[rows])
        return out

    def risk(self, X: np.ndarray, group: np.ndarray, scale: str = "risk") -> np.ndarray:
        """Per-group quantile of the anomaly; scale "tail": on the -log(1 - q) scale (session input)."""
        out = np.zeros(len(X))
        for g in np.unique(group):
            rows, k = np.flatnonzero(group == g), self._key(g)
            out[rows] = getattr(self.cals[k], scale)(self.group_score(k, X[rows]))
        return out


def subset(enc: Encoded, keep: np.ndarray) -> Encoded:
    """The events where `keep` (input order), with the replay order carried over."""
    keep = np.asarray(keep, bool)
    new_index = np.cumsum(keep) - 1
    order = None if enc.order is None else new_index[enc.order[keep[enc.order]]]
    return Encoded(enc.X[keep], enc.group[keep], enc.users[keep], enc.event_types[keep], enc.surprise[keep],
                   enc.feats[keep], enc.risk[keep], order)


class SessionStage:
    """The production detector's stage 2 (seqguard/detector.py) on top of any GroupDetector: each
    event scored with max(its tail anomaly, the user's running average of earlier ones), calibrated
    on the fit log. Needs the replay order of each log (Encoded.order)."""

    def __init__(self, alpha: float | None = None):
        from seqguard.detector import SESSION_ALPHA
        self.alpha = SESSION_ALPHA if alpha is None else alpha
        self.cal: RiskCalibrator | None = None

    def _c(self, det: GroupDetector, enc: Encoded) -> np.ndarray:
        from seqguard.detector import session_scan
        if enc.order is None:
            raise ValueError("this cache has no replay order: delete it and rerun (needed by the session stage)")
        a = det.risk(enc.X, enc.group, scale="tail")[enc.order]
        _, user_idx = np.unique(enc.users[enc.order], return_inverse=True)
        c_replay, _ = session_scan(a, user_idx, int(user_idx.max()) + 1 if len(a) else 0, self.alpha)
        c = np.empty_like(c_replay)
        c[enc.order] = c_replay
        return c

    def fit(self, det: GroupDetector, fit: Encoded) -> "SessionStage":
        self.cal = RiskCalibrator.fit(self._c(det, fit))
        return self

    def risk(self, det: GroupDetector, enc: Encoded) -> np.ndarray:
        return self.cal.risk(self._c(det, enc))


class _FlatIF:
    """sklearn IsolationForest fitted, scored with the production numpy FlatIsolationForest."""

    def __init__(self, n_estimators=200, max_samples=512, seed=0):
        self.kw = dict(n_estimators=n_estimators, max_samples=max_samples, random_state=seed, n_jobs=1)

    def fit(self, X):
        from sklearn.ensemble import IsolationForest
        f = IsolationForest(**{**self.kw, "max_samples": min(self.kw["max_samples"], len(X))})
        self.flat = FlatIsolationForest.from_sklearn(f.fit(X.astype(np.float32)))
        return self

    def score_samples(self, X):
        return self.flat.score_samples(X)


class _Mahalanobis:
    """Gaussian baseline: minus the squared Mahalanobis distance (Ledoit-Wolf covariance)."""

    def fit(self, X):
        from sklearn.covariance import LedoitWolf
        self.mu = X.mean(0)
        self.P = LedoitWolf().fit(X - self.mu).precision_
        return self

    def score_samples(self, X):
        D = X - self.mu
        return -np.einsum("ij,jk,ik->i", D, self.P, D)


def detector_factories(seed: int = 0, floors=()) -> dict[str, GroupDetector]:
    """The candidates. LOF and the kernel OCSVM are fitted on a subsample (their cost grows with it).
    `floors`: floor_specs(model.detector), so every candidate gets production's signal floors."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import SGDOneClassSVM
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return {
        "iforest": GroupDetector("iforest", lambda: _FlatIF(200, 512, seed), 200_000, seed, floors=floors),
        "lof": GroupDetector("lof", lambda: make_pipeline(StandardScaler(), LocalOutlierFactor(
            n_neighbors=35, novelty=True)), 5_000, seed, floors=floors),
        "ocsvm_nystroem": GroupDetector("ocsvm_nystroem", lambda: make_pipeline(
            StandardScaler(), Nystroem(gamma=1.0 / 90, n_components=300, random_state=seed),
            SGDOneClassSVM(nu=0.05, random_state=seed, max_iter=50, tol=None)), 50_000, seed, floors=floors),
        "mahalanobis": GroupDetector("mahalanobis", _Mahalanobis, 200_000, seed, floors=floors),
        # ablation: the raw forest alone (the default before its tail-scaled twin)
        "iforest_raw": GroupDetector("iforest_raw", lambda: _FlatIF(200, 512, seed), 200_000, seed, twin=False,
                                     floors=floors),
    }


def floor_specs(det) -> list:
    """(feature, group, side, grid) of a production Detector's signal floors, for GroupDetector."""
    return [(f.feature, f.group, f.side, f.grid) for f in det.floors]


DETECTOR_LABELS = {
    "shipped": "shipped model (IForest + session, fit on train20k)",
    "iforest": "IsolationForest (default)",
    "lof": "LocalOutlierFactor(novelty, k=35, 5k fit/group)",
    "ocsvm_nystroem": "OneClassSVM (Nystroem 300 + SGD, 50k fit/group)",
    "mahalanobis": "Gaussian / Mahalanobis (Ledoit-Wolf)",
    "iforest_raw": "IsolationForest, raw inputs only (ablation: no tail-scaled twin)",
}
DETECTOR_LABELS.update({f"{k}+session": f"{v.split(' (')[0]} + session stage" for k, v in list(DETECTOR_LABELS.items())
                        if k != "shipped"})


# --------------------------------------------------------------------------- labels + metrics

def load_labels_aligned(labels_path: str, events_path: str):
    """(y, family) aligned with the events file (label rows are matched on event_id)."""
    from seqguard.training.evaluate import read_labels
    lab = read_labels(labels_path)
    ids = [json.loads(l)["event_id"] for l in open(events_path, encoding="utf-8") if l.strip()]
    y = np.array([lab[i][0] for i in ids], np.int8)
    fam = np.array([lab[i][1] for i in ids], dtype=object).astype(str)
    return y, fam


def score_metrics(s: np.ndarray, y: np.ndarray, fam: np.ndarray, pay: np.ndarray) -> dict:
    from seqguard.training.evaluate import _recall_at_fpr, _safe_auc, _safe_ap
    m = {"roc_auc": _safe_auc(y, s), "pr_auc": _safe_ap(y, s),
         "pay_roc_auc": _safe_auc(y[pay], s[pay]), "pay_pr_auc": _safe_ap(y[pay], s[pay]),
         "r_at_1pct": _recall_at_fpr(y, s, 0.01)["recall"],
         "pay_r_at_1pct": _recall_at_fpr(y[pay], s[pay], 0.01)["recall"]}
    t = _recall_at_fpr(y, s, 0.01)["threshold"]
    m["family_r_at_1pct"] = {f: float((s[(fam == f) & (y == 1)] >= t).mean())
                             for f in sorted(set(fam[y == 1]))}
    return m


def _f(x, d=3):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def time_scoring(det: GroupDetector, X: np.ndarray, group: np.ndarray, n_single: int = 200, seed: int = 0,
                 n_batch: int = 20_000):
    """(batch us/event over a sample of X, median us for ONE event scored alone): online cost of a detector."""
    rng = np.random.default_rng(seed)
    b = rng.choice(len(X), size=min(n_batch, len(X)), replace=False)
    t = time.perf_counter()
    det.risk(X[b], group[b])
    batch_us = 1e6 * (time.perf_counter() - t) / len(b)
    lat = []
    for i in rng.choice(len(X), size=min(n_single, len(X)), replace=False):
        t = time.perf_counter()
        det.risk(X[i:i + 1], group[i:i + 1])
        lat.append(1e6 * (time.perf_counter() - t))
    return batch_us, float(np.median(lat))


# --------------------------------------------------------------------------- sections

def compare_detectors(fit: Encoded, test: Encoded, y, fam, pay, seed: int, log, floors=()) -> dict:
    out = {"shipped": {**score_metrics(test.risk, y, fam, pay), "batch_us": None, "single_us": None}}
    for name, det in detector_factories(seed, floors).items():
        t = time.perf_counter()
        det.fit(fit.X, fit.group)
        fit_s = time.perf_counter() - t
        risk = det.risk(test.X, test.group)
        batch_us, single_us = time_scoring(det, test.X, test.group, seed=seed)
        out[name] = {**score_metrics(risk, y, fam, pay), "fit_s": fit_s, "batch_us": batch_us, "single_us": single_us}
        log(f"{name}: pay ROC-AUC {_f(out[name]['pay_roc_auc'])}, R@1% {_f(out[name]['r_at_1pct'])}, "
            f"{batch_us:.1f} us/event batch, {single_us:.0f} us single, fit {fit_s:.1f}s")
        if fit.order is not None and test.order is not None:       # + the production session stage
            sess = SessionStage().fit(det, fit)
            k = f"{name}+session"
            out[k] = {**score_metrics(sess.risk(det, test), y, fam, pay), "fit_s": None, "batch_us": None,
                      "single_us": None}
            log(f"{k}: pay ROC-AUC {_f(out[k]['pay_roc_auc'])}, R@1% {_f(out[k]['r_at_1pct'])}")
    return out


def attack_users(fit_users, fit_y, fit_fam, family: str) -> np.ndarray:
    return np.unique(fit_users[(fit_fam == family) & (fit_y == 1)])


def heldout_families(fit: Encoded, fit_y, fit_fam, test: Encoded, y, fam, seed: int, log,
                     feedback_frac: float = 0.05, floors=()) -> dict:
    """Per attack family: IForest (+ the session stage when both logs carry their replay order, as
    production; + 5% feedback ranker) refitted without that family's users."""
    from .feedback import FeedbackRanker, sample_user_labels
    session = fit.order is not None and test.order is not None

    def run(keep):
        det = detector_factories(seed, floors)["iforest"].fit(fit.X[keep], fit.group[keep])
        if session:             # as production: stage 2 calibrated on the same (family-free) fit log
            fit_k = subset(fit, keep)
            stage = SessionStage().fit(det, fit_k)
            risk_fit, risk = stage.risk(det, fit_k), stage.risk(det, test)
        else:
            risk_fit = det.risk(fit.X[keep], fit.group[keep])
            risk = det.risk(test.X, test.group)
        lab = sample_user_labels(fit.users[keep], fit_y[keep], feedback_frac, seed)
        fb = FeedbackRanker().fit(risk_fit, fit.surprise[keep], fit.feats[keep], lab, fit.users[keep])
        return risk, fb.score(risk, test.surprise, test.feats), fb.active

    def fam_recall(s, f):
        from seqguard.training.evaluate import threshold_at_fpr
        t = threshold_at_fpr(s[y == 0], 0.01)
        return float((s[(fam == f) & (y == 1)] >= t).mean())

    full_risk, full_fb, _ = run(np.ones(len(fit.X), bool))
    out = {}
    for f in sorted(set(fam[y == 1])):
        drop = np.isin(fit.users, attack_users(fit.users, fit_y, fit_fam, f))
        risk, fb, active = run(~drop)
        pos = (fam == f) & (y == 1)
        out[f] = {"session_stage": session,
                  "dropped_users": int(len(np.unique(fit.users[drop]))), "dropped_events": int(drop.sum()),
                  "test_events": int(pos.sum()),
                  "iforest_with": fam_recall(full_risk, f), "iforest_without": fam_recall(risk, f),
                  "challenge_with": float((full_risk[pos] >= 0.99).mean()),
                  "challenge_without": float((risk[pos] >= 0.99).mean()),
                  "challenge_fpr_without": float((risk[y == 0] >= 0.99).mean()),
                  "feedback_with": fam_recall(full_fb, f), "feedback_without": fam_recall(fb, f),
                  "feedback_active": active}
        log(f"held out {f}: IF {out[f]['iforest_with']:.3f} -> {out[f]['iforest_without']:.3f}, "
            f"feedback {out[f]['feedback_with']:.3f} -> {out[f]['feedback_without']:.3f}")
    return out


def feedback_runs(fit: Encoded, fit_y, test: Encoded, y, fam, pay, fracs, seeds, log) -> dict:
    """Shipped model's risk, without and with a fraction of reviewed fit users."""
    from .feedback import FeedbackRanker, risk_tail, sample_user_labels
    out = {"0": [score_metrics(risk_tail(test.risk), y, fam, pay)]}
    for frac in fracs:
        rs = []
        for s in seeds:
            lab = sample_user_labels(fit.users, fit_y, frac, s)
            fb = FeedbackRanker().fit(fit.risk, fit.surprise, fit.feats, lab, fit.users)
            m = score_metrics(fb.score(test.risk, test.surprise, test.feats), y, fam, pay)
            m.update(active=fb.active, alpha=fb.alpha if fb.active else 0.0, n_labelled=fb.n_labelled,
                     n_pos=int((lab == 1).sum()))
            rs.append(m)
            log(f"feedback {frac:.0%} seed {s}: pay ROC-AUC {_f(m['pay_roc_auc'])}, R@1% {_f(m['r_at_1pct'])}, "
                f"{m['n_labelled']} labelled ({m['n_pos']} pos)")
        out[str(frac)] = rs
    # the no-label fallback is the identity on the unsupervised ranking
    none = FeedbackRanker().fit(fit.risk, fit.surprise, fit.feats, np.full(len(fit_y), -1))
    out["fallback_identical"] = bool(np.array_equal(none.score(test.risk, test.surprise, test.feats),
                                                    risk_tail(test.risk)))
    return out


# --------------------------------------------------------------------------- encoders (LSTM vs Transformer)

def user_roc_auc(s: np.ndarray, y: np.ndarray, users: np.ndarray):
    """User level, as training.evaluate: a user's score is its max event score; positive = any label-1 event."""
    from seqguard.training.evaluate import _safe_auc
    codes, idx = np.unique(users, return_inverse=True)
    umax = np.full(len(codes), -np.inf)
    np.maximum.at(umax, idx, s)
    uy = np.zeros(len(codes), np.int8)
    np.maximum.at(uy, idx, y)
    return _safe_auc(uy, umax)


def encode_transformer_cached(tf_dir: str, model, events_path: str, cache_dir: str, lstm: Encoded | None = None,
                              log=print) -> Encoded:
    """Detector inputs of a log with the Transformer encoder: [its PCA-64 embedding, its surprise, the same
    24 signals], groups from the LSTM artifact's detector (same featuriser, same vocabulary). When the
    LSTM encoding of the same log is given, checks that both saw bit-identical features."""
    import hashlib

    import torch

    from seqguard.batch import dense_user_index
    from seqguard.featurizer import ContextStore, featurize_log
    from seqguard.schema import read_events
    from seqguard.training import transformer as tfm
    digest = hashlib.sha256((Path(tf_dir) / tfm.MODEL_FILE).read_bytes()).hexdigest()[:8]
    cache = Path(cache_dir) / f"{Path(events_path).stem}__transformer-{digest}.npz"
    if cache.exists():
        a = np.load(cache, allow_pickle=True)
        return Encoded(*(a[k] for k in ("X", "group", "users", "event_types", "surprise", "feats", "risk")))
    torch.set_num_threads(1)
    enc, pca_mean, pca = tfm.load(tf_dir)
    events = list(read_events(events_path))
    order, type_ids, feats = featurize_log(model.featurizer, events, ContextStore(), progress=True)
    user_idx, users = dense_user_index(events, order)
    t = time.perf_counter()
    emb, sur = tfm.encode_windows(enc, user_idx, type_ids, feats[:, :enc.cfg.n_features], len(users),
                                  progress=True)          # the encoder's inputs: the same ones the LSTM reads
    log(f"transformer encoded {len(events)} events in {time.perf_counter() - t:.0f}s")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    det = model.detector
    X = forest_inputs(det, det.inputs((emb.astype(np.float64) - pca_mean) @ pca, sur, feats, type_ids))[inv]
    out = Encoded(X, det.groups(type_ids)[inv], np.array([e.user_id for e in events], dtype=object).astype(str),
                  np.array([e.event_type for e in events], dtype=object).astype(str), sur.astype(np.float64)[inv],
                  feats[inv], np.full(len(events), np.nan))
    if lstm is not None and not np.array_equal(lstm.feats, out.feats):
        raise RuntimeError(f"{events_path}: the LSTM cache was featurised differently; delete {cache_dir} and rerun")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out.__dict__)
    return out


def compare_encoders(model, args, encoders, y, fam, pay, test_lstm: Encoded, fit_lstm: Encoded, log) -> dict:
    """The same IsolationForest code path (`detector_factories()['iforest']`, fitted per group on the fit log)
    on each encoder's detector inputs; metrics on the test log; plus the online cost of one event update."""
    from seqguard.training import transformer as tfm
    tf_dir = args.transformer_dir
    if "transformer" in encoders and not (Path(tf_dir) / tfm.MODEL_FILE).exists():
        log(f"no {tf_dir}/{tfm.MODEL_FILE}: training it on {args.transformer_train_events}")
        tfm.train_on_log(args.transformer_train_events, args.model, tf_dir, tfm.TransformerTrainConfig(), log)
    res: dict = {"rows": {}}
    for name in encoders:
        if name == "lstm":
            fit, test = fit_lstm, test_lstm
        elif name == "transformer":
            test = encode_transformer_cached(tf_dir, model, args.events, args.cache, test_lstm, log)
            fit = encode_transformer_cached(tf_dir, model, args.fit_events, args.cache, fit_lstm, log)
        else:
            raise ValueError(f"unknown encoder {name!r} (lstm, transformer)")
        t = time.perf_counter()
        det = detector_factories(args.seed, floor_specs(model.detector))["iforest"].fit(fit.X, fit.group)
        fit_s = time.perf_counter() - t
        risk = det.risk(test.X, test.group)
        m = {**score_metrics(risk, y, fam, pay), "user_roc_auc": user_roc_auc(risk, y, test.users),
             "fit_s": fit_s, "dims": int(test.X.shape[1])}
        res["rows"][name] = m
        log(f"encoder {name}: pay ROC-AUC {_f(m['pay_roc_auc'])}, pay R@1% {_f(m['pay_r_at_1pct'])}, "
            f"user ROC-AUC {_f(m['user_roc_auc'])}, R@1% {_f(m['r_at_1pct'])}")
    meta_path = Path(tf_dir) / "metadata.json"
    if "transformer" in encoders and meta_path.exists():
        res["transformer_training"] = json.loads(meta_path.read_text())
    res["lstm_training"] = {k: v for k, v in json.loads((Path(args.model) / "metadata.json").read_text())
                            ["training"].items() if k in ("epoch_losses", "seconds", "events", "users")}
    if "transformer" in encoders and not args.no_latency:
        res["latency"] = tfm.measure_latency(args.model, tf_dir, threads=1)
        log(f"latency: {json.dumps(res['latency'])}")
    return res


# Encoder compute allowed for ONE event update of a coalesced batch (ONNX Runtime, 1 thread). The gateway's
# bound is p99 <= 10 ms end to end (BENCHMARKS.md), of which the LSTM's Triton step is ~1-2 ms today; a
# challenger may at most take 1 ms of encoder compute per call at batch 1 and at batch 64.
ENCODER_BUDGET_US = 1000.0
ENCODER_QUALITY_KEYS = ("pay_roc_auc", "pay_r_at_1pct", "user_roc_auc")


def encoder_conclusion(e: dict) -> str:
    """Keep the LSTM unless the Transformer is better on the headline metrics AND fits the budget."""
    R = e["rows"]
    if "lstm" not in R or "transformer" not in R:
        return "Only one encoder was run: no conclusion."
    l, t = R["lstm"], R["transformer"]
    better = all((t[k] or 0) > (l[k] or 0) for k in ENCODER_QUALITY_KEYS)
    lat = e.get("latency") or {}
    worst = max((lat[b]["transformer_ort_us"] for b in lat if b.isdigit()), default=None)
    fits = worst is not None and worst <= ENCODER_BUDGET_US
    names = {"pay_roc_auc": "payment ROC-AUC", "pay_r_at_1pct": "payment R@1%FPR", "user_roc_auc": "user ROC-AUC",
             "roc_auc": "all-event ROC-AUC", "pr_auc": "all-event PR-AUC", "r_at_1pct": "all-event R@1%FPR"}
    diffs = ", ".join(f"{names[k]} {_f(t[k])} vs {_f(l[k])}" for k in ENCODER_QUALITY_KEYS)
    wins = [f"{names[k]} {_f(t[k])} vs {_f(l[k])}" for k in names if k not in ENCODER_QUALITY_KEYS
            and (t[k] or 0) > (l[k] or 0)]
    wins += [f"{f} recall {_f(v)} vs {_f(l['family_r_at_1pct'][f])}" for f, v in t["family_r_at_1pct"].items()
             if v > l["family_r_at_1pct"][f]]
    if wins:
        diffs += "; it is better only on " + ", ".join(wins)
    cost = ("latency not measured" if worst is None else
            "; ".join(f"batch {b}: {lat[b]['transformer_ort_us']:.0f} us vs {lat[b]['lstm_ort_us']:.0f} us per call"
                      for b in lat if b.isdigit()))
    verdict = ("The Transformer is better on all three headline metrics and fits the budget: it could become the "
               "default, at the price of per-user window state." if better and fits else
               "**The LSTM stays the default**: " + ("the Transformer is not better on all of payment ROC-AUC, "
                                                     "payment R@1%FPR and user ROC-AUC" if not better else "")
               + (" and " if not better and not fits else "")
               + ("" if fits else f"the Transformer does not fit the {ENCODER_BUDGET_US:.0f} us per-call encoder "
                                  "budget") + ".")
    return (f"**Conclusion.** Transformer vs LSTM, same data and detector: {diffs}. Online cost, ONNX Runtime 1 thread: "
            f"{cost}. The Transformer must also keep the last N-1 featurised events per user in Redis "
            f"(~{(e.get('latency') or {}).get('window', 32) - 1} x 41 floats, ~5 KB vs the LSTM's 2 x 128 floats, 1 KB) "
            f"and recompute the window for every event (O(N) tokens, O(N^2) attention), where the LSTM does one "
            f"O(1) step. {verdict}")


ENCODER_LABELS = {"lstm": "LSTM step encoder (default, hidden 128)",
                  "transformer": "causal Transformer, last N events"}


def encoder_report_md(res: dict, e: dict) -> str:
    R = e["rows"]
    tt = e.get("transformer_training", {})
    tcfg = tt.get("encoder", {})
    lt = e.get("lstm_training", {})
    L = ["# Encoder comparison: LSTM vs Transformer (seed 4)", "",
         f"- generated by `python -m seqguard.training.compare --sections encoders --encoders {','.join(R)}` ({res['created']})",
         f"- both encoders trained self-supervised (NLL of the next event's type + log gap) on `{lt.get('events', '?'):,}` "
         f"events of `data/train20k.jsonl` with the same featuriser, vocabulary and per-event inputs; the LSTM is the "
         f"shipped `{res['model_dir']}` (2 epochs, final epoch loss {_f((lt.get('epoch_losses') or [None])[-1])})"
         + (f"; the Transformer (`training/transformer.py`: {tcfg.get('n_layers')} layers, d_model {tcfg.get('d_model')}, "
            f"{tcfg.get('n_heads')} heads, d_ff {tcfg.get('d_ff')}, window N = {tcfg.get('window')}, "
            f"{tt.get('params', 0):,} parameters vs the LSTM's {e.get('latency', {}).get('params', {}).get('lstm', 0):,}) "
            f"{tt.get('epochs_done')} epochs in {tt.get('seconds')} s on 1 thread, final epoch loss "
            f"{_f((tt.get('epoch_losses') or [None])[-1])}" if tt else ""),
         "- the embedding of event t is the output at position t over the window [t-N+1, t]; its surprise is the "
         "heads applied to the embedding of event t-1 (the LSTM: state before t)",
         f"- detector: the SAME IsolationForest code path (`detector_factories()['iforest']`, 200 trees, one per "
         f"event-type group, risk calibrated per group) fitted on `{res['fit_events']}` (unlabelled) and scored on "
         f"`{res['events']}` ({res['test_n']:,} events, {res['test_pos']:,} label 1). Inputs per event: "
         "[PCA-64 embedding (PCA fitted on 2,000 training users' embeddings, as train.py), surprise (2), 24 named "
         "signals]; the features of both encoders were checked bit-identical.",
         "- R@1%FPR = recall at the cut-off flagging 1% of label-0 events; user ROC-AUC: max risk per user.", "",
         "| encoder | pay ROC-AUC | pay R@1%FPR | user ROC-AUC | ROC-AUC | PR-AUC | R@1%FPR | "
         + " | ".join(f"R@1%FPR {f}" for f in next(iter(R.values()))["family_r_at_1pct"]) + " |",
         "|---|" + "---:|" * (6 + len(next(iter(R.values()))["family_r_at_1pct"]))]
    for k, m in R.items():
        L.append(f"| {ENCODER_LABELS.get(k, k)} | {_f(m['pay_roc_auc'])} | {_f(m['pay_r_at_1pct'])} | "
                 f"{_f(m['user_roc_auc'])} | {_f(m['roc_auc'])} | {_f(m['pr_auc'])} | {_f(m['r_at_1pct'])} | "
                 + " | ".join(_f(v) for v in m["family_r_at_1pct"].values()) + " |")
    lat = e.get("latency")
    if lat:
        L += ["", f"## Online cost of one event update (CPU, {lat['threads']} thread, median of {lat['reps']} calls)", "",
              "LSTM: one step (x, h, c) -> (h', c', embedding, surprise). Transformer: the whole window of the "
              f"user's last N = {lat['window']} featurised events recomputed (`WindowStep`: embedding + surprise). "
              "Encoder only; the featuriser and the detector are the same for both. Wall-clock medians on the shared "
              "2-core machine while other jobs ran (load average ~7): absolute numbers vary by up to ~2x between "
              "runs, the ratio is what to read (both encoders timed in the same process, one after the other).", "",
              "| runtime | batch (users) | LSTM us/call | Transformer us/call | LSTM us/event | Transformer us/event | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for rt, key in (("ONNX Runtime (serving)", "ort"), ("torch", "torch")):
            for b in [k for k in lat if k.isdigit()]:
                a, t = lat[b][f"lstm_{key}_us"], lat[b][f"transformer_{key}_us"]
                L.append(f"| {rt} | {b} | {a:.0f} | {t:.0f} | {a / int(b):.1f} | {t / int(b):.1f} | {t / a:.1f}x |")
    for extra in e.get("notes", []):
        L += ["", extra]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- report

def _mean_sd(vals):
    v = np.array([x for x in vals if x is not None], np.float64)
    return (float(v.mean()), float(v.std())) if len(v) else (None, None)


def report_md(res: dict) -> str:
    L = [f"# Detector comparison, held-out families, feedback labels (test log `{Path(res['events']).name}`)", "",
         f"- generated by `python -m seqguard.training.compare` ({res['created']}), model `{res['model_version']}` "
         f"(`{res['model_dir']}`: LSTM encoder, PCA 64)",
         f"- fit log (unlabelled for the detectors): `{res['fit_events']}` - {res['fit_n']:,} events; "
         f"test log: `{res['events']}` - {res['test_n']:,} events ({res['test_pos']:,} label 1)",
         "- all detectors get the SAME inputs (projected LSTM embedding, surprise, 24 named signals = 90 dims), "
         "one model per event-type group plus its twin on the tail-scaled inputs (combined as production; the "
         "`raw inputs only` row drops the twin), the production signal floors refitted on the fit log "
         "(detector.SIGNAL_FLOORS), risk calibrated per group on the fit log (as production); "
         "metrics on the test log; R@1%FPR = recall at the cut-off flagging 1% of label-0 events.", ""]
    if "detectors" in res:
        D = res["detectors"]
        fams = list(next(iter(D.values()))["family_r_at_1pct"])
        L += ["## 1. Alternative detectors on the same embeddings", "",
              "| detector | ROC-AUC | PR-AUC | pay ROC-AUC | pay PR-AUC | R@1%FPR | pay R@1%FPR | us/event (batch) "
              "| us (1 event) | fit s |", "|---|" + "---:|" * 9]
        for k, m in D.items():
            L.append(f"| {DETECTOR_LABELS.get(k, k)} | {_f(m['roc_auc'])} | {_f(m['pr_auc'])} | {_f(m['pay_roc_auc'])} "
                     f"| {_f(m['pay_pr_auc'])} | {_f(m['r_at_1pct'])} | {_f(m['pay_r_at_1pct'])} "
                     f"| {_f(m['batch_us'], 1)} | {_f(m['single_us'], 0)} | {_f(m.get('fit_s'), 1)} |")
        L += ["", "Recall per attack family at 1% FPR (all-events cut-off):", "",
              "| family | " + " | ".join(DETECTOR_LABELS.get(k, k) for k in D) + " |", "|---|" + "---:|" * len(D)]
        for f in fams:
            L.append(f"| {f} | " + " | ".join(_f(D[k]['family_r_at_1pct'][f]) for k in D) + " |")
        L += ["", "Cost: detector scoring only (the encoder step is the same for all), one thread, on this shared "
              "2-core machine; `us (1 event)` = median wall time to score one event alone (the online path), "
              "`us/event (batch)` over a random 20k-event sample of the test log; both vary with the load on the machine "
              "during the run (compare rows of one report, not across reports). IForest uses the production "
              "FlatIsolationForest (ONNX TreeEnsemble; numpy where ONNX Runtime lacks it), twice per event with the twin.", ""]
        if res.get("detectors_note"):
            L += [res["detectors_note"], ""]
    if "heldout" in res:
        H = res["heldout"]
        L += ["## 2. Held-out attack family", "",
              "For each family, every user with a label-1 event of that family is removed from the fit log; "
              "IForest + calibration" + (" + the session stage" if next(iter(H.values())).get("session_stage") else "")
              + " (and the 5%-label feedback ranker) are refitted on the rest and the family's "
              "recall is measured on the test log. `with` = fitted on the full fit log (same detector, same seed).", "",
              "| family | users dropped | test events | IF R@1%FPR with | IF R@1%FPR without | IF R@CHALLENGE with "
              "| IF R@CHALLENGE without | label-0 FPR @CHALLENGE without | feedback 5% with | feedback 5% without |",
              "|---|" + "---:|" * 9]
        for f, m in H.items():
            L.append(f"| {f} | {m['dropped_users']} | {m['test_events']} | {_f(m['iforest_with'])} | "
                     f"{_f(m['iforest_without'])} | {_f(m['challenge_with'])} | {_f(m['challenge_without'])} | "
                     f"{_f(m['challenge_fpr_without'], 4)} | {_f(m['feedback_with'])} | {_f(m['feedback_without'])} |")
        L += ["", "R@CHALLENGE: risk >= 0.99, i.e. the calibrated threshold of the refitted model.", ""]
    if "feedback" in res:
        F = res["feedback"]
        L += ["## 3. Feedback labels (training/feedback.py)", "",
              "Shipped model's risk; a logistic regression on [risk tail, surprise, 21 signals] (C=0.1, balanced) is "
              "trained on the labels of a random fraction of fit-log USERS (all their events) and its log-odds are "
              "added to -log10(1-risk), never negatively where the risk already flags (>= 0.99), and only when a "
              "2-fold check over users finds it helps. "
              f"Mean ± sd over seeds {res['feedback_seeds']}.", "",
              "| labelled users | labelled events (pos) | ROC-AUC | PR-AUC | pay ROC-AUC | pay PR-AUC | R@1%FPR "
              "| pay R@1%FPR |", "|---|" + "---:|" * 7]
        for k, rs in F.items():
            if k == "fallback_identical":
                continue
            name = "0 (unsupervised default)" if k == "0" else f"{float(k):.0%}"
            cells = []
            for key in ("roc_auc", "pr_auc", "pay_roc_auc", "pay_pr_auc", "r_at_1pct", "pay_r_at_1pct"):
                mu, sd = _mean_sd([r[key] for r in rs])
                cells.append(_f(mu) if len(rs) == 1 else f"{_f(mu)} ± {_f(sd)}")
            nl = "-" if k == "0" else f"{int(np.mean([r['n_labelled'] for r in rs]))} ({int(np.mean([r['n_pos'] for r in rs]))})"
            L.append(f"| {name} | {nl} | " + " | ".join(cells) + " |")
        fams = list(F["0"][0]["family_r_at_1pct"])
        L += ["", "Recall per family at 1% FPR (mean over seeds):", "",
              "| family | " + " | ".join("0" if k == "0" else f"{float(k):.0%}" for k in F if k != "fallback_identical")
              + " |", "|---|" + "---:|" * (len(F) - 1)]
        for f in fams:
            L.append(f"| {f} | " + " | ".join(_f(_mean_sd([r['family_r_at_1pct'][f] for r in rs])[0])
                                               for k, rs in F.items() if k != "fallback_identical") + " |")
        L += ["", f"With no labels the ranker is inactive and returns exactly the unsupervised score "
              f"(checked: {F['fallback_identical']}).", ""]
    for extra in res.get("notes", []):
        L += [extra, ""]
    return "\n".join(L)


def main(argv=None) -> int:
    import datetime as dt
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/m20k_mt")
    ap.add_argument("--fit-events", default="data/fit5k.jsonl")
    ap.add_argument("--fit-labels", default="data/fit5k_labels.jsonl",
                    help="used only to drop a family (held-out) and to sample feedback labels")
    ap.add_argument("--events", default="data/test5k_s4.jsonl")
    ap.add_argument("--labels", default="data/test5k_s4_labels.jsonl")
    ap.add_argument("--out", default="docs/results/comparison_seed4.md")
    ap.add_argument("--sections", default="detectors,heldout,feedback")
    ap.add_argument("--cache", default="runs/compare_cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feedback-seeds", default="0,1,2")
    ap.add_argument("--encoders", default="lstm,transformer",
                    help="for --sections encoders: which encoders to compare (lstm, transformer)")
    ap.add_argument("--transformer-dir", default="runs/tf20k", help="trained here first if missing")
    ap.add_argument("--transformer-train-events", default="data/train20k.jsonl")
    ap.add_argument("--encoder-out", default="docs/results/encoder_comparison_seed4.md")
    ap.add_argument("--no-latency", action="store_true", help="skip the encoder latency measurement")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from seqguard.artifact import ModelArtifact
    from seqguard.training.evaluate import PAYMENT_ATTEMPTS
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model = ModelArtifact.load(args.model)
    test = encode_cached(model, args.events, args.cache)
    fit = encode_cached(model, args.fit_events, args.cache)
    y, fam = load_labels_aligned(args.labels, args.events)
    fit_y, fit_fam = load_labels_aligned(args.fit_labels, args.fit_events)
    pay = np.isin(test.event_types, PAYMENT_ATTEMPTS)
    sections = set(args.sections.split(","))
    res: dict = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "model_version": model.model_version, "model_dir": args.model, "fit_events": args.fit_events,
                 "events": args.events, "fit_n": len(fit.X), "test_n": len(test.X), "test_pos": int(y.sum()),
                 "feedback_seeds": [int(s) for s in args.feedback_seeds.split(",")]}
    if "encoders" in sections:
        enc_res = compare_encoders(model, args, [e for e in args.encoders.split(",") if e], y, fam, pay,
                                   test, fit, log)
        enc_res["notes"] = [encoder_conclusion(enc_res)]
        eout = Path(args.encoder_out)
        eout.parent.mkdir(parents=True, exist_ok=True)
        eout.with_suffix(".json").write_text(json.dumps({**res, "encoders": enc_res}, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        eout.write_text(encoder_report_md(res, enc_res))
        print(encoder_report_md(res, enc_res))
        sections.discard("encoders")
        if not sections:
            return 0
    jpath = Path(args.out).with_suffix(".json")
    if jpath.exists():                                  # keep sections computed by an earlier run
        prev = json.loads(jpath.read_text())
        for k in ("detectors", "heldout", "feedback", "notes", "detectors_note"):
            if k in prev and k not in sections:
                res[k] = prev[k]
    if "detectors" in sections:
        res["detectors"] = compare_detectors(fit, test, y, fam, pay, args.seed, log, floor_specs(model.detector))
    if "heldout" in sections:
        res["heldout"] = heldout_families(fit, fit_y, fit_fam, test, y, fam, args.seed, log,
                                          floors=floor_specs(model.detector))
    if "feedback" in sections:
        res["feedback"] = feedback_runs(fit, fit_y, test, y, fam, pay, (0.01, 0.05), res["feedback_seeds"], log)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(res, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    Path(args.out).write_text(report_md(res))
    print(report_md(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--encode-only":
        from seqguard.artifact import ModelArtifact
        m = ModelArtifact.load(sys.argv[2])
        for p in sys.argv[3:]:
            e = encode_cached(m, p, "runs/compare_cache")
            print(p, e.X.shape, flush=True)
        sys.exit(0)
    sys.exit(main())
