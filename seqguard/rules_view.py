"""The hand rules' own score as one calibrated view of the detector.

Why: on data no one here has generated, simple hand rules catch what the learned views miss
(rings spread over days, renamed event types that cut the named signals, a fleet that makes
up a large share of traffic), and the learned views catch what the rules miss. The view's
score is mapped to its tail among the unlabelled training events, -log(p), p the fraction of
them scoring at least as high, and the detector combines the views' tails by a weighted min-p
(Detector.combine_views): at any false-positive rate the combination flags what each view flags
at its share of that rate. No labels are used. One table over all events, not one per type
group: a pack's score is an analyst's severity on one scale for every event type, and a
payment whose type a team renamed out of the money group keeps the rank the rules give it.

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
    calibrator: RiskCalibrator | None     # ranked rule score -> tail, over all training events

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
        return cls(rules, text, np.asarray(type_names, dtype=object), None)

    def _inputs(self, feats: np.ndarray, type_ids: np.ndarray) -> RuleInputs:
        t = np.clip(np.asarray(type_ids, np.int64), 0, len(self.type_names) - 1)
        return RuleInputs.from_types(self.type_names[t], np.asarray(feats))

    def hits(self, feats: np.ndarray, type_ids: np.ndarray):
        """RuleOutcome of the pack on rows (type ids of the model's vocabulary, featuriser rows)."""
        return self.rules.evaluate(self._inputs(feats, type_ids))

    def score(self, feats: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
        """The ranked rule score per row (seqguard.rules.ranked_score): what the hand rules baseline ranks by."""
        return ranked_score(self.rules.summed_score(self._inputs(feats, type_ids)), feats)

    def tail(self, score: np.ndarray) -> np.ndarray:
        """-log P(training score >= score) where rules added evidence (a summed rule score above the
        tie-break), 0 where none did. A rules engine flags nothing when no rule fires; read as
        rarity, the tie-break alone would spend the view's share of the false-positive budget on
        velocity noise (in a log where no rule ever fires, on nothing else)."""
        score = np.asarray(score, np.float64)
        return np.where(score > TIE_BREAK, self.calibrator.tail(score), 0.0)

    def fit(self, score: np.ndarray) -> "RulesView":
        """Calibrate on the training events' scores (those the per-account cap keeps)."""
        self.calibrator = RiskCalibrator.fit(score)
        return self

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}text": np.array(self.text), f"{prefix}type_names": np.array(list(self.type_names), str),
                f"{prefix}cal_levels": self.calibrator.levels, f"{prefix}cal_quantiles": self.calibrator.quantiles}

    @classmethod
    def from_arrays(cls, a, prefix: str) -> "RulesView":
        view = cls.from_text(str(a[f"{prefix}text"]), [str(t) for t in a[f"{prefix}type_names"]])
        view.calibrator = RiskCalibrator(a[f"{prefix}cal_levels"], a[f"{prefix}cal_quantiles"])
        return view
