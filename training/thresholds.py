"""Action thresholds from a config file (TOML or JSON): target false-positive rate per action.

Risk is the detector score's quantile among training events of the same group, so an action
whose target FPR on (unlabelled) training traffic is f fires at risk >= 1 - f. The same file
drives `seqguard train --thresholds` (stored in the artifact) and `seqguard evaluate
--thresholds` (precision / recall reported at those cut-offs without retraining).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from seqguard.detector import ACTIONS, DEFAULT_ACTION_FPR, action_thresholds


class ThresholdConfigError(ValueError):
    """A thresholds file that cannot be used; the message names the file and the key."""


def load_action_fpr(path: str) -> dict[str, float]:
    """{'REVIEW': f, 'CHALLENGE': f, 'BLOCK': f} from `path` (.toml or .json).

    Accepted layouts: a table/object `action_fpr` (or `target_fpr`) with the action names as
    keys (any case), or those keys at the top level. Missing actions keep the defaults.
    """
    p = Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ThresholdConfigError(f"{name}: cannot read ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib
            doc = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            raise ThresholdConfigError(f"{name}: expected a .toml or .json file")
    except ThresholdConfigError:
        raise
    except Exception as e:                           # tomllib.TOMLDecodeError / json.JSONDecodeError
        raise ThresholdConfigError(f"{name}: cannot parse ({e})") from None
    if not isinstance(doc, dict):
        raise ThresholdConfigError(f"{name}: must be a table/object")
    table = doc.get("action_fpr", doc.get("target_fpr", doc))
    if not isinstance(table, dict):
        raise ThresholdConfigError(f"{name}: 'action_fpr' must be a table/object")
    known = {a.upper() for a in ACTIONS[1:]}
    out = dict(DEFAULT_ACTION_FPR)
    for k, v in table.items():
        a = str(k).upper()
        if a not in known:
            raise ThresholdConfigError(f"{name}: unknown action {k!r} (expected one of {sorted(known)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < 1:
            raise ThresholdConfigError(f"{name}: {a} target FPR must be a number in (0, 1), got {v!r}")
        out[a] = float(v)
    try:
        action_thresholds(out)
    except ValueError as e:
        raise ThresholdConfigError(f"{name}: {e}") from None
    return out


def load_thresholds(path: str) -> dict[str, float]:
    """Risk cut-offs {'REVIEW', 'CHALLENGE', 'BLOCK'} for the FPR targets in `path`."""
    return action_thresholds(load_action_fpr(path))
