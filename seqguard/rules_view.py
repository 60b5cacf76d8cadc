"""The hand rules' own score as one calibrated view of the detector.

Why: on data no one here has generated, simple hand rules catch what the learned views miss
(rings spread over days, renamed event types that cut the named signals, a fleet that makes
up a large share of traffic), and the learned views catch what the rules miss. Each view's
score is mapped to its tail among the unlabelled training events of the event's type group,
-log(p), p the fraction of those events scoring at least as high, and the detector combines the
views' tails by a weighted min-p (Detector.combine_views): at any false-positive rate the
combination flags what each view flags at its share of that rate. No labels are used.

The pack is the one given at train time (by default configs/rules/default.toml), stored in the
detector's arrays as its TOML text: a model scores the same whatever rules file is deployed
beside it later (those rules, seqguard/rules.py, set minimum actions on top of the model).
The view reads only each event's type and featuriser row (its amount included), which is all a gateway keeps for a
model step it runs later, so every step is scored alike online and offline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .forest import RiskCalibrator
from .rules import TIE_BREAK, RuleInputs, RuleSet, loads_rules, ranked_score


@dataclass
class RulesView:
    rules: RuleSet
    text: str                             # the pack's TOML, persisted with the detector
    type_names: np.ndarray                # [n_types] event type per type id (the model's vocabulary)
    calibrators: list                     # RiskCalibrator per type group: ranked rule score -> tail

    @classmethod
    def from_text(cls, text: str, type_names, source: str = "<rules view>") -> "RulesView":
        rules = loads_rules(text, source=source)
        if rules.needs_model:
            raise ValueError(f"{source}: the rules view cannot read the model's own risk or reasons "
                             f"(rules {[r.name for r in rules.rules if r.needs_model]})")
        extra = rules.event_fields - {"event_type", "amount"}
        if extra:
            raise ValueError(f"{source}: the rules view reads featuriser signals, event_type and amount only, "
                             f"not {sorted(extra)} (a deferred model step keeps nothing else)")
        return cls(rules, text, np.asarray(type_names, dtype=object), [])

    def _inputs(self, feats: np.ndarray, type_ids: np.ndarray) -> RuleInputs:
        t = np.clip(np.asarray(type_ids, np.int64), 0, len(self.type_names) - 1)
        return RuleInputs.from_types(self.type_names[t], np.asarray(feats))

    def hits(self, feats: np.ndarray, type_ids: np.ndarray):
        """RuleOutcome of the pack on rows (type ids of the model's vocabulary, featuriser rows)."""
        return self.rules.evaluate(self._inputs(feats, type_ids))

    def score(self, feats: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        """The ranked rule score per row (seqguard.rules.ranked_score): what the hand rules baseline ranks by."""
        return ranked_score(self.rules.summed_score(self._inputs(feats, type_ids)), feats)

    def tail(self, k: int, score: np.ndarray) -> np.ndarray:
        """The view's tail in type group k: -log P(training score >= score) where rules added evidence
        (a summed rule score above the tie-break), 0 where none did. A rules engine flags nothing
        when no rule fires; read as rarity, the tie-break alone would spend the view's share of the
        false-positive budget on velocity noise (in a log where no rule ever fires, on nothing else)."""
        score = np.asarray(score, np.float64)
        return np.where(score > TIE_BREAK, self.calibrators[k].tail(score), 0.0)

    def fit(self, score: np.ndarray, groups: np.ndarray, n_groups: int, keep: np.ndarray) -> "RulesView":
        """Calibrate per type group on the training events' scores (`keep`: rows the per-account cap keeps)."""
        kept = np.zeros(len(score), bool)
        kept[keep] = True
        self.calibrators = []
        for k in range(n_groups):
            rows = (groups == k) & kept
            self.calibrators.append(RiskCalibrator.fit(score[rows] if rows.any() else score))
        return self

    def to_arrays(self, prefix: str) -> dict:
        out = {f"{prefix}text": np.array(self.text), f"{prefix}type_names": np.array(list(self.type_names), str)}
        for k, c in enumerate(self.calibrators):
            out[f"{prefix}g{k}_levels"], out[f"{prefix}g{k}_quantiles"] = c.levels, c.quantiles
        return out

    @classmethod
    def from_arrays(cls, a, prefix: str, n_groups: int) -> "RulesView":
        view = cls.from_text(str(a[f"{prefix}text"]), [str(t) for t in a[f"{prefix}type_names"]])
        view.calibrators = [RiskCalibrator(a[f"{prefix}g{k}_levels"], a[f"{prefix}g{k}_quantiles"])
                            for k in range(n_groups)]
        return view
