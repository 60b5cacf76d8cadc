"""`seqguard retrain`: train a candidate model on new events and compare it with the live one.

The new log is split by time: the earlier part trains the candidate (same `train` code path,
labels never used for fitting), the later part is a hold-out that BOTH models score. The report
says, per model: alert rate at each action threshold against its target FPR (unlabelled
traffic: a model whose alert rates drift far from target is miscalibrated for today's traffic),
and, when labels are given, ROC-AUC and recall at 1% FPR on all and payment events. The
candidate is recommended only if it is not worse; publishing stays a separate, explicit step
(`seqguard export` / the model repository's next version).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.schema import read_events

from .evaluate import _recall_at_fpr, _safe_auc, read_labels
from .train import TrainConfig, train

AUC_TOLERANCE = 0.005        # a candidate this much worse (ROC-AUC) is still "not worse": noise on small hold-outs


def split_by_time(events: list, holdout_frac: float) -> tuple[list, list]:
    """Earlier events train, the last `holdout_frac` of the time span (by event count) is held out."""
    if not 0 < holdout_frac < 1:
        raise ValueError(f"holdout_frac must be in (0, 1), got {holdout_frac}")
    ts = np.sort(np.array([e.ts for e in events], np.int64))
    cutoff = int(ts[int(len(ts) * (1 - holdout_frac))])
    fit = [e for e in events if e.ts < cutoff]
    hold = [e for e in events if e.ts >= cutoff]
    if not fit or not hold:
        raise ValueError("the log is too short to split into a training part and a hold-out")
    return fit, hold


def _write_jsonl(events, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps({k: v for k, v in e._asdict().items() if v is not None}, separators=(",", ":")) + "\n")


def model_summary(artifact: ModelArtifact, events: list, y: np.ndarray | None) -> dict:
    risk, actions, _ = score_events(artifact, events)
    thresholds = artifact.metadata.get("thresholds", {})
    targets = artifact.metadata.get("action_fpr", {})
    out = {"model_version": artifact.model_version, "events": len(events),
           "alert_rate": {a: float(np.mean(risk >= t)) for a, t in thresholds.items()},
           "target_fpr": targets, "risk_mean": float(risk.mean())}
    if y is not None:
        pay = np.array([e.event_type == "payment" for e in events])
        out["roc_auc"] = _safe_auc(y, risk)
        out["recall_at_1pct_fpr"] = _recall_at_fpr(y, risk, 0.01)["recall"]
        out["payment_roc_auc"] = _safe_auc(y[pay], risk[pay]) if pay.any() else None
    return out


def recommend(live: dict, cand: dict) -> tuple[bool, str]:
    if "roc_auc" in live and live["roc_auc"] is not None and cand.get("roc_auc") is not None:
        ok = cand["roc_auc"] >= live["roc_auc"] - AUC_TOLERANCE
        return ok, (f"labelled hold-out ROC-AUC {cand['roc_auc']:.4f} vs live {live['roc_auc']:.4f}"
                    + ("" if ok else f": candidate is worse by more than {AUC_TOLERANCE}"))

    def calib_err(m):                      # unlabelled: how far alert rates are from their targets
        return sum(abs(m["alert_rate"].get(a, 0.0) - f) for a, f in m["target_fpr"].items())
    ok = calib_err(cand) <= calib_err(live)
    return ok, (f"no labels: alert-rate error vs target FPRs {calib_err(cand):.4f} (candidate) vs "
                f"{calib_err(live):.4f} (live)")


def retrain(live_dir: str, events_path: str, out_dir: str, cfg: TrainConfig, labels_path: str | None = None,
            holdout_frac: float = 0.2, column_map: dict | None = None, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    live = ModelArtifact.load(live_dir)               # fail early if the live model is unusable
    events = list(read_events(events_path, column_map))
    fit, hold = split_by_time(events, holdout_frac)
    log(f"retrain: {len(fit)} events to train the candidate, {len(hold)} held out (the latest {holdout_frac:.0%})")
    with tempfile.TemporaryDirectory() as tmp:
        fit_path = Path(tmp) / "fit.jsonl"
        _write_jsonl(fit, fit_path)
        train(str(fit_path), out_dir, cfg, log=log)
    cand = ModelArtifact.load(out_dir)
    y = None
    if labels_path:
        labels = read_labels(labels_path)
        y = np.array([labels[e.event_id][0] if e.event_id in labels else 0 for e in hold], np.int64)
    report = {"live": model_summary(live, hold, y), "candidate": model_summary(cand, hold, y),
              "holdout_events": len(hold), "fit_events": len(fit), "labels": bool(labels_path)}
    ok, why = recommend(report["live"], report["candidate"])
    report["recommend_candidate"], report["reason"] = ok, why
    report["seconds"] = round(time.time() - t0, 1)
    Path(out_dir, "retrain_report.json").write_text(json.dumps(report, indent=2))
    Path(out_dir, "retrain_report.md").write_text(report_md(report))
    log(f"retrain: {'PROMOTE' if ok else 'KEEP LIVE'} - {why}")
    return report


def report_md(r: dict) -> str:
    rows = ["| | live | candidate |", "|---|---|---|"]
    rows.append(f"| model version | {r['live']['model_version']} | {r['candidate']['model_version']} |")
    for a in r["live"]["target_fpr"]:
        rows.append(f"| alert rate {a} (target {r['live']['target_fpr'][a]:.3%}) | "
                    f"{r['live']['alert_rate'].get(a, 0):.3%} | {r['candidate']['alert_rate'].get(a, 0):.3%} |")
    for k in ("roc_auc", "payment_roc_auc", "recall_at_1pct_fpr"):
        if k in r["live"]:
            f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            rows.append(f"| {k} | {f(r['live'][k])} | {f(r['candidate'][k])} |")
    verdict = "promote the candidate" if r["recommend_candidate"] else "keep the live model"
    return (f"# Retrain comparison\n\nCandidate trained on {r['fit_events']} events; both models scored the "
            f"{r['holdout_events']} latest events.\n\n" + "\n".join(rows) + f"\n\n**Recommendation: {verdict}** ({r['reason']}).\n")
