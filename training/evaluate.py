"""`seqguard evaluate`: the model against two baselines on a labelled log -> report.md, metrics.json, plots.

Labels are used ONLY here (the model and both baselines are unsupervised). Every scorer gets
the same metrics on the same events:

* ROC-AUC and PR-AUC (average precision), on all events and on payment attempts
  (payment, payment_failed, checkout);
* precision / recall / F1 at the model's CHALLENGE threshold; a baseline is cut where it flags
  the same fraction of label-0 events as the model does there (same false-positive budget);
* recall at 1% and 0.1% FPR, the cut-off set on the label-0 events of that subset;
* recall per attack family (and family x variant) at 1% FPR (all-events cut-off), and the
  share of each hard-negative kind flagged at that cut-off;
* user-level ROC-AUC (score of a user = max over its events; positive = any label-1 event);
* recall and precision at each action threshold (REVIEW / CHALLENGE / BLOCK), baselines
  again matched on the label-0 flag rate.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from seqguard.schema import Event

MODEL_KEY = "seqguard"
PAYMENT_ATTEMPTS = ("payment", "payment_failed", "checkout")
ACTION_NAMES = ("REVIEW", "CHALLENGE", "BLOCK")
FPR_LEVELS = (0.01, 0.001)
SCORER_LABELS = {
    "seqguard": "seqguard (LSTM + IForest)",
    "seqguard_event_only": "seqguard, each event alone (no session stage)",
    "hand_rules": "hand rules",
    "user_agg_iforest": "user aggregates + IForest",
    "rules": "rules file (--rules): its action, then its score",
    "seqguard_with_rules": "seqguard + rules (the gateway's final action, then risk)",
}


class LabelError(ValueError):
    """A labels file that cannot be used: names the file and line."""


# --------------------------------------------------------------------------- labels

def read_labels(path: str) -> dict[str, tuple[int, str, str]]:
    """event_id -> (label, family, variant); raises LabelError naming the line of a bad row."""
    import gzip
    opener = gzip.open if str(path).endswith(".gz") else open
    out: dict[str, tuple[int, str, str]] = {}
    name = os.path.basename(str(path))
    with opener(path, "rt", encoding="utf-8") as f:
        for ln, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelError(f"{name}: line {ln}: invalid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise LabelError(f"{name}: line {ln}: must be a JSON object")
            eid = r.get("event_id")
            if eid is None or eid == "" or isinstance(eid, bool) or not isinstance(eid, (str, int)):
                raise LabelError(f"{name}: line {ln}: field 'event_id' is required (a string)")
            lab = r.get("label")
            if isinstance(lab, bool) or lab not in (0, 1):
                raise LabelError(f"{name}: line {ln}: field 'label' must be 0 or 1, got {lab!r}")
            fam = r.get("family") or ("attack" if lab == 1 else "normal")
            var = r.get("variant") or ""
            if not isinstance(fam, str) or not isinstance(var, str):
                raise LabelError(f"{name}: line {ln}: fields 'family' and 'variant' must be strings")
            out[str(eid)] = (int(lab), fam, var)
    if not out:
        raise LabelError(f"{name}: no label rows")
    return out


def align_labels(events: Sequence[Event], labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, family, variant) arrays aligned with `events`.

    `labels` is either a mapping event_id -> (label, family, variant) / label dict, or a
    sequence of label dicts (or (label, family, variant) tuples) already aligned with events.
    Events without a label are an error that says how many.
    """
    n = len(events)
    y = np.zeros(n, np.int8)
    fam = np.empty(n, dtype=object)
    var = np.empty(n, dtype=object)

    def unpack(r):
        if isinstance(r, Mapping):
            lab = int(r["label"])
            return lab, r.get("family") or ("attack" if lab else "normal"), r.get("variant") or ""
        return int(r[0]), r[1], r[2]

    if isinstance(labels, Mapping):
        missing = []
        for i, e in enumerate(events):
            r = labels.get(e.event_id)
            if r is None:
                missing.append(e.event_id)
                continue
            y[i], fam[i], var[i] = unpack(r)
        if missing:
            raise LabelError(f"{len(missing)} of {n} events have no label line "
                             f"(e.g. event_id {', '.join(map(repr, missing[:3]))})")
    else:
        if len(labels) != n:
            raise LabelError(f"{n} events but {len(labels)} label rows")
        for i, r in enumerate(labels):
            y[i], fam[i], var[i] = unpack(r)
    return y, fam, var


# --------------------------------------------------------------------------- metric helpers

def threshold_at_fpr(neg_scores: np.ndarray, fpr: float) -> float:
    """Lowest cut-off t with mean(neg >= t) <= fpr (ties never push the FPR above target)."""
    s = np.sort(np.asarray(neg_scores, np.float64))
    n = len(s)
    if n == 0:
        return math.inf
    k = int(math.floor(fpr * n + 1e-9))              # negatives we may flag
    if k <= 0:
        return float(np.nextafter(s[-1], math.inf))
    if k >= n:
        return float(s[0])
    t = s[n - k]
    if n - np.searchsorted(s, t, side="left") > k:   # ties at t: move to the next distinct value
        j = np.searchsorted(s, t, side="right")
        t = s[j] if j < n else np.nextafter(s[-1], math.inf)
    return float(t)


def _safe_auc(y, s) -> float | None:
    from sklearn.metrics import roc_auc_score
    if len(y) == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def _safe_ap(y, s) -> float | None:
    from sklearn.metrics import average_precision_score
    if len(y) == 0 or y.max() == 0:
        return None
    return float(average_precision_score(y, s))


def _prf(y: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / pos if pos else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else (0.0 if prec is not None and rec is not None else None)
    return {"flagged": int(flagged.sum()), "tp": tp, "fp": fp, "precision": prec, "recall": rec, "f1": f1,
            "fpr": fp / neg if neg else None}


def _recall_at_fpr(y, s, fpr) -> dict:
    neg = s[y == 0]
    t = threshold_at_fpr(neg, fpr)
    flagged = s >= t
    return {"threshold": t, **_prf(y, flagged)}


def _matched_threshold(neg_scores: np.ndarray, flag_rate: float) -> float:
    """Cut-off on a baseline that flags (at most) `flag_rate` of the label-0 events."""
    return threshold_at_fpr(neg_scores, flag_rate)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------- evaluation

def evaluate(events: Sequence[Event], labels, scores: dict[str, np.ndarray], threshold_risk,
             report_dir, *, model_version: str | None = None, info: dict | None = None,
             plots: bool = True, progress: bool = True, quiet: bool = False) -> dict:
    """Compute all metrics for every scorer, write report.md + metrics.json + plots, return metrics.

    scores: name -> per-event score (higher = riskier) in the order of `events`; the FIRST
    entry is the model, whose raw risk is compared with the action thresholds.
    threshold_risk: the detector's thresholds {"REVIEW", "CHALLENGE", "BLOCK"} (risk >= t), or a
    single float taken as the CHALLENGE threshold.
    labels: see `align_labels`. The summary table goes to stdout unless `quiet`.
    """
    from tqdm import tqdm
    t0 = time.time()
    if not scores:
        raise ValueError("no scores to evaluate")
    if isinstance(threshold_risk, Mapping):
        thresholds = {a: float(threshold_risk[a]) for a in ACTION_NAMES if a in threshold_risk}
    else:
        thresholds = {"CHALLENGE": float(threshold_risk)}
    if "CHALLENGE" not in thresholds:
        raise ValueError("threshold_risk must give the CHALLENGE threshold")
    n = len(events)
    y, family, variant = align_labels(events, labels)
    names = list(scores)
    model_name = names[0]
    S = {}
    for k in names:
        s = np.asarray(scores[k], np.float64)
        if s.shape != (n,):
            raise ValueError(f"scores[{k!r}] has shape {s.shape}, expected ({n},)")
        if not np.isfinite(s).all():
            raise ValueError(f"scores[{k!r}] has {int((~np.isfinite(s)).sum())} non-finite values")
        S[k] = s
    et = np.array([e.event_type for e in events], dtype=object)
    pay = np.isin(et, PAYMENT_ATTEMPTS)
    user_codes, user_idx = np.unique(np.array([e.user_id for e in events], dtype=object).astype(str),
                                     return_inverse=True)
    n_users = len(user_codes)
    user_y = np.zeros(n_users, np.int8)
    np.maximum.at(user_y, user_idx, y)

    attack_fams = sorted({f for f in family[y == 1]})
    neg_fams = sorted({f for f in family[y == 0]})
    fam_var = sorted({(f, v) for f, v in zip(family[y == 1], variant[y == 1])})
    subsets = {"all": np.ones(n, bool), "payments": pay}

    # flag rates of the model at each action threshold on label-0 events: the baselines get the same budget
    ms = S[model_name]
    neg0 = ms[y == 0]
    model_flag_rate = {a: float(np.mean(neg0 >= t)) if len(neg0) else 0.0 for a, t in thresholds.items()}

    metrics: dict = {
        "model": model_name, "model_version": model_version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {"events": n, "users": n_users, "label1_events": int(y.sum()), "label0_events": int(n - y.sum()),
                 "payment_attempt_events": int(pay.sum()), "label1_payment_attempts": int(y[pay].sum()),
                 "positive_users": int(user_y.sum()),
                 "events_per_family": {f: int(np.sum(family == f)) for f in sorted(set(family))},
                 "users_per_family": {f: int(len(np.unique(user_idx[family == f]))) for f in sorted(set(family))},
                 "attack_events_per_family_variant": {f"{f}/{v or '-'}": int(np.sum((family == f) & (variant == v) & (y == 1)))
                                                      for f, v in fam_var},
                 **(info or {})},
        "thresholds": {"model_risk": thresholds, "model_label0_flag_rate": model_flag_rate},
        "payment_event_types": list(PAYMENT_ATTEMPTS),
        "scorers": {},
    }

    it = tqdm(names, desc="metrics", unit="scorer", leave=False, disable=not progress)
    for k in it:
        s = S[k]
        m: dict = {}
        for sub, mask in subsets.items():
            ys, ss = y[mask], s[mask]
            m[sub] = {"events": int(mask.sum()), "positives": int(ys.sum()),
                      "roc_auc": _safe_auc(ys, ss), "pr_auc": _safe_ap(ys, ss),
                      "at_fpr": {str(f): _recall_at_fpr(ys, ss, f) for f in FPR_LEVELS}}
        # action thresholds: the model's own, or a matched label-0 flag rate for baselines
        actions = {}
        for a, t in thresholds.items():
            cut = t if k == model_name else _matched_threshold(s[y == 0], model_flag_rate[a])
            actions[a] = {"threshold": cut, **_prf(y, s >= cut)}
        m["actions"] = actions
        m["challenge"] = actions["CHALLENGE"]
        # per family at 1% FPR (all-events cut-off)
        t1 = m["all"]["at_fpr"]["0.01"]["threshold"]
        flagged = s >= t1
        m["family_recall_at_1pct_fpr"] = {f: float(flagged[(family == f) & (y == 1)].mean()) for f in attack_fams}
        m["family_variant_recall_at_1pct_fpr"] = {
            f"{f}/{v or '-'}": float(flagged[(family == f) & (variant == v) & (y == 1)].mean()) for f, v in fam_var}
        m["negative_kind_flag_rate_at_1pct_fpr"] = {f: float(flagged[(family == f) & (y == 0)].mean()) for f in neg_fams}
        # user level
        umax = np.full(n_users, -np.inf)
        np.maximum.at(umax, user_idx, s)
        m["user"] = {"users": n_users, "positive_users": int(user_y.sum()), "roc_auc": _safe_auc(user_y, umax),
                     "pr_auc": _safe_ap(user_y, umax),
                     "at_fpr": {"0.01": _recall_at_fpr(user_y, umax, 0.01)}}
        metrics["scorers"][k] = m

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        metrics["plots"] = _plots(report_dir, S, names, y, pay, family, variant, thresholds, metrics,
                                  progress=progress)
    metrics["baseline_wins"] = baseline_wins(metrics)
    metrics["seconds"] = round(time.time() - t0, 2)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    summary = summary_table(metrics)
    (report_dir / "report.md").write_text(_report_md(metrics, summary))
    if not quiet:
        print(summary)
        print(f"\nreport: {report_dir / 'report.md'}")
    return metrics


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)


def _label(k: str) -> str:
    return SCORER_LABELS.get(k, k)


def baseline_wins(metrics: dict, min_gap: float = 0.0005) -> list[dict]:
    """Every attack family and family/variant where another scorer recalls more than the model at
    the 1%-FPR cut-off: the rows a reader should look at first, and the first thing a claim of
    "beats the baselines per family" has to survive. Gaps under `min_gap` (invisible at the
    report's three decimals) are left out."""
    model = metrics["model"]
    out = []
    for level, key in (("family", "family_recall_at_1pct_fpr"), ("variant", "family_variant_recall_at_1pct_fpr")):
        for name, mine in metrics["scorers"][model][key].items():
            for k, sc in metrics["scorers"].items():
                theirs = sc[key].get(name)
                if k != model and theirs is not None and mine is not None and theirs > mine + min_gap:  # NaN: never
                    out.append({"level": level, "name": name, "scorer": k, "recall": theirs, "model_recall": mine})
    return out


def summary_table(metrics: dict) -> str:
    """Markdown table: one row per scorer."""
    head = ("| scorer | ROC-AUC | PR-AUC | ROC-AUC pay | PR-AUC pay | R@1%FPR | R@0.1%FPR | R@1%FPR pay "
            "| R@0.1%FPR pay | P@CHAL | R@CHAL | F1@CHAL | user ROC-AUC |")
    rows = [head, "|" + "|".join(["---"] + ["---:"] * 12) + "|"]
    for k, m in metrics["scorers"].items():
        a, p, c = m["all"], m["payments"], m["challenge"]
        rows.append("| " + " | ".join([
            _label(k), _fmt(a["roc_auc"]), _fmt(a["pr_auc"]), _fmt(p["roc_auc"]), _fmt(p["pr_auc"]),
            _fmt(a["at_fpr"]["0.01"]["recall"]), _fmt(a["at_fpr"]["0.001"]["recall"]),
            _fmt(p["at_fpr"]["0.01"]["recall"]), _fmt(p["at_fpr"]["0.001"]["recall"]),
            _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), _fmt(m["user"]["roc_auc"])]) + " |")
    return "\n".join(rows)


def _report_md(metrics: dict, summary: str) -> str:
    d = metrics["data"]
    names = list(metrics["scorers"])
    model = metrics["model"]
    L = [f"# seqguard evaluation report", "",
         f"- model: `{model}` version **{metrics.get('model_version') or 'n/a'}**",
         f"- created: {metrics['created']}",
         f"- events: {d['events']:,} ({d['label1_events']:,} label 1 = {100 * d['label1_events'] / max(d['events'], 1):.2f}%), "
         f"users: {d['users']:,} ({d['positive_users']:,} with any label-1 event), "
         f"payment attempts: {d['payment_attempt_events']:,} ({d['label1_payment_attempts']:,} label 1)"]
    for key in ("events_file", "labels_file", "model_dir", "training_events", "training_users",
                "thresholds_file", "thresholds_target_fpr", "timings_s"):
        if key in d:
            v = d[key]
            if isinstance(v, dict):
                v = ", ".join(f"{k} {x}" for k, x in v.items())
            L.append(f"- {key.replace('_', ' ')}: {v}")
    L += ["", "## Summary", "", summary, "",
          "R@x%FPR: recall at the cut-off flagging x% of the label-0 events (of that subset); "
          "pay: payment attempts only; P/R/F1@CHAL: at the model's CHALLENGE threshold, baselines at the "
          "cut-off with the same label-0 flag rate; user ROC-AUC: max score per user.", ""]

    # per family
    L += ["## Recall per attack family at 1% FPR (all-events cut-off)", "",
          "| family | events | users | " + " | ".join(_label(k) for k in names) + " |",
          "|---|---:|---:|" + "---:|" * len(names)]
    fams = list(metrics["scorers"][model]["family_recall_at_1pct_fpr"])
    counts, ucounts = d["events_per_family"], d.get("users_per_family", {})
    for f in fams:
        L.append(f"| {f} | {counts.get(f, 0):,} | {ucounts.get(f, 0):,} | " + " | ".join(
            _fmt(metrics["scorers"][k]["family_recall_at_1pct_fpr"][f]) for k in names) + " |")
    L += ["", "### family x variant", "",
          "| family / variant | events | " + " | ".join(_label(k) for k in names) + " |",
          "|---|---:|" + "---:|" * len(names)]
    fv_counts = d["attack_events_per_family_variant"]
    for fv in metrics["scorers"][model]["family_variant_recall_at_1pct_fpr"]:
        L.append(f"| {fv} | {fv_counts.get(fv, 0):,} | " + " | ".join(
            _fmt(metrics["scorers"][k]["family_variant_recall_at_1pct_fpr"][fv]) for k in names) + " |")
    wins = metrics.get("baseline_wins", [])
    L += ["", "### Where another scorer recalls more than the model", ""]
    if wins:
        L += ["| level | family / variant | scorer | its recall | model's recall |", "|---|---|---|---:|---:|"]
        L += [f"| {w['level']} | {w['name']} | {_label(w['scorer'])} | {_fmt(w['recall'])} | {_fmt(w['model_recall'])} |"
              for w in wins]
    else:
        L.append("None: the model's recall at the 1% FPR cut-off is the highest in every family and variant.")
    L += ["", "### label-0 kinds: share flagged at the same cut-off (lower is better)", "",
          "| kind | events | users | " + " | ".join(_label(k) for k in names) + " |",
          "|---|---:|---:|" + "---:|" * len(names)]
    for f in metrics["scorers"][model]["negative_kind_flag_rate_at_1pct_fpr"]:
        L.append(f"| {f} | {counts.get(f, 0):,} | {ucounts.get(f, 0):,} | " + " | ".join(
            _pct(metrics["scorers"][k]["negative_kind_flag_rate_at_1pct_fpr"][f]) for k in names) + " |")

    # thresholds
    th = metrics["thresholds"]
    L += ["", "## Action thresholds", "",
          "Model: risk >= threshold (risk is the calibrated training-score CDF). Baselines: the cut-off "
          "flagging the same share of label-0 events as the model at that action.", "",
          "| action | scorer | threshold | label-0 flag rate | flagged | precision | recall | F1 |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in th["model_risk"]:
        for k in names:
            r = metrics["scorers"][k]["actions"][a]
            L.append(f"| {a} | {_label(k)} | {r['threshold']:.6g} | {_pct(r['fpr'])} | {r['flagged']:,} | "
                     f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} |")
    L += ["", "## Fixed-FPR cut-offs", "",
          "| scorer | subset | FPR target | threshold | actual FPR | recall | precision |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for k in names:
        for sub in ("all", "payments"):
            for f, r in metrics["scorers"][k][sub]["at_fpr"].items():
                L.append(f"| {_label(k)} | {sub} | {float(f):.1%} | {r['threshold']:.6g} | {_pct(r['fpr'])} | "
                         f"{_fmt(r['recall'])} | {_fmt(r['precision'])} |")

    if metrics.get("plots"):
        L += ["", "## Plots", ""]
        for title, fname in metrics["plots"].items():
            L.append(f"![{title}]({fname})")
            L.append("")

    L += ["", "## How the numbers were computed", "",
          "- Every scorer scores every event right after it happens (risk after event *i* uses events up to and "
          "including *i*); scores are compared with the per-event labels of the generator / analyst.",
          "- **seqguard**: `seqguard.batch.score_events` (shared featuriser replayed in global time order, the "
          "exported ONNX step encoder, the calibrated views (forests, next-type surprise, the rules pack saved with the model) combined by a weighted min-p, then the session stage: at least the running average of the user's earlier event anomalies) - the same numbers the online gateway serves. **seqguard_view_forests / _sequence / _rules**: each view of the same model alone (its stage-1 tail among training events): what each contributes.",
          "- **hand rules** (`training.baselines.hand_rules_score`): the summed score of the shipped rules pack "
          "(configs/rules/default.toml, `seqguard.rules`): hand-written rule hits "
          "(velocity, new device / country, failure bursts, account change before payment, amount vs the user's "
          "history, many accounts per device / IP, ...) over the shared featuriser's outputs; weights hand-chosen, "
          "not fitted.",
          "- **user aggregates + IForest** (`training.baselines.user_aggregate_iforest_score`): per-user cumulative "
          "aggregates up to each event (events, distinct devices / countries / IPs / prefixes, failure ratio, "
          "payments, mean / max amount, events per hour, ...) plus distinct users per device / IP so far; "
          "IsolationForest fitted unsupervised on the evaluated log itself (it has seen this log, the model has not).",
          "- ROC-AUC: `sklearn.metrics.roc_auc_score`; PR-AUC: average precision. Payment attempts = event types "
          f"{', '.join(PAYMENT_ATTEMPTS)}.",
          "- Recall at x% FPR: the cut-off is the lowest score t with (label-0 events scoring >= t) <= x% of the "
          "label-0 events of the subset; ties are never split, so the actual FPR can be below target.",
          "- CHALLENGE / action rows: the model flags risk >= its threshold; a baseline is cut where it flags the same "
          "share of label-0 events, so precision/recall compare at an equal false-positive budget.",
          "- Per-family recall: share of that family's label-1 events at or above the all-events 1% FPR cut-off; "
          "label-0 kinds: share of those events above the same cut-off.",
          "- User level: a user's score is the max over its events; a user is positive if any of its events is label 1.",
          "- Few attacking users make a family's recall coarse (the `users` column): one missed bot is a whole row.",
          "- A rule score is coarse (many ties); cut-offs never split a tie, so a baseline row can flag fewer "
          "label-0 events than its target (the `label-0 flag rate` column shows the actual share).",
          ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- plots

def _plots(report_dir: Path, S, names, y, pay, family, variant, thresholds, metrics, progress=True) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve
    from tqdm import tqdm

    files: dict[str, str] = {}
    steps = tqdm(total=4, desc="plots", unit="plot", leave=False, disable=not progress)

    def _subsample_curve(a, b, k=4000):
        if len(a) <= k:
            return a, b
        idx = np.unique(np.linspace(0, len(a) - 1, k).astype(int))
        return a[idx], b[idx]

    # ROC (log-x so the operating region 0.1%..5% FPR is visible)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (sub, mask) in zip(axes, (("all events", np.ones(len(y), bool)), ("payment attempts", pay))):
        ys = y[mask]
        if len(ys) and ys.min() != ys.max():
            for k in names:
                fpr, tpr, _ = roc_curve(ys, S[k][mask])
                fpr, tpr = _subsample_curve(fpr, tpr)
                auc = metrics["scorers"][k]["all" if sub == "all events" else "payments"]["roc_auc"]
                ax.plot(np.maximum(fpr, 1e-5), tpr, label=f"{_label(k)} (AUC {_fmt(auc)})")
        for f in FPR_LEVELS:
            ax.axvline(f, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_xlabel("false-positive rate (log)")
        ax.set_ylabel("recall (TPR)")
        ax.set_title(f"ROC - {sub}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "roc.png", dpi=110)
    plt.close(fig)
    files["ROC curves"] = "roc.png"
    steps.update()

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (sub, mask) in zip(axes, (("all events", np.ones(len(y), bool)), ("payment attempts", pay))):
        ys = y[mask]
        if len(ys) and ys.max() > 0:
            for k in names:
                prec, rec, _ = precision_recall_curve(ys, S[k][mask])
                rec, prec = _subsample_curve(rec, prec)
                ap = metrics["scorers"][k]["all" if sub == "all events" else "payments"]["pr_auc"]
                ax.plot(rec, prec, label=f"{_label(k)} (AP {_fmt(ap)})")
            ax.axhline(ys.mean(), color="grey", lw=0.6, ls=":", label=f"base rate {ys.mean():.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"precision-recall - {sub}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "pr.png", dpi=110)
    plt.close(fig)
    files["Precision-recall curves"] = "pr.png"
    steps.update()

    # model risk per family (log y). Risk is a CDF: plot -log10(1 - risk) so the top 1% is visible
    model = names[0]
    s = S[model]
    tail = bool(s.min() >= 0.0 and s.max() <= 1.0)
    if tail:
        def xf(v):
            return -np.log10(np.maximum(1.0 - np.asarray(v, np.float64), 1e-5))
        xlabel = "-log10(1 - risk)   (2 = top 1%, 3 = top 0.1%)"
    else:
        def xf(v):
            return np.asarray(v, np.float64)
        xlabel = "score"
    x_all = xf(s)
    fams = [f for f in sorted(set(family[y == 1]))] + ["normal"] + sorted(set(family[y == 0]) - {"normal"})
    ncol = 4
    nrow = int(math.ceil(len(fams) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.6 * nrow), squeeze=False)
    lo, hi = float(x_all.min()), float(x_all.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    for ax, f in zip(axes.flat, fams):
        mask = family == f
        is_attack = bool(np.any(y[mask] == 1))
        counts, _ = np.histogram(x_all[mask], bins=bins)
        ax.stairs(counts, bins, fill=True, color="tab:red" if is_attack else "tab:blue", alpha=0.8)
        ax.set_yscale("log")
        ax.set_ylim(0.8, max(2.0, counts.max() * 1.5))
        for a, t in thresholds.items():
            ax.axvline(float(xf(t)), color="k", lw=0.7, ls="--" if a == "CHALLENGE" else ":")
        ax.set_title(f"{f} ({'attack' if is_attack else 'label 0'}, n={int(mask.sum())})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(f"{_label(model)} risk per family (log count; dashed = CHALLENGE, dotted = REVIEW / BLOCK)")
    # fixed margins: tight_layout on a grid of log axes costs seconds
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.08 if nrow < 3 else 0.05, top=0.93, hspace=0.45, wspace=0.2)
    fig.savefig(report_dir / "risk_by_family.png", dpi=100)
    plt.close(fig)
    files["Model risk per family"] = "risk_by_family.png"
    steps.update()

    # per-family recall bars at 1% FPR
    attack = list(metrics["scorers"][model]["family_recall_at_1pct_fpr"])
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(attack) + 2), 4.5))
    w = 0.8 / max(len(names), 1)
    x = np.arange(len(attack))
    for j, k in enumerate(names):
        vals = [metrics["scorers"][k]["family_recall_at_1pct_fpr"][f] for f in attack]
        ax.bar(x + (j - (len(names) - 1) / 2) * w, vals, width=w, label=_label(k))
    ax.set_xticks(x)
    ax.set_xticklabels(attack, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall at 1% FPR")
    ax.set_title("recall per attack family at 1% FPR (all events)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "family_recall.png", dpi=110)
    plt.close(fig)
    files["Recall per family"] = "family_recall.png"
    steps.update()
    steps.close()
    return files


# --------------------------------------------------------------------------- CLI entry

VIEW_PREFIX = "seqguard_view_"     # scorer names of the detector's views alone (view_scores)


def main_evaluate(args) -> int:
    """`seqguard evaluate --events E --labels L --model DIR --report OUT`."""
    from tqdm import tqdm
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import score_events
    from seqguard.schema import ReadReport, parse_column_map, read_events
    from .baselines import hand_rules_score, user_aggregate_iforest_score

    timings: dict[str, float] = {}
    t = time.time()
    model = ModelArtifact.load(args.model)
    labels = read_labels(args.labels)                 # first: a malformed label fails fast
    rules = None
    if getattr(args, "rules", None):
        from seqguard.rules import load_rules
        rules = load_rules(args.rules)                # and so does a malformed rules file
    if getattr(args, "thresholds", None):
        from .thresholds import load_action_fpr
        load_action_fpr(args.thresholds)              # and so does a malformed thresholds file
    report = ReadReport()
    events = list(tqdm(read_events(args.events, parse_column_map(getattr(args, "column_map", None)),
                                   getattr(args, "on_bad_row", "error"), report),
                       desc=f"read {os.path.basename(args.events)}", unit="ev", mininterval=1.0, leave=False))
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not events:
        raise ValueError(f"{args.events}: no valid events to evaluate")
    y, family, variant = align_labels(events, labels)
    timings["read"] = time.time() - t

    t = time.time()
    risk, _, enc = score_events(model, events, progress=True)
    timings["score_model"] = time.time() - t
    feats_in = np.empty_like(enc.feats)
    feats_in[enc.order] = enc.feats
    event_only = None
    if model.detector.has_session:     # the same model with its session stage off: what the stage adds here
        from seqguard.batch import stage1_scores
        event_only = np.empty(len(events), np.float64)
        event_only[enc.order] = stage1_scores(model.detector, enc.emb, enc.surprise, enc.feats, enc.type_ids)
    views = view_scores(model.detector, enc)

    t = time.time()
    hand = hand_rules_score(events, feats_in)
    timings["hand_rules"] = time.time() - t
    t = time.time()
    seed = int(model.metadata.get("training", {}).get("config", {}).get("seed", 0))
    agg = user_aggregate_iforest_score(events, seed=seed)
    timings["user_agg_iforest"] = time.time() - t

    rule_scores, rule_outcome = {}, None
    if rules is not None:
        t = time.time()
        rule_scores, rule_outcome = _rules_scores(model, events, enc, risk, rules)
        timings["rules"] = time.time() - t

    tr = model.metadata.get("training", {})
    info = {"events_file": os.path.abspath(args.events), "labels_file": os.path.abspath(args.labels),
            "model_dir": os.path.abspath(args.model), "training_events": tr.get("events"),
            "training_users": tr.get("users"), "skipped_rows": report.skipped or {}}
    t = time.time()
    labels_aligned = list(zip(y.tolist(), family.tolist(), variant.tolist()))
    scores = {MODEL_KEY: risk, **({"seqguard_event_only": event_only} if event_only is not None else {}),
              **views, "hand_rules": hand, "user_agg_iforest": agg, **rule_scores}
    timings_view = {k: round(v, 2) for k, v in timings.items()}
    info["timings_s"] = timings_view
    thresholds = model.detector.thresholds
    if getattr(args, "thresholds", None):
        from .thresholds import load_action_fpr
        from seqguard.detector import action_thresholds
        fpr = load_action_fpr(args.thresholds)
        thresholds = action_thresholds(fpr)
        info["thresholds_file"] = os.path.abspath(args.thresholds)
        info["thresholds_target_fpr"] = fpr
    metrics = evaluate(events, labels_aligned, scores, thresholds, args.report,
                       model_version=model.model_version, info=info)
    if rule_outcome is not None:
        _append_rules_section(metrics, args.report, rules, rule_outcome, events, y, model.detector.action_codes(risk))
    timings_view["evaluate_and_report"] = round(time.time() - t, 2)
    # rewrite metrics.json with the final timing (report.md shows the scoring timings)
    Path(args.report, "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings_view.items()), file=sys.stderr)
    return 0


def view_scores(det, enc, chunk: int = 8192) -> dict[str, np.ndarray]:
    """Each view of the detector on its own (its stage-1 tail, INPUT order), scored as if it were the
    model: what each view contributes next to their combination. Empty without views."""
    if not det.has_views:
        return {}
    out: dict[str, np.ndarray] = {}
    for a in range(0, len(enc.type_ids), chunk):
        sl = slice(a, a + chunk)
        X = det.inputs(enc.emb[sl], enc.surprise[sl], enc.feats[sl], enc.type_ids[sl])
        for view, t in det.view_tails(X, enc.type_ids[sl]).items():
            out.setdefault(f"{VIEW_PREFIX}{view}", np.empty(len(enc.type_ids), np.float64))[enc.order[sl]] = t
    return out


# --------------------------------------------------------------------------- --rules

def _rules_scores(model, events, enc, risk, rules) -> tuple[dict, object]:
    """The rules file as two scorers: the rules alone (their action, ties broken by their score)
    and the combination the gateway answers (the final action, ties broken by the model's risk)."""
    from seqguard.batch import rule_inputs_from_encoded
    outcome = rules.evaluate(rule_inputs_from_encoded(model, events, enc, risk, rules),
                             model.detector.action_codes(risk))
    # both tie-breaks stay inside [0, 1): they never move an event across an action level
    alone = outcome.rule_action + 0.5 + 0.49 * np.tanh(outcome.score / 10.0)
    combined = outcome.action + 0.999 * np.clip(risk, 0.0, 1.0)
    return {"rules": alone.astype(np.float64), "seqguard_with_rules": combined.astype(np.float64)}, outcome


def _append_rules_section(metrics: dict, report_dir, rules, outcome, events, y, model_action) -> None:
    """report.md gets the backtest view (per action: model, rules, combination; per rule: hits,
    precision, recall); metrics.json gets the same numbers under "rules"."""
    from .backtest import LogView, _pack_table, _rule_table, pack_stats, rule_stats
    v = LogView.build(events, y, model_action)
    file = {"source": rules.source, "version": rules.version_tag, "rules": rule_stats(rules, outcome, v),
            "pack": pack_stats(outcome, v)}
    metrics["rules"] = file
    L = ["", f"## Rules: `{rules.source}` ({rules.version_tag})", "",
         "Per action: the model alone (risk >= its threshold), the rules alone (minimum actions and score "
         "thresholds) and their combination, the gateway's final action (the stronger of the two).", ""]
    L += _pack_table([file], True, True) + ["", "### Per rule", ""] + _rule_table(file, True, True) + [""]
    path = Path(report_dir)
    (path / "report.md").write_text((path / "report.md").read_text() + "\n".join(L))
