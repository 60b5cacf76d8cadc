"""The anomaly detector applied after the encoder: embedding + surprise + signals -> risk -> action.

Stage 1, per event, combines calibrated VIEWS of the event, each mapped to its tail among the
unlabelled training events, a = -log(1 - quantile):
* the forests: one IsolationForest per event-type group on [projected embedding, surprise, named
  signals] (an event is judged against events of its kind), plus a twin on the same inputs with
  each column mapped to its two-sided tail among the group's training events
  (forest.MarginalTails). The raw forest isolates by distance (a bot cluster far out on
  velocity), the twin by rarity (a value rare but near the bulk); the raw forest's score is a
  floor the twin can raise (`tail_view_score`). Two signals are also read directly as floors
  (`SignalFloor`): one column among ~90 is rarely on an isolation path, so the forests dilute it;
  read directly, the 7-day count of other accounts failing logins on the device catches slow
  credential stuffing, and timing regularity catches a crawler from its first few events;
* the sequence view: the encoder's next-type surprise (DeepLog-style), `SequenceView`;
* the rules view: the hand rules' own score (seqguard/rules_view.py).
The views are combined by a weighted min-p (`combine_views`) and re-calibrated per type group,
so at any cut-off the detector flags what each view flags at its share of the false-positive
rate: whichever view a team's traffic favours, the combination is not far below it.

Stage 2, per user session: the event is scored with c = max(a, m), m the running average of the
user's previous events' a (m <- alpha * a + (1 - alpha) * m, one float per user kept with the
LSTM state), and risk = the quantile of c among training events. A payment after a burst of odd
account activity inherits that activity's risk even when the payment itself looks ordinary; a
lone odd event is not diluted by a quiet history.

What each part adds, measured on randomised worlds: docs/results/worlds_design_views.md.
Pure numpy so that the gateway applies exactly the arithmetic that batch scoring applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .featurizer import FEATURE_INDEX
from .forest import FlatIsolationForest, MarginalTails, RiskCalibrator

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


# Events are judged against events of the same kind: a payment is compared with payments, a
# login with logins. One forest per group (conditional anomaly detection) ranks payments far
# better than one forest that spends its splits telling views from payments.
TYPE_GROUPS = (
    ("money", frozenset({"payment", "checkout", "payment_failed", "add_payment_method", "redeem_coupon",
                         "add_to_cart", "remove_from_cart"})),
    ("account", frozenset({"login", "login_failed", "logout", "change_password", "change_email",
                           "change_address"})),
    ("activity", None),                   # everything else, team-specific and unknown types included
)
MIN_GROUP_EVENTS = 500                    # a smaller group in training falls back to "activity"
SESSION_ALPHA = 0.3                       # weight of the newest event in the session average (0: off)


def type_groups(vocab_tokens) -> np.ndarray:
    """Group index per event-type id."""
    out = np.full(len(vocab_tokens), len(TYPE_GROUPS) - 1, np.int64)
    for i, tok in enumerate(vocab_tokens):
        for g, (_, members) in enumerate(TYPE_GROUPS[:-1]):
            if tok in members:
                out[i] = g
    return out


@dataclass
class TailView:
    """A type group's second forest: fitted on the inputs mapped to each column's tail scale."""
    tails: MarginalTails
    forest: FlatIsolationForest
    calibrator: RiskCalibrator            # this forest's anomaly -> tail scale
    raw_calibrator: RiskCalibrator        # the group's raw forest anomaly -> tail scale

    def combine(self, raw_anomaly: np.ndarray, twin_anomaly: np.ndarray) -> np.ndarray:
        """The group's stage-1 score from both forests' anomalies (tail_view_score on their tail scales)."""
        return tail_view_score(self.raw_calibrator.tail(raw_anomaly), self.calibrator.tail(twin_anomaly))

    def to_arrays(self, prefix: str) -> dict:
        out = {**self.tails.to_arrays(prefix=f"{prefix}tails_"), **self.forest.to_arrays(prefix=f"{prefix}forest_")}
        for name, c in (("cal", self.calibrator), ("raw_cal", self.raw_calibrator)):
            out[f"{prefix}{name}_levels"], out[f"{prefix}{name}_quantiles"] = c.levels, c.quantiles
        return out

    @classmethod
    def from_arrays(cls, a, prefix: str) -> "TailView":
        return cls(MarginalTails.from_arrays(a, prefix=f"{prefix}tails_"),
                   FlatIsolationForest.from_arrays(a, prefix=f"{prefix}forest_"),
                   RiskCalibrator(a[f"{prefix}cal_levels"], a[f"{prefix}cal_quantiles"]),
                   RiskCalibrator(a[f"{prefix}raw_cal_levels"], a[f"{prefix}raw_cal_quantiles"]))


# (featuriser signal, an event type of the group it is read in, which side is rare evidence, grid)
SIGNAL_FLOORS = (
    ("log_device_failed_accounts_7d", "login_failed", "upper", np.log1p(np.arange(65.0))),   # counts 0..64
    ("gap_jitter", "view_item", "lower", np.r_[0.0, np.geomspace(1e-4, 4.0, 255)]),
)
_FLOOR_TOL = 1e-6                        # float32 feature rows vs the float64 grid


@dataclass
class SignalFloor:
    """A signal whose rarity is read directly in one type group, as a floor under the forests' score:
    floor(x) = -log((1 + n) / (1 + N)), n = the group's training events at least as extreme as x on
    the rare `side` (N of them). Unsupervised like the forests, on the same -log(1 - quantile) scale.
    Tabulated on a grid; between grid points the less extreme neighbour is read (a lower floor)."""
    feature: str                          # a column of FEATURE_NAMES
    group: int                            # the type group it applies to
    side: str                             # "upper": large values are rare evidence; "lower": small ones
    grid: np.ndarray                      # [K] ascending signal values
    tail: np.ndarray                      # [K] the floor at each grid value

    @classmethod
    def fit(cls, feature: str, group: int, side: str, grid, column: np.ndarray) -> "SignalFloor":
        grid, x = np.asarray(grid, np.float64), np.sort(np.asarray(column, np.float64))
        if side == "upper":
            n = len(x) - np.searchsorted(x, grid - _FLOOR_TOL, side="left")     # events >= each grid value
        elif side == "lower":
            n = np.searchsorted(x, grid + _FLOOR_TOL, side="right")             # events <= each grid value
        else:
            raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")
        return cls(feature, int(group), side, grid, -np.log((1.0 + n) / (1.0 + len(x))))

    def __call__(self, column: np.ndarray) -> np.ndarray:
        x, K = np.asarray(column, np.float64), len(self.grid)
        if self.side == "upper":          # the largest grid value <= x
            i = np.searchsorted(self.grid, x + _FLOOR_TOL, side="right") - 1
            return np.where(i >= 0, self.tail[np.clip(i, 0, K - 1)], 0.0)
        i = np.searchsorted(self.grid, x - _FLOOR_TOL, side="left")             # the smallest grid value >= x
        return np.where(i < K, self.tail[np.clip(i, 0, K - 1)], 0.0)


TYPE_NLL = 0                              # the step model's surprise columns: [type NLL, log-gap NLL]
# Shares of the false-positive budget in the weighted min-p over the views (Detector.combine_views);
# the forests get the rest. The sequence view's tail is noisy in shop traffic (next types are
# unpredictable there) and sharp in machine logs (HDFS), so it gets a small share: at a cut-off it
# adds what it flags at 1% of the FPR. The rules view gets the larger share: its few rules are
# precise where they fire (payments above all) and silent elsewhere (a rule-free event spends none
# of its share), while the forests' top tail holds legitimate heavy users on unseen traffic. Chosen
# on design worlds only (docs/results/worlds_design_views.md).
SEQUENCE_WEIGHT = 0.01
RULES_WEIGHT = 0.75


@dataclass
class SequenceView:
    """The encoder's next-event prediction read directly (DeepLog-style), not as one forest column.

    The step model's `surprise[:, TYPE_NLL]` is -log p(observed type | the user's state BEFORE the
    event), the previous step's predicted distribution. `calibrator` maps it to its tail among all
    training events, -log(1 - quantile). Only the type NLL: the log-gap NLL stays a forest input
    (a constant gap, as in machine logs, would make its tail degenerate)."""
    calibrator: RiskCalibrator            # type NLL -> tail, over all training events
    weight: float = SEQUENCE_WEIGHT       # the view's share of the false-positive budget, 0 < w < 1

    def tail(self, type_nll: np.ndarray) -> np.ndarray:
        return self.calibrator.tail(type_nll)

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}cal_levels": self.calibrator.levels, f"{prefix}cal_quantiles": self.calibrator.quantiles,
                f"{prefix}weight": np.array(self.weight, np.float64)}

    @classmethod
    def from_arrays(cls, a, prefix: str) -> "SequenceView":
        return cls(RiskCalibrator(a[f"{prefix}cal_levels"], a[f"{prefix}cal_quantiles"]), float(a[f"{prefix}weight"]))


@dataclass
class Detector:
    proj_mean: np.ndarray                 # [H] float64
    proj: np.ndarray                      # [H, k] float64 (PCA of training embeddings)
    signal_idx: np.ndarray                # indices into the feature vector
    forests: list                         # FlatIsolationForest per type group
    calibrators: list                     # RiskCalibrator per type group (of group_score)
    type_group: np.ndarray                # group index per event-type id
    thresholds: dict = field(default_factory=action_thresholds)
    session_alpha: float = 0.0            # 0: no session stage
    session_calibrator: RiskCalibrator | None = None   # quantiles of c over the training log
    tail_views: list | None = None        # TailView per type group (None: the raw forest alone)
    floors: list = field(default_factory=list)   # SignalFloor, each reading one of the floor input columns
    sequence_view: "SequenceView | None" = None  # the encoder's next-type surprise as its own view
    rules_view: "RulesView | None" = None        # the hand rules' score as its own view (seqguard/rules_view.py)
    rules_weight: float = RULES_WEIGHT    # the rules view's share of the false-positive budget
    combined: list | None = None          # RiskCalibrator per type group of combine_views (None: no views)

    @property
    def has_session(self) -> bool:
        return self.session_alpha > 0 and self.session_calibrator is not None

    @property
    def has_views(self) -> bool:
        return self.sequence_view is not None or self.rules_view is not None

    @property
    def n_forest_inputs(self) -> int:
        return self.proj.shape[1] + 2 + len(self.signal_idx)

    def project(self, emb: np.ndarray) -> np.ndarray:
        return (np.asarray(emb, np.float64) - self.proj_mean) @ self.proj

    def inputs(self, emb_proj: np.ndarray, surprise: np.ndarray, feats: np.ndarray,
               type_ids: np.ndarray | None = None) -> np.ndarray:
        """Detector input rows: [projected embedding, surprise (2), named signals] (what the
        forests read), one column per signal floor, then with a rules view its ranked rule score
        (which needs the rows' `type_ids`)."""
        feats = np.asarray(feats, np.float64)
        cols = [emb_proj, np.asarray(surprise, np.float64), feats[:, self.signal_idx],
                feats[:, [FEATURE_INDEX[f.feature] for f in self.floors]]]
        if self.rules_view is not None:
            if type_ids is None:
                raise ValueError("this detector has a rules view: its inputs need the events' type ids")
            cols.append(self.rules_view.score(feats, type_ids)[:, None])
        return np.concatenate(cols, axis=1)

    def groups(self, type_ids: np.ndarray) -> np.ndarray:
        t = np.asarray(type_ids, np.int64)
        return self.type_group[np.clip(t, 0, len(self.type_group) - 1)]

    def group_score(self, k: int, X: np.ndarray) -> np.ndarray:
        """Group k's forest score of input rows, before its calibrator (higher = more anomalous)."""
        w = self.n_forest_inputs
        F = X[:, :w]
        raw = -self.forests[k].score_samples(F)
        if self.tail_views is not None:
            v = self.tail_views[k]
            raw = v.combine(raw, -v.forest.score_samples(v.tails.transform(F)))
        return apply_floors(self.floors, k, raw, X[:, w:w + len(self.floors)])

    def _per_group(self, type_ids: np.ndarray, fn) -> np.ndarray:
        """fn(group k, its rows) per type group, assembled row by row. One group (always at batch 1
        online) passes slice(None): no row selection, no copy."""
        g = self.groups(type_ids)
        if len(g) and (g == g[0]).all():
            return fn(int(g[0]), slice(None))
        out = np.empty(len(g), np.float64)
        for k in np.unique(g):
            rows = np.flatnonzero(g == k)
            out[rows] = fn(int(k), rows)
        return out

    def view_tails(self, X: np.ndarray, type_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each view's own tail, -log(1 - quantile) among training events: "forests" (per type
        group), "sequence" and "rules" (all events) where the detector has them."""
        out = {"forests": self._per_group(type_ids, lambda k, r: self.calibrators[k].tail(self.group_score(k, X[r])))}
        if self.sequence_view is not None:
            out["sequence"] = self.sequence_view.tail(X[:, self.proj.shape[1] + TYPE_NLL])
        if self.rules_view is not None:
            out["rules"] = self.rules_view.tail(self.rule_scores(X))
        return out

    def rule_scores(self, X: np.ndarray) -> np.ndarray | None:
        """The rules view's ranked score of input rows (their last column; see `inputs`), None without one."""
        return X[:, -1] if self.rules_view is not None else None

    def view_weights(self) -> dict[str, float]:
        """Each view's share of the false-positive budget; the forests get what the others leave."""
        w = {}
        if self.sequence_view is not None:
            w["sequence"] = self.sequence_view.weight
        if self.rules_view is not None:
            w["rules"] = self.rules_weight
        return {"forests": 1.0 - sum(w.values()), **w}

    def combine_views(self, tails: dict[str, np.ndarray]) -> np.ndarray:
        """-log of the weighted min-p (Bonferroni) over the views: max over views of tail + log(w).
        At a cut-off the combination flags what each view flags at w of its FPR, so it is never far
        below its best view; re-calibrated per group (`combined`) the action FPRs hold again."""
        weights = self.view_weights()
        return np.max([np.asarray(tails[v], np.float64) + np.log(weights[v]) for v in weights], axis=0)

    def rules_reasons(self, rule_score: np.ndarray | None, feats: np.ndarray, type_ids: np.ndarray) -> list[list[str]]:
        """Per row, the names of the rules view's rules that fired where that view ALONE puts the
        event at or above the REVIEW cut-off of stage 1 (its weighted tail read through the group's
        combined table: the combination is at least that high); otherwise []. Reads only the rules,
        so a reason names them exactly when the rules view, not another view, can account for the score.
        `rule_score`: the rows' `rule_scores` from the inputs the risk was computed from, so the
        pack's fixed cost per call is paid once (it evaluates again only on the flagged rows)."""
        if self.rules_view is None or not len(type_ids):
            return [[] for _ in range(len(type_ids))]
        t = self.rules_view.tail(rule_score) + np.log(self.rules_weight)
        rows = np.flatnonzero(self._per_group(type_ids, lambda k, r: self.combined[k].risk(t[r])) >= self.thresholds["REVIEW"])
        out: list[list[str]] = [[] for _ in range(len(type_ids))]
        if len(rows):
            for i, names in zip(rows.tolist(), self.rules_view.hits(np.asarray(feats)[rows], np.asarray(type_ids)[rows]).fired_lists()):
                out[i] = names
        return out

    def _calibrated(self, X: np.ndarray, type_ids: np.ndarray, scale: str) -> np.ndarray:
        """Each row's stage-1 score: `scale` "risk" (quantile among its group's training events) or
        "tail" (-log(1 - quantile)). With views, their combination's quantile in the group."""
        if not self.has_views:
            return self._per_group(type_ids, lambda k, r: getattr(self.calibrators[k], scale)(self.group_score(k, X[r])))
        a = self.combine_views(self.view_tails(X, type_ids))
        return self._per_group(type_ids, lambda k, r: getattr(self.combined[k], scale)(a[r]))

    def risk_from_inputs(self, X: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        """Risk = the event's anomaly score as a quantile among training events of its group."""
        return self._calibrated(X, type_ids, "risk")

    def risk(self, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        """Stage 1 alone: the event's risk WITHOUT session context (see session_risk for the served score)."""
        return self.risk_from_inputs(self.inputs(self.project(emb), surprise, feats, type_ids), type_ids)

    def tail_from_inputs(self, X: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        """Stage 1 on the tail scale: a = -log(1 - per-group quantile), row by row."""
        return self._calibrated(X, type_ids, "tail")

    def event_tail(self, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        return self.tail_from_inputs(self.inputs(self.project(emb), surprise, feats, type_ids), type_ids)

    def session_step(self, a: np.ndarray, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One event per row (rows are different users): (c, m after the event)."""
        return session_step(a, m_prev, self.session_alpha)

    def session_risk(self, c: np.ndarray) -> np.ndarray:
        return self.session_calibrator.risk(c)

    def session_scan(self, a: np.ndarray, user_idx: np.ndarray, n_users: int,
                     m0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """c for every event of a replayed log (each user's events in their order) and the final m per user."""
        return session_scan(a, user_idx, n_users, self.session_alpha, m0)

    def action_codes(self, risk: np.ndarray) -> np.ndarray:
        """0..3 = ALLOW, REVIEW, CHALLENGE, BLOCK."""
        th = self.thresholds
        cuts = np.array([th["REVIEW"], th["CHALLENGE"], th["BLOCK"]])
        return np.searchsorted(cuts, np.asarray(risk), side="right").astype(np.int8)

    # -- persistence (numpy arrays; versioned by the artifact metadata)
    def to_arrays(self) -> dict:
        out = {"proj_mean": self.proj_mean, "proj": self.proj, "signal_idx": self.signal_idx,
               "type_group": self.type_group, "n_groups": np.array(len(self.forests))}
        for k, (f, c) in enumerate(zip(self.forests, self.calibrators)):
            out.update(f.to_arrays(prefix=f"g{k}_forest_"))
            out[f"g{k}_cal_levels"], out[f"g{k}_cal_quantiles"] = c.levels, c.quantiles
            if self.tail_views is not None:
                out.update(self.tail_views[k].to_arrays(prefix=f"g{k}_tv_"))
        out["n_floors"] = np.array(len(self.floors))
        for i, f in enumerate(self.floors):
            out[f"floor{i}_feature"] = np.array(f.feature)
            out[f"floor{i}_group"] = np.array(f.group, np.int64)
            out[f"floor{i}_side"] = np.array(f.side)
            out[f"floor{i}_grid"], out[f"floor{i}_tail"] = f.grid, f.tail
        if self.sequence_view is not None:
            out.update(self.sequence_view.to_arrays("seq_"))
        if self.rules_view is not None:
            out.update(self.rules_view.to_arrays("rules_"))
            out["rules_weight"] = np.array(self.rules_weight, np.float64)
        for k, c in enumerate(self.combined or []):
            out[f"combined_g{k}_levels"], out[f"combined_g{k}_quantiles"] = c.levels, c.quantiles
        if self.has_session:
            out["session_alpha"] = np.array(self.session_alpha, np.float64)
            out["session_cal_levels"] = self.session_calibrator.levels
            out["session_cal_quantiles"] = self.session_calibrator.quantiles
        return out

    @classmethod
    def from_arrays(cls, a, thresholds: dict | None = None) -> "Detector":
        """Parts a model was trained without (a stage switched off) are absent from its arrays."""
        from .rules_view import RulesView
        G = int(a["n_groups"])
        keys = set(a.files if hasattr(a, "files") else a)
        det = cls(np.asarray(a["proj_mean"]), np.asarray(a["proj"]), np.asarray(a["signal_idx"]),
                  [FlatIsolationForest.from_arrays(a, prefix=f"g{k}_forest_") for k in range(G)],
                  [RiskCalibrator(a[f"g{k}_cal_levels"], a[f"g{k}_cal_quantiles"]) for k in range(G)],
                  np.asarray(a["type_group"]), thresholds or action_thresholds())
        if "session_alpha" in keys:
            det.session_alpha = float(a["session_alpha"])
            det.session_calibrator = RiskCalibrator(a["session_cal_levels"], a["session_cal_quantiles"])
        if "g0_tv_tails_table" in keys:
            det.tail_views = [TailView.from_arrays(a, prefix=f"g{k}_tv_") for k in range(G)]
        det.floors = [SignalFloor(str(a[f"floor{i}_feature"]), int(a[f"floor{i}_group"]), str(a[f"floor{i}_side"]),
                                  np.asarray(a[f"floor{i}_grid"], np.float64), np.asarray(a[f"floor{i}_tail"], np.float64))
                      for i in range(int(a["n_floors"]) if "n_floors" in keys else 0)]
        if "seq_cal_levels" in keys:
            det.sequence_view = SequenceView.from_arrays(a, "seq_")
        if "rules_text" in keys:
            det.rules_view = RulesView.from_arrays(a, "rules_")
            det.rules_weight = float(a["rules_weight"])
        if det.has_views:
            det.combined = [RiskCalibrator(a[f"combined_g{k}_levels"], a[f"combined_g{k}_quantiles"]) for k in range(G)]
        return det


def tail_view_score(a_raw: np.ndarray, a_twin: np.ndarray) -> np.ndarray:
    """A group's forest score from its two forests, both on the -log(1 - quantile) scale: the raw
    forest's verdict is a floor and the twin can raise it by half of its excess,
    a_raw + 0.5 * max(0, a_twin - a_raw). A plain mean would let the twin pull down what only the
    raw forest finds extreme (a bot cluster far out on velocity; docs/results/tail_forest.md)."""
    a_raw = np.asarray(a_raw, np.float64)
    return np.maximum(a_raw, 0.5 * (a_raw + np.asarray(a_twin, np.float64)))


def split_floor_inputs(X: np.ndarray, n_floors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Input rows without views -> (the forests' columns, the last `n_floors` columns: the floors' signals)."""
    return (X[:, :-n_floors], X[:, -n_floors:]) if n_floors else (X, None)


def apply_floors(floors: list, k: int, score: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    """Group k's score raised to each of its signal floors (cols: one column per floor, in order)."""
    for j, f in enumerate(floors):
        if f.group == k:
            score = np.maximum(score, f(cols[:, j]))
    return score


def session_step(a: np.ndarray, m_prev: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 for one event per row: c = max(a, m_prev), m = alpha * a + (1 - alpha) * m_prev.

    Element-wise float64 arithmetic, so the gateway (one event at a time) and score-file (all
    users in lock-step) get the same bits."""
    a = np.asarray(a, np.float64)
    m_prev = np.asarray(m_prev, np.float64)
    return np.maximum(a, m_prev), alpha * a + (1.0 - alpha) * m_prev


def session_scan(a: np.ndarray, user_idx: np.ndarray, n_users: int, alpha: float,
                 m0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """session_step over a replayed log: all users advance in lock-step (the k-th event of every
    user in one call). Rows must be in replay order (each user's events in their order)."""
    from .encoding import lockstep_rows
    user_idx = np.asarray(user_idx, np.int64)
    m = np.zeros(n_users, np.float64) if m0 is None else np.array(m0, np.float64)
    c = np.empty(len(user_idx), np.float64)
    for rows in lockstep_rows(user_idx, n_users):
        u = user_idx[rows]
        c[rows], m[u] = session_step(a[rows], m[u], alpha)
    return c, m


def signal_indices(names=DETECTOR_SIGNALS) -> np.ndarray:
    return np.array([FEATURE_INDEX[n] for n in names], np.int64)


def fit_pca(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(emb, np.float64)
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    return mean, np.ascontiguousarray(vt[:k].T)
