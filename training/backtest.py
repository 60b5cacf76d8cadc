"""`seqguard backtest`: how a rules file would have behaved on a past event log.

Per rule: hits, hits per day, the share of users hit, the overlap with the model's alerts (with
--model: of the rule's hits, how many the model alerted on anyway, and how many only the rule
caught), precision / recall with labels; then the pack as a whole (the rules' own action, the
model's, and the combination the gateway would answer), and with --compare a second rules file
side by side. Written as backtest.md + backtest.json.

Without --model the log is only featurised (the rules that read risk or a model reason code are
listed as not evaluated); the featuriser and the rules are the same code the gateway runs.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqguard.detector import ACTIONS
from seqguard.featurizer import DAY_MS
from seqguard.rules import RuleInputs, RuleOutcome, RuleSet, load_rules
from seqguard.schema import Event

ALERT = ACTIONS.index("REVIEW")            # a model "alert": REVIEW or stronger


@dataclass
class LogView:
    """Per-event arrays every statistic needs, INPUT order."""
    day: np.ndarray            # day index since the log's first UTC day
    user: np.ndarray           # dense user index
    n_users: int
    n_days: int
    y: np.ndarray | None       # labels (1 = fraud), when given
    model_action: np.ndarray | None

    @classmethod
    def build(cls, events: list[Event], y=None, model_action=None) -> "LogView":
        ts = np.fromiter((e.ts for e in events), np.int64, len(events))
        day = ts // DAY_MS
        day = day - (day.min() if len(day) else 0)
        _, user = np.unique(np.array([e.user_id for e in events], dtype=object).astype(str), return_inverse=True)
        return cls(day, user, int(user.max()) + 1 if len(user) else 0, int(day.max()) + 1 if len(day) else 0,
                   None if y is None else np.asarray(y, np.int8), model_action)


def _ratio(a: int, b: int):
    return a / b if b else None


def mask_stats(m: np.ndarray, v: LogView) -> dict:
    """Hits of one boolean mask: per day, users, model overlap, precision / recall."""
    hits = int(m.sum())
    per_day = np.bincount(v.day[m], minlength=v.n_days) if v.n_days else np.zeros(0, np.int64)
    out = {"hits": hits, "hits_per_day": hits / max(v.n_days, 1), "max_hits_per_day": int(per_day.max(initial=0)),
           "daily_hits": per_day.tolist(), "users_hit": int(len(np.unique(v.user[m]))),
           "share_of_users_hit": _ratio(int(len(np.unique(v.user[m]))), v.n_users)}
    if v.model_action is not None:
        both = int((m & (v.model_action >= ALERT)).sum())
        out.update(model_alerts_overlap=both, overlap_share=_ratio(both, hits), only_rule=hits - both)
    if v.y is not None:
        tp, pos = int((m & (v.y == 1)).sum()), int((v.y == 1).sum())
        out.update(true_positives=tp, precision=_ratio(tp, hits), recall=_ratio(tp, pos))
    return out


def pack_stats(outcome: RuleOutcome, v: LogView) -> dict:
    """Per action level: the rules alone, the model alone and the combination (the gateway's answer)."""
    rows = {}
    for a in ACTIONS[1:]:
        code = ACTIONS.index(a)
        row = {"rules": mask_stats(outcome.rule_action >= code, v)}
        if v.model_action is not None:
            row["model"] = mask_stats(v.model_action >= code, v)
            row["combined"] = mask_stats(outcome.action >= code, v)
        rows[a] = row
    return rows


def rule_stats(rules: RuleSet, outcome: RuleOutcome, v: LogView) -> dict:
    return {r.name: {"description": r.description, "action": ACTIONS[r.action] if r.action else None,
                     "score": r.score, **mask_stats(outcome.hits[:, k], v)}
            for k, r in enumerate(rules.rules)}


def backtest_rules(rules: RuleSet, x: RuleInputs, v: LogView) -> dict:
    """Evaluate one rules file on prepared inputs; the rules that need a model the inputs lack are skipped."""
    skipped = []
    if x.risk is None and rules.needs_model:
        skipped = [r.name for r in rules.rules if r.needs_model]
        rules = rules.without_model()
    t = time.time()
    outcome = rules.evaluate(x, v.model_action)
    seconds = time.time() - t
    return {"source": rules.source, "version": rules.version_tag, "rules_evaluated": len(rules.rules),
            "skipped_need_model": skipped, "evaluate_seconds": round(seconds, 3),
            "evaluate_events_per_s": len(x) / max(seconds, 1e-9),
            "rules": rule_stats(rules, outcome, v), "pack": pack_stats(outcome, v)}


def prepare(events: list[Event], model_dir: str | None, progress: bool) -> tuple[RuleInputs, np.ndarray | None, str | None]:
    """RuleInputs for the log: featuriser only, or the full model replay with --model."""
    if model_dir is None:
        from seqguard.batch import featurize_for_rules
        return featurize_for_rules(events, progress=progress), None, None
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import model_rule_inputs
    model = ModelArtifact.load(model_dir)
    x, actions = model_rule_inputs(model, events, progress=progress)
    return x, actions, model.model_version


def run_backtest(events: list[Event], rules: RuleSet, *, y=None, model_dir: str | None = None,
                 compare: RuleSet | None = None, progress: bool = True) -> dict:
    t0, c0 = time.time(), time.process_time()
    x, model_action, model_version = prepare(events, model_dir, progress)
    t1, c1 = time.time(), time.process_time()
    v = LogView.build(events, y, model_action)
    report = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "events": len(events), "users": v.n_users, "days": v.n_days,
              "label1_events": None if y is None else int(v.y.sum()),
              "model_version": model_version,
              "model_alerts": None if model_action is None else int((model_action >= ALERT).sum()),
              "files": [backtest_rules(rules, x, v)]}
    if compare is not None:
        report["files"].append(backtest_rules(compare, x, v))
    t2, c2 = time.time(), time.process_time()
    report["timings_s"] = {"prepare": round(t1 - t0, 2), "rules_and_stats": round(t2 - t1, 2)}
    # CPU seconds of this process: on shared cores the wall clock also measures the neighbours
    report["cpu_s"] = {"prepare": round(c1 - c0, 2), "rules_and_stats": round(c2 - c1, 2)}
    report["events_per_s"] = {"prepare": len(events) / max(t1 - t0, 1e-9),
                              "rules_and_stats": len(events) / max(t2 - t1, 1e-9),
                              "total": len(events) / max(t2 - t0, 1e-9),
                              "total_per_cpu_s": len(events) / max(c2 - c0, 1e-9)}
    return report


# --------------------------------------------------------------------------- Markdown

def _f(x, digits=3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rule_table(file: dict, has_model: bool, has_labels: bool) -> list[str]:
    head = ["rule", "effect", "hits", "hits/day", "max/day", "users hit"]
    if has_model:
        head += ["model alerted too", "only the rule"]
    if has_labels:
        head += ["precision", "recall"]
    L = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, r in file["rules"].items():
        effect = " + ".join(x for x in (r["action"], f"score {r['score']:g}" if r["score"] else None) if x)
        row = [f"`{name}`", effect, _f(r["hits"]), _f(r["hits_per_day"], 1), _f(r["max_hits_per_day"]),
               _pct(r["share_of_users_hit"])]
        if has_model:
            row += [_pct(r["overlap_share"]), _f(r["only_rule"])]
        if has_labels:
            row += [_f(r["precision"]), _f(r["recall"])]
        L.append("| " + " | ".join(row) + " |")
    return L


def _pack_table(files: list[dict], has_model: bool, has_labels: bool) -> list[str]:
    head = ["action >=", "who", "flagged", "per day", "users"] + (["precision", "recall"] if has_labels else [])
    L = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for a in ACTIONS[1:]:
        whos = []
        if has_model:
            whos.append(("model", files[0]["pack"][a]["model"]))
        for k, f in enumerate(files):
            tag = f"`{os.path.basename(f['source'])}`" + (" (compare)" if k else "")
            whos.append((f"rules {tag}", f["pack"][a]["rules"]))
            if has_model:
                whos.append((f"model + rules {tag}", f["pack"][a]["combined"]))
        for who, s in whos:
            row = [a, who, _f(s["hits"]), _f(s["hits_per_day"], 1), _pct(s["share_of_users_hit"])]
            if has_labels:
                row += [_f(s["precision"]), _f(s["recall"])]
            L.append("| " + " | ".join(row) + " |")
    return L


def _compare_table(a: dict, b: dict, has_labels: bool) -> list[str]:
    names = list(dict.fromkeys([*a["rules"], *b["rules"]]))
    head = ["rule", "hits A", "hits B", "users A", "users B"] + (["precision A", "precision B", "recall A", "recall B"]
                                                                 if has_labels else [])
    L = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for n in names:
        ra, rb = a["rules"].get(n), b["rules"].get(n)
        g = lambda r, k, fmt=_f: "-" if r is None else fmt(r[k])  # noqa: E731
        row = [f"`{n}`", g(ra, "hits"), g(rb, "hits"), g(ra, "share_of_users_hit", _pct), g(rb, "share_of_users_hit", _pct)]
        if has_labels:
            row += [g(ra, "precision"), g(rb, "precision"), g(ra, "recall"), g(rb, "recall")]
        L.append("| " + " | ".join(row) + " |")
    return L


def to_markdown(report: dict, events_file: str = "", labels_file: str | None = None) -> str:
    has_model = report["model_version"] is not None
    has_labels = report["label1_events"] is not None
    files = report["files"]
    eps = report["events_per_s"]
    L = ["# seqguard rules backtest", "",
         f"- created: {report['created']}",
         f"- events: {report['events']:,} from {events_file or 'n/a'}; users: {report['users']:,}; "
         f"days: {report['days']}" + (f"; label-1 events: {report['label1_events']:,} ({labels_file})" if has_labels else ""),
         f"- model: {report['model_version'] or 'none (featuriser only: rules that read the model are skipped)'}"
         + (f"; its alerts (REVIEW or stronger): {report['model_alerts']:,}" if has_model else ""),
         f"- speed: {eps['total']:,.0f} events/s end to end ({'featurise + encode + detect' if has_model else 'featurise'} "
         f"{eps['prepare']:,.0f} events/s, rules + statistics {eps['rules_and_stats']:,.0f} events/s)"
         + (f"; {eps['including_read']:,.0f} events/s counting the read of the file" if "including_read" in eps else "")
         + f"; {eps['total_per_cpu_s']:,.0f} events per CPU second (wall time on shared cores counts the neighbours)",
         ""]
    for k, f in enumerate(files):
        L += [f"## {'A' if k == 0 else 'B'}: `{f['source']}` ({f['version']})", ""]
        if f["skipped_need_model"]:
            L += [f"Not evaluated (they read the model's risk or reasons; pass --model): "
                  + ", ".join(f"`{n}`" for n in f["skipped_need_model"]), ""]
        L += _rule_table(f, has_model, has_labels) + [""]
    L += ["## The pack as a whole", "",
          "The rules' own action (minimum actions and score thresholds)" + (
              ", the model's, and the combination the gateway answers (the stronger of the two)" if has_model else "")
          + ".", ""] + _pack_table(files, has_model, has_labels) + [""]
    if len(files) == 2:
        L += ["## A vs B, rule by rule", ""] + _compare_table(files[0], files[1], has_labels) + [""]
    L += ["## How the numbers were computed", "",
          "- Every event is featurised in global time order by the featuriser the gateway runs; rules are evaluated "
          "by `seqguard.rules.RuleSet.evaluate`, the gateway's function" + (
              "; risk, actions, encoder surprise and session stage come from `seqguard score-file`'s replay." if has_model
              else "."),
          "- hits/day: hits over the days the log spans (UTC days); users hit: share of the log's users with at least "
          "one hit.",
          "- model alerted too: share of the rule's hits on which the model alone answered REVIEW or stronger; only "
          "the rule: hits the model did not alert on (what the rule adds)." if has_model else "",
          "- precision: label-1 share of the hits; recall: share of all label-1 events hit." if has_labels else "", ""]
    return "\n".join(x for x in L if x is not None)


# --------------------------------------------------------------------------- CLI entry

def main_backtest(args) -> int:
    from tqdm import tqdm
    from seqguard.fastlog import read_events_fast
    from seqguard.schema import ReadReport, parse_column_map
    rules = load_rules(args.rules)                    # bad files fail before a large log is read
    compare = load_rules(args.compare) if args.compare else None
    labels = None
    if args.labels:
        from .evaluate import read_labels
        labels = read_labels(args.labels)
    report = ReadReport()
    t_read = time.time()
    events = list(tqdm(read_events_fast(args.events, parse_column_map(args.column_map), args.on_bad_row, report),
                       desc=f"read {os.path.basename(args.events)}", unit="ev", mininterval=1.0, leave=False,
                       disable=args.quiet))
    t_read_end = time.time()
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not events:
        raise ValueError(f"{args.events}: no valid events to backtest")
    y = None
    if labels is not None:
        from .evaluate import align_labels
        y = align_labels(events, labels)[0]
    result = run_backtest(events, rules, y=y, model_dir=args.model, compare=compare, progress=not args.quiet)
    read_s = result["timings_s"]["read"] = round(t_read_end - t_read, 2)
    work_s = sum(v for k, v in result["timings_s"].items() if k != "read")
    result["events_per_s"]["including_read"] = len(events) / max(read_s + work_s, 1e-9)
    result["events_file"] = os.path.abspath(args.events)
    result["labels_file"] = os.path.abspath(args.labels) if args.labels else None
    md = to_markdown(result, args.events, args.labels)   # after the timings: its speed line shows them
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backtest.md").write_text(md)
    (out / "backtest.json").write_text(json.dumps(result, indent=2))
    print("\n".join(_pack_table(result["files"], result["model_version"] is not None, y is not None)))
    eps = result["events_per_s"]["total"]
    print(f"backtest of {len(events):,} events ({eps:,.0f} events/s) -> {out / 'backtest.md'}, {out / 'backtest.json'}",
          file=sys.stderr)
    return 0
