"""Drift job: population stability index (PSI) of the risk score and of every feature, live events vs training.

    PSI = sum_b (live_b - ref_b) * ln(live_b / ref_b)   over bins b (shares, floored at 1e-4)

Bins are the reference's deciles (ties merged, so a discrete feature gets one bin per value
range it actually takes), plus open-ended bins below and above, so values the training data
never produced count as drift. Conventional reading: < 0.1 stable, 0.1-0.2 watch, > 0.2 drifted.

The reference (bin edges + shares) lives in the artifact as drift_reference.json. A model
trained before this existed has none: it is computed from a reference events log (the training
log) with the same featuriser and model, and saved into the artifact for next time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FILE = "drift_reference.json"
THRESHOLD = 0.2
N_BINS = 10
_FLOOR = 1e-4


@dataclass
class DriftReport:
    n_events: int
    n_reference: int
    score_psi: float
    feature_psi: dict            # feature name -> PSI
    threshold: float = THRESHOLD

    @property
    def drifted_features(self) -> list[str]:
        return sorted((k for k, v in self.feature_psi.items() if v > self.threshold),
                      key=lambda k: -self.feature_psi[k])

    @property
    def flagged(self) -> bool:
        return self.score_psi > self.threshold or bool(self.drifted_features)

    def to_markdown(self, model_version: str = "") -> str:
        lines = [f"# Drift report{' for model ' + model_version if model_version else ''}", "",
                 f"{self.n_events} events vs a reference of {self.n_reference}; PSI > {self.threshold} is flagged.", "",
                 f"**{'DRIFT' if self.flagged else 'no drift'}**: risk score PSI {self.score_psi:.3f}, "
                 f"{len(self.drifted_features)} of {len(self.feature_psi)} features over the threshold.", "",
                 "| distribution | PSI | flag |", "|---|---:|---|",
                 f"| risk score | {self.score_psi:.3f} | {'DRIFT' if self.score_psi > self.threshold else ''} |"]
        for k, v in sorted(self.feature_psi.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.3f} | {'DRIFT' if v > self.threshold else ''} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"n_events": self.n_events, "n_reference": self.n_reference, "threshold": self.threshold,
                "flagged": self.flagged, "score_psi": self.score_psi, "feature_psi": self.feature_psi,
                "drifted_features": self.drifted_features}


def _edges(x: np.ndarray) -> list[float]:
    """Inner bin edges: the reference's deciles, ties merged, plus the deciles of its non-zero values.

    Most features are zero for most events (an amount only on payments, a failure counter only
    after failures); deciles of all values would put every non-zero value into one bin and miss
    a shift among them (e.g. amounts x5).
    """
    inner = np.linspace(0, 1, N_BINS + 1)[1:-1]
    qs = list(np.quantile(x, inner)) if len(x) else []
    nz = x[x != 0]
    if len(nz) >= 50:
        qs += [0.0, *np.quantile(nz, inner)]
    return sorted(set(float(q) for q in qs))


def _shares(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """Shares of x in (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(np.asarray(edges, np.float64), x, side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(1.0, counts.sum())


def psi(ref_shares, live_shares) -> float:
    e = np.maximum(np.asarray(ref_shares, np.float64), _FLOOR)
    a = np.maximum(np.asarray(live_shares, np.float64), _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def score_log(artifact, events) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(risk per event, feature matrix, feature names) with the artifact's featuriser and model (offline replay)."""
    from seqguard.batch import score_events
    risk, _, enc = score_events(artifact, events)
    return risk, np.asarray(enc.feats, np.float64), list(artifact.featurizer.spec()["feature_names"])


def build_reference(risk: np.ndarray, feats: np.ndarray, names: list[str]) -> dict:
    ref = {"n": int(len(risk)), "risk": {"edges": _edges(risk)}, "features": {}}
    ref["risk"]["shares"] = _shares(risk, ref["risk"]["edges"]).tolist()
    for j, name in enumerate(names):
        edges = _edges(feats[:, j])
        ref["features"][name] = {"edges": edges, "shares": _shares(feats[:, j], edges).tolist()}
    return ref


def save_reference(model_dir, ref: dict) -> Path:
    path = Path(model_dir) / REFERENCE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref))
    os.replace(tmp, path)
    return path


def load_reference(model_dir) -> dict | None:
    path = Path(model_dir) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def compare(ref: dict, risk: np.ndarray, feats: np.ndarray, names: list[str], threshold: float = THRESHOLD
            ) -> DriftReport:
    score_psi = psi(ref["risk"]["shares"], _shares(risk, ref["risk"]["edges"]))
    fpsi = {}
    for j, name in enumerate(names):
        r = ref["features"].get(name)
        if r is not None:
            fpsi[name] = psi(r["shares"], _shares(feats[:, j], r["edges"]))
    return DriftReport(len(risk), ref["n"], score_psi, fpsi, threshold)


def drift(model_dir, events, reference_events=None, threshold: float = THRESHOLD, save: bool = True,
          log=print) -> DriftReport:
    """PSI of `events` against the artifact's stored reference (built from `reference_events` if absent)."""
    from seqguard.artifact import ModelArtifact
    art = ModelArtifact.load(model_dir)
    ref = load_reference(model_dir)
    if ref is None:
        if reference_events is None:
            raise ValueError(f"{model_dir} has no {REFERENCE_FILE}: pass --reference EVENTS (the training log) "
                             "to compute it")
        r_risk, r_feats, names = score_log(art, reference_events)
        ref = build_reference(r_risk, r_feats, names)
        if save:
            try:
                log(f"reference from {len(reference_events)} events saved to {save_reference(model_dir, ref)}")
            except OSError as e:      # a read-only model volume: still report, just don't cache
                log(f"reference not saved ({e})")
    risk, feats, names = score_log(art, events)
    return compare(ref, risk, feats, names, threshold)
