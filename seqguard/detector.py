"""The anomaly detector applied after the encoder: embedding + surprise + signals -> risk -> action.

Pure numpy so that the gateway applies exactly the arithmetic that batch scoring applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .featurizer import FEATURE_INDEX
from .forest import FlatIsolationForest, RiskCalibrator

# Featuriser signals given to the forest next to the embedding: the ones a fraud analyst
# would name. (The encoder sees all features; the forest isolates on these directly.)
DETECTOR_SIGNALS = (
    "log_gap_s", "log_amount", "amount_z", "amount_vs_max", "new_device", "new_country",
    "new_ip_prefix", "log_events_1m", "log_events_1h", "log_login_failed_1h",
    "log_payment_failed_1h", "log_payments_24h", "log_coupons_24h", "recent_account_change",
    "gap_std", "review_without_purchase", "review_vs_purchase",
    "log_device_accounts_24h", "log_device_failed_1h", "log_device_new_accounts_24h",
    "log_ip_accounts_24h", "log_ip_failed_1h", "log_prefix_accounts_24h", "log_prefix_failed_1h",
)

ACTIONS = ("ALLOW", "REVIEW", "CHALLENGE", "BLOCK")
# Target false-positive rates on unlabelled traffic; since risk is the training-score CDF,
# the risk cut-off of an action is 1 - its FPR.
DEFAULT_ACTION_FPR = {"REVIEW": 0.05, "CHALLENGE": 0.01, "BLOCK": 0.001}


def action_thresholds(fpr: dict[str, float] | None = None) -> dict[str, float]:
    fpr = {**DEFAULT_ACTION_FPR, **(fpr or {})}
    th = {a: 1.0 - float(fpr[a]) for a in ACTIONS[1:]}
    if not th["REVIEW"] <= th["CHALLENGE"] <= th["BLOCK"]:
        raise ValueError(f"action FPRs must shrink from REVIEW to BLOCK, got {fpr}")
    return th


@dataclass
class Detector:
    proj_mean: np.ndarray                 # [H] float64
    proj: np.ndarray                      # [H, k] float64 (PCA of training embeddings)
    signal_idx: np.ndarray                # indices into the feature vector
    forest: FlatIsolationForest
    calibrator: RiskCalibrator
    thresholds: dict = field(default_factory=action_thresholds)

    def project(self, emb: np.ndarray) -> np.ndarray:
        return (np.asarray(emb, np.float64) - self.proj_mean) @ self.proj

    def inputs(self, emb_proj: np.ndarray, surprise: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Forest input rows: [projected embedding, surprise (2), named signals]."""
        return np.concatenate([emb_proj, np.asarray(surprise, np.float64),
                               np.asarray(feats, np.float64)[:, self.signal_idx]], axis=1)

    def risk_from_inputs(self, X: np.ndarray) -> np.ndarray:
        return self.calibrator.risk(-self.forest.score_samples(X))

    def risk(self, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return self.risk_from_inputs(self.inputs(self.project(emb), surprise, feats))

    def action_codes(self, risk: np.ndarray) -> np.ndarray:
        """0..3 = ALLOW, REVIEW, CHALLENGE, BLOCK."""
        th = self.thresholds
        cuts = np.array([th["REVIEW"], th["CHALLENGE"], th["BLOCK"]])
        return np.searchsorted(cuts, np.asarray(risk), side="right").astype(np.int8)

    # -- persistence (numpy arrays; versioned by the artifact metadata)
    def to_arrays(self) -> dict:
        return {"proj_mean": self.proj_mean, "proj": self.proj, "signal_idx": self.signal_idx,
                "cal_levels": self.calibrator.levels, "cal_quantiles": self.calibrator.quantiles,
                **self.forest.to_arrays()}

    @classmethod
    def from_arrays(cls, a, thresholds: dict | None = None) -> "Detector":
        return cls(np.asarray(a["proj_mean"]), np.asarray(a["proj"]), np.asarray(a["signal_idx"]),
                   FlatIsolationForest.from_arrays(a), RiskCalibrator(a["cal_levels"], a["cal_quantiles"]),
                   thresholds or action_thresholds())


def signal_indices(names=DETECTOR_SIGNALS) -> np.ndarray:
    return np.array([FEATURE_INDEX[n] for n in names], np.int64)


def fit_pca(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(emb, np.float64)
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    return mean, np.ascontiguousarray(vt[:k].T)
