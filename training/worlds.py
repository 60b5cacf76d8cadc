"""Worlds harness: train and score seqguard end to end on randomised worlds, next to the hand rules.

    python -m seqguard.training.worlds --worlds 0-7 --design 0-3 --users 1500 --out runs/worlds

Per world K: `seqguard generate --world K` writes a train log (seed TRAIN_SEED) and a test log
(seed TEST_SEED: other people, same world); `seqguard train` fits a model on the train log
without labels; `seqguard score-file` scores the test log; the hand rules
(training/baselines.py) score the same test events from the same featuriser rows. Metrics come
from training/evaluate.py's `evaluate` (the code `seqguard evaluate` uses). One Markdown + JSON
table: per world and the WORST world, per metric, seqguard vs rules.

Why through the CLI: a fraud team runs exactly these commands on its own log; the harness must
not take a shortcut a user cannot. Why the worst world: a design must hold in every world, not
on average; the report names which worlds chose the design (`--design`) and which only report.

Event types: a world may rename types (team-specific names). Both scorers see the renamed log,
as a team's log would be; the metrics' payment subset is taken on the generator's own names
(the world config's inverse map), so "payment ROC-AUC" means the same events in every world.

Generated logs are cached under --data (shared between runs of different model variants);
each run's models and scores live under --out. A finished world is not recomputed unless --force.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .evaluate import VIEW_PREFIX

TRAIN_SEED, TEST_SEED = 1, 2
FAMILIES = ("account_takeover", "card_testing", "credential_stuffing", "bot_scraping",
            "brushing", "promo_abuse", "fake_reviews")
# (key, label) of the headline metrics, all higher-is-better
METRICS = (("pay_auc", "payment ROC-AUC"), ("pay_r1", "payment recall @1% FPR"),
           ("pay_r01", "payment recall @0.1% FPR"), ("all_r1", "all-event recall @1% FPR"),
           ("user_auc", "user ROC-AUC (max risk)"))
SCORERS = ("seqguard", "hand_rules")
# The same model's stage-1 risk (each event alone): what `--session-alpha 0` serves. Stage 2 is fitted
# after stage 1 and never changes it, so this is the session-stage ablation without a second training.
EVENT_ONLY = "seqguard_event_only"
# Each view of the same model on its own (training/evaluate.py view_scores): how much each view
# contributes, side by side with their combination, without another training.
# Small and short by default: a design decision needs several worlds more than it needs big ones.
DEFAULT_TRAIN_ARGS = "--epochs 1 --trees 100 --hidden 64"


class WorldsError(RuntimeError):
    """A step of the harness failed: names the world and the command."""


@dataclass
class HarnessConfig:
    worlds: list
    design: list                     # worlds used to choose the design (named in the report)
    users: int = 1500                # per log; a few thousand keeps one world to minutes on 2 cores
    test_users: int = 1000
    days: int | None = None          # None: each world's own log span
    data_dir: Path = Path("runs/worlds_data")
    out_dir: Path = Path("runs/worlds")
    train_args: list = field(default_factory=lambda: shlex.split(DEFAULT_TRAIN_ARGS))
    label: str = "seqguard"          # name of this model variant in the report
    force: bool = False
    step_timeout_s: float = 3600.0   # per CLI step: a stuck step fails the world, not the session


def parse_range(spec: str) -> list[int]:
    """"0-3,7" -> [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"bad range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no worlds in {spec!r}")
    return sorted(set(out))


def _run(cmd: list, world: int, timeout_s: float) -> float:
    t = time.time()
    print(f"[world {world}] $ {' '.join(shlex.quote(str(c)) for c in cmd)}", file=sys.stderr, flush=True)
    try:
        r = subprocess.run([str(c) for c in cmd], timeout=timeout_s, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        raise WorldsError(f"world {world}: timed out after {timeout_s:.0f}s: {' '.join(map(str, cmd))}") from None
    if r.returncode != 0:
        raise WorldsError(f"world {world}: exit {r.returncode}: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}")
    return time.time() - t


def _seqguard() -> list:
    return [sys.executable, "-m", "seqguard.cli"]


def generate_world(cfg: HarnessConfig, k: int) -> dict:
    """Train and test logs of world k (cached); returns their paths."""
    d = cfg.data_dir / f"w{k}"
    paths = {}
    for part, seed, users in (("train", TRAIN_SEED, cfg.users), ("test", TEST_SEED, cfg.test_users)):
        ev, lab = d / f"{part}_u{users}.jsonl", d / f"{part}_u{users}_labels.jsonl"
        if cfg.force or not lab.exists():
            cmd = _seqguard() + ["generate", "--world", k, "--users", users, "--seed", seed,
                                 "--out", ev, "--labels", lab]
            if cfg.days:
                cmd += ["--days", cfg.days]
            _run(cmd, k, cfg.step_timeout_s)
        paths[part], paths[part + "_labels"] = ev, lab
    return paths


def _read_scores(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["event_id"]: float(row["risk"]) for row in csv.DictReader(f)}


def evaluate_world(model_dir: Path, test: Path, labels: Path, world_json: Path, scores_csv: Path,
                   report_dir: Path) -> dict:
    """seqguard's risks (from score-file's CSV) and the hand rules on the same events -> metrics."""
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import encode_log, stage1_scores
    from seqguard.schema import read_events
    from seqguard.training.baselines import hand_rules_score
    from seqguard.training.evaluate import evaluate, read_labels, view_scores
    from seqguard.training.world_config import WorldConfig

    events = list(read_events(str(test)))
    risk_by_id = _read_scores(scores_csv)
    missing = [e.event_id for e in events if e.event_id not in risk_by_id]
    if missing:
        raise WorldsError(f"{scores_csv}: {len(missing)} events without a score (e.g. {missing[0]})")
    risk = np.array([risk_by_id[e.event_id] for e in events], np.float64)
    model = ModelArtifact.load(str(model_dir))
    det = model.detector
    enc = encode_log(model, events, reduce=det.project)
    feats_in = np.empty_like(enc.feats)
    feats_in[enc.order] = enc.feats
    rules = hand_rules_score(events, feats_in)
    scores = {"seqguard": risk, "hand_rules": rules}
    if det.has_session:
        scores[EVENT_ONLY] = np.empty(len(events), np.float64)
        scores[EVENT_ONLY][enc.order] = stage1_scores(det, enc.emb, enc.surprise, enc.feats, enc.type_ids)
    scores.update(view_scores(det, enc))
    world = WorldConfig.from_json(world_json.read_text())
    as_generated = [e._replace(event_type=world.original_type(e.event_type)) for e in events]
    return evaluate(as_generated, read_labels(str(labels)), scores, det.thresholds, report_dir, model_version=model.model_version,
                    plots=False, progress=False, quiet=True)


def headline(metrics: dict) -> dict:
    """scorer -> {metric key: value, "families": {family: recall at 1% FPR}} from evaluate()'s output."""
    out = {}
    for name in SCORERS + tuple(n for n in metrics["scorers"] if n == EVENT_ONLY or n.startswith(VIEW_PREFIX)):
        m = metrics["scorers"][name]
        pay, all_ = m["payments"], m["all"]
        out[name] = {"pay_auc": pay["roc_auc"], "pay_r1": pay["at_fpr"]["0.01"]["recall"],
                     "pay_r01": pay["at_fpr"]["0.001"]["recall"], "all_r1": all_["at_fpr"]["0.01"]["recall"],
                     "user_auc": m["user"]["roc_auc"], "families": dict(m["family_recall_at_1pct_fpr"])}
    return out


def run_world(cfg: HarnessConfig, k: int) -> dict:
    out = cfg.out_dir / f"w{k}"
    result_path = out / "result.json"
    if result_path.exists() and not cfg.force:
        cached = json.loads(result_path.read_text())
        # a cached world counts only if it was made the same way; otherwise it is recomputed
        if cached["train_args"] == cfg.train_args and cached["data"]["train_users"] == cfg.users \
                and cached["data"].get("test_users_arg") == cfg.test_users and cached.get("days") == cfg.days:
            print(f"[world {k}] cached: {result_path}", file=sys.stderr)
            return cached
    t0 = time.time()
    paths = generate_world(cfg, k)
    t_gen = time.time() - t0
    model, scores = out / "model", out / "scores.csv"
    t_train = _run(_seqguard() + ["train", "--events", paths["train"], "--out", model] + cfg.train_args,
                   k, cfg.step_timeout_s)
    t_score = _run(_seqguard() + ["score-file", "--model", model, "--input", paths["test"], "--output", scores,
                                  "--quiet"], k, cfg.step_timeout_s)
    t = time.time()
    from seqguard.training.generate import world_config_path
    metrics = evaluate_world(model, paths["test"], paths["test_labels"], Path(world_config_path(paths["test"])),
                             scores, out / "report")
    res = {"world": k, "design": k in cfg.design, "scores": headline(metrics),
           "data": {"test_events": metrics["data"]["events"], "test_users": metrics["data"]["users"],
                    "test_attack_events": metrics["data"]["label1_events"],
                    "train_users": cfg.users, "test_users_arg": cfg.test_users, "events_per_family": metrics["data"]["events_per_family"]},
           "seconds": {"generate": round(t_gen, 1), "train": round(t_train, 1), "score": round(t_score, 1),
                       "evaluate": round(time.time() - t, 1)},
           "train_args": cfg.train_args, "days": cfg.days}
    out.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(res, indent=2))
    s, r = res["scores"]["seqguard"], res["scores"]["hand_rules"]
    print(f"[world {k}] done in {time.time() - t0:.0f}s: " + ", ".join(
        f"{key} {s[key]:.3f} vs {r[key]:.3f}" for key, _ in METRICS if s[key] is not None and r[key] is not None),
          file=sys.stderr, flush=True)
    return res


# --------------------------------------------------------------------------- report

def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summarise(results: list) -> dict:
    """Per metric and family: per scorer the mean and the worst world (min), and the worst margin."""
    summary = {}
    keys = [k for k, _ in METRICS] + [f"family:{f}" for f in FAMILIES]
    for key in keys:
        row = {}
        for name in sorted({n for res in results for n in res["scores"]}):
            vals = {}
            for res in results:
                sc = res["scores"].get(name)
                if sc is None:
                    continue
                v = sc["families"].get(key[7:]) if key.startswith("family:") else sc[key]
                if v is not None:
                    vals[res["world"]] = v
            if vals:
                worst = min(vals, key=vals.get)
                row[name] = {"mean": float(np.mean(list(vals.values()))), "worst": vals[worst], "worst_world": worst}
        margins = {}
        for res in results:
            a, b = (res["scores"][n]["families"].get(key[7:]) if key.startswith("family:") else res["scores"][n][key]
                    for n in SCORERS)
            if a is not None and b is not None:
                margins[res["world"]] = a - b
        if margins:
            w = min(margins, key=margins.get)
            row["worst_margin"] = {"value": margins[w], "world": w, "worlds_below_rules": sorted(
                k for k, v in margins.items() if v < 0)}
        if row:
            summary[key] = row
    return summary


def report_md(results: list, summary: dict, cfg: HarnessConfig, title: str, command: str, seconds: float) -> str:
    worlds = [r["world"] for r in results]
    design = [w for w in worlds if w in cfg.design]
    report = [w for w in worlds if w not in cfg.design]   # worlds with metrics; failed ones are listed below
    L = [f"# {title}", "",
         f"Command: `{command}`", "",
         f"Model variant: **{cfg.label}** (`seqguard train` args: `{' '.join(cfg.train_args)}`). "
         f"Train log {cfg.users} users (seed {TRAIN_SEED}), test log {cfg.test_users} users (seed {TEST_SEED}) per "
         f"world, each world's own log span. Time: {sum(sum(r['seconds'].values()) for r in results) / 60:.1f} min "
         f"of generate/train/score/evaluate steps on this machine (2 shared cores; this run {seconds / 60:.1f} min, "
         "finished worlds are reused from earlier runs).", "",
         f"- Design worlds (used to choose the design): {cfg.design or 'none'}; in this table: {design or 'none'}",
         f"- Report worlds in this table (not used for any design choice): {report or 'none'}", "",
         "Cells: seqguard / hand rules. Bold: seqguard below the rules.", "",
         "| world | test events | attack ev. | " + " | ".join(lab for _, lab in METRICS) + " |",
         "|---|---:|---:|" + "---:|" * len(METRICS)]
    for r in results:
        s, h = r["scores"]["seqguard"], r["scores"]["hand_rules"]
        cells = []
        for key, _ in METRICS:
            c = f"{_f(s[key])} / {_f(h[key])}"
            if s[key] is not None and h[key] is not None and s[key] < h[key]:
                c = f"**{c}**"
            cells.append(c)
        tag = " (design)" if r["design"] else ""
        L.append(f"| {r['world']}{tag} | {r['data']['test_events']} | {r['data']['test_attack_events']} | "
                 + " | ".join(cells) + " |")
    for stat in ("mean", "worst"):
        cells = []
        for key, _ in METRICS:
            row = summary.get(key, {})
            a, b = row.get("seqguard"), row.get("hand_rules")
            cells.append("n/a" if not a or not b else
                         f"{_f(a[stat])} / {_f(b[stat])}" + (f" (w{a['worst_world']} / w{b['worst_world']})"
                                                             if stat == "worst" else ""))
        L.append(f"| **{stat}** | | | " + " | ".join(cells) + " |")
    L += ["", "### Recall at 1% FPR (all events) per attack family", "",
          "| world | " + " | ".join(FAMILIES) + " |", "|---|" + "---:|" * len(FAMILIES)]
    for r in results:
        s, h = r["scores"]["seqguard"]["families"], r["scores"]["hand_rules"]["families"]
        cells = []
        for f in FAMILIES:
            if f not in s:
                cells.append("-")
                continue
            c = f"{_f(s[f])} / {_f(h.get(f))}"
            cells.append(f"**{c}**" if h.get(f) is not None and s[f] < h[f] else c)
        L.append(f"| {r['world']} | " + " | ".join(cells) + " |")
    cells = []
    for f in FAMILIES:
        row = summary.get(f"family:{f}", {})
        a, b = row.get("seqguard"), row.get("hand_rules")
        cells.append("-" if not a or not b else f"{_f(a['worst'])} / {_f(b['worst'])}")
    L.append("| **worst** | " + " | ".join(cells) + " |")
    L += ["", "### Worst margin (seqguard minus rules) per metric", "",
          "| metric | worst margin | world | worlds where seqguard is below the rules |", "|---|---:|---:|---|"]
    for key, lab in list(METRICS) + [(f"family:{f}", f) for f in FAMILIES]:
        m = summary.get(key, {}).get("worst_margin")
        if m:
            L.append(f"| {lab} | {m['value']:+.3f} | {m['world']} | {m['worlds_below_rules'] or '-'} |")
    L += ["", "Time per world (s): " + "; ".join(
        f"w{r['world']}: gen {r['seconds']['generate']}, train {r['seconds']['train']}, score {r['seconds']['score']}, "
        f"eval {r['seconds']['evaluate']}" for r in results), ""]
    return "\n".join(L)


def compare_md(runs: list, title: str, command: str) -> str:
    """One table over several runs' worlds.json (same worlds): per variant the mean and the WORST world of
    every headline metric and family, with the hand rules as the last row."""
    worlds = runs[0][1]["config"]["worlds"]
    for label, rep in runs:
        if rep["config"]["worlds"] != worlds:
            raise ValueError(f"{label}: worlds {rep['config']['worlds']} differ from {worlds}")
    keys = [(k, lab) for k, lab in METRICS] + [(f"family:{f}", f) for f in FAMILIES]
    L = [f"# {title}", "", f"Command: `{command}`", "",
         f"Worlds: {worlds}; design worlds: {runs[0][1]['config']['design']}. Cells: mean / worst world "
         "(the world in brackets). Single train/test seed per world: differences < 0.05 are noise.", ""]
    for part, sel in (("Headline metrics", keys[:len(METRICS)]), ("Recall at 1% FPR per attack family", keys[len(METRICS):])):
        L += [f"### {part}", "", "| variant | train args | " + " | ".join(lab for _, lab in sel) + " |",
              "|---|---|" + "---:|" * len(sel)]
        rows = []
        for label, rep in runs:
            rows.append((label, " ".join(rep["config"]["train_args"]), rep["summary"], "seqguard"))
            if any(EVENT_ONLY in v for v in rep["summary"].values()):
                rows.append((f"{label}, session stage off (same model's stage-1 risk)",
                             " ".join(rep["config"]["train_args"]), rep["summary"], EVENT_ONLY))
            views = sorted({n for v in rep["summary"].values() for n in v if n.startswith(VIEW_PREFIX)})
            for view in views:
                rows.append((f"{label}: its {view[len(VIEW_PREFIX):]} view alone (stage 1)",
                             " ".join(rep["config"]["train_args"]), rep["summary"], view))
        rows.append(("hand rules", "-", runs[0][1]["summary"], "hand_rules"))
        for label, args, summ, scorer in rows:
            cells = []
            for key, _ in sel:
                v = summ.get(key, {}).get(scorer)
                cells.append("n/a" if not v else f"{v['mean']:.3f} / {v['worst']:.3f} (w{v['worst_world']})")
            L.append(f"| {label} | `{args}` | " + " | ".join(cells) + " |")
        L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqguard.training.worlds", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="0-7", help="worlds to run, e.g. 0-3 or 100-107 (default 0-7)")
    p.add_argument("--design", default="0-3",
                   help="worlds that were used to choose the design; the report names them (default 0-3)")
    p.add_argument("--users", type=int, default=1500, help="users in each world's TRAIN log (default 1500)")
    p.add_argument("--test-users", type=int, default=1000, help="users in each world's TEST log (default 1000)")
    p.add_argument("--days", type=int, default=None, help="override every world's log span (default: the world's)")
    p.add_argument("--out", default="runs/worlds", help="models, scores and the report of this run")
    p.add_argument("--data", default=None, help="generated logs, shared between runs (default: <out>/../worlds_data)")
    p.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS,
                   help=f"extra `seqguard train` arguments, one string (default {DEFAULT_TRAIN_ARGS!r}); "
                        "e.g. add --no-tail-forest for an ablation")
    p.add_argument("--label", default="seqguard", help="name of the model variant in the report")
    p.add_argument("--report", default=None, help="Markdown report path (default <out>/worlds.md; + .json)")
    p.add_argument("--title", default="seqguard vs hand rules on randomised worlds")
    p.add_argument("--force", action="store_true", help="recompute worlds that already have results")
    p.add_argument("--compare", nargs="+", default=None, metavar="LABEL=DIR",
                   help="no runs: write one table comparing finished runs (each DIR holds a worlds.json) to --report")
    args = p.parse_args(argv)
    command = "python -m seqguard.training.worlds " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.compare:
        runs = []
        for spec in args.compare:
            label, _, d = spec.rpartition("=")
            runs.append((label or d, json.loads((Path(d) / "worlds.json").read_text())))
        md = compare_md(runs, args.title, command)
        report = Path(args.report or "worlds_compare.md")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(md)
        print(md)
        return 0
    out = Path(args.out)
    cfg = HarnessConfig(worlds=parse_range(args.worlds), design=parse_range(args.design) if args.design else [],
                        users=args.users, test_users=args.test_users, days=args.days,
                        data_dir=Path(args.data) if args.data else out.parent / "worlds_data", out_dir=out,
                        train_args=shlex.split(args.train_args), label=args.label, force=args.force)
    t0 = time.time()
    results, failed = [], []
    for i, k in enumerate(cfg.worlds):
        print(f"=== world {k} ({i + 1}/{len(cfg.worlds)}), {time.time() - t0:.0f}s elapsed", file=sys.stderr, flush=True)
        try:
            results.append(run_world(cfg, k))
        except WorldsError as e:      # a world the CLI cannot get through is a result, not a crash
            msg = str(e).strip().splitlines()
            failed.append({"world": k, "error": msg[0], "last_line": msg[-1] if len(msg) > 1 else ""})
            print(f"[world {k}] FAILED: {msg[-1]}", file=sys.stderr, flush=True)
    summary = summarise(results)
    md = report_md(results, summary, cfg, args.title, command, time.time() - t0)
    if failed:
        md += "\n### Worlds where a step failed (no metrics; they count as failures)\n\n" + "\n".join(
            f"- world {f['world']}: `{f['last_line'] or f['error']}` ({f['error'][:160]})" for f in failed) + "\n"
    report = Path(args.report) if args.report else out / "worlds.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(md)
    table = json.dumps({"config": {
        "worlds": cfg.worlds, "design": cfg.design, "users": cfg.users, "test_users": cfg.test_users,
        "train_args": cfg.train_args, "label": cfg.label}, "results": results, "failed": failed,
        "summary": summary}, indent=2)
    report.with_suffix(".json").write_text(table)
    (out / "worlds.json").write_text(table)      # what --compare reads, wherever the report went
    print(md)
    print(f"report: {report}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
