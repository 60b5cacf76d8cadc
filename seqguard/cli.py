"""`seqguard` command line: generate, train, score-file, evaluate, backtest, export, up, retrain, drift, demo.

Heavy imports (torch, sklearn, grpc) happen inside each subcommand so `--help` is instant and
the gateway never imports torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .detector import RULES_WEIGHT, SEQUENCE_WEIGHT, SESSION_ALPHA


def _add_training_opts(p) -> None:
    """Options `train` and `retrain` share (same names, defaults and meaning)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--trees", type=int, default=200, help="IsolationForest trees")
    p.add_argument("--max-train-minutes", type=float, default=60.0,
                   help="safety cap on encoder training time; training normally ends after --epochs, an early "
                        "stop is logged as a warning because the model is then under-trained")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--session-alpha", type=float, default=SESSION_ALPHA, metavar="A",
                   help="detector stage 2: an event's score is at least the running average of the user's "
                        f"earlier event anomalies, weighting the newest by A (default {SESSION_ALPHA}; 0 = off, "
                        "each event judged alone)")
    p.add_argument("--no-tail-forest", action="store_true",
                   help="one IsolationForest per event-type group on the raw inputs only; by default each group "
                        "also gets a twin on every column's two-sided tail scale among training events, which can "
                        "only raise the raw forest's score (docs/results/tail_forest.md). The twin is better at "
                        "1%% FPR, worse at 0.1%%, and costs a second forest walk per online score: the switch for "
                        "block-heavy or CPU-bound deployments")
    p.add_argument("--no-signal-floors", action="store_true",
                   help="do not read two signals directly (by default each one's rarity among its group's training "
                        "events is a floor under the forests' score: the 7-day count of OTHER accounts with failed "
                        "logins on the device, for logins; the fast timing regularity, for browsing events. They "
                        "catch slow credential-stuffing rings and crawlers; docs/results/worlds_design_views.md)")
    p.add_argument("--user-cap", type=float, default=10.0, metavar="F",
                   help="contamination-robust fitting: in every forest sample and calibration table each account "
                        "keeps at most F x the median account's events (at least 20), so a few heavy accounts "
                        "(crawler fleets, scripts) cannot define normal (default 10; 0 = off, every event counts once; "
                        "seqguard/robust_fit.py, docs/results/worlds_ablation.md)")
    p.add_argument("--user-cap-min", type=int, default=20, metavar="N",
                   help="with --user-cap: no account is cut below N events per table (protects legitimate heavy "
                        "users, e.g. digital-goods buyers with many small payments; default 20)")
    p.add_argument("--sequence-weight", type=float, default=SEQUENCE_WEIGHT, metavar="W",
                   help="read the encoder's next-event prediction as a view of its own: the surprise of each "
                        "event's type under the user's previous state, calibrated on training events, combined "
                        "with the forests by a weighted min-p that gives it W of the false-positive budget "
                        f"(default {SEQUENCE_WEIGHT}; 0 = off; docs/results/hdfs.md). Raise it for machine-like "
                        "logs whose event order is the signal")
    p.add_argument("--rules-weight", type=float, default=RULES_WEIGHT, metavar="W",
                   help="read the hand rules' own score as a view of the detector: the rules pack's summed score, "
                        "calibrated per event-type group on training events, combined with the other views by the "
                        f"weighted min-p with W of the false-positive budget (default {RULES_WEIGHT}; 0 = off; "
                        "seqguard/rules_view.py, docs/results/worlds_design_views.md)")
    p.add_argument("--view-rules", default=None, metavar="RULES.toml",
                   help="the rules pack of that view, saved with the model (default: configs/rules/default.toml). "
                        "It may read featuriser signals, event_type and amount, not the model's risk or other event fields")


def _add_input_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", dest="column_map", default=None, metavar="FIELD=COLUMN,...",
                   help="map your column names to schema-v1 fields, e.g. user_id=customer,ts=timestamp")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="error (default): stop at the first bad row, naming file, row and field; "
                        "skip: skip bad rows and print counts per reason at the end")


def _read(path: str, args) -> list:
    from tqdm import tqdm
    from .schema import ReadReport, parse_column_map, read_events
    report = ReadReport()
    events = list(tqdm(read_events(path, parse_column_map(args.column_map), args.on_bad_row, report),
                       desc=f"read {os.path.basename(path)}", unit="ev", mininterval=1.0, leave=False))
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    return events


def cmd_generate(args) -> int:
    from seqguard.training.generate import main_generate
    main_generate(users=args.users, seed=args.seed, out=args.out, labels=args.labels, days=args.days,
                  world=args.world)
    return 0


def _train_action_fpr(args) -> dict:
    """--thresholds FILE (TOML/JSON target FPR per action) wins over the per-action flags."""
    if getattr(args, "thresholds", None):
        from seqguard.training.thresholds import load_action_fpr
        return load_action_fpr(args.thresholds)
    return {"REVIEW": args.review_fpr, "CHALLENGE": args.target_fpr, "BLOCK": args.block_fpr}


def cmd_train(args) -> int:
    from seqguard.training.train import TrainConfig, train
    from .schema import parse_column_map
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, seed=args.seed, min_type_count=args.min_type_count,
                      max_train_minutes=args.max_train_minutes, n_estimators=args.trees,
                      action_fpr=_train_action_fpr(args),
                      threads=args.threads, session_alpha=args.session_alpha,
                      tail_forest=not args.no_tail_forest, signal_floors=not args.no_signal_floors,
                      user_cap=args.user_cap, user_cap_min=args.user_cap_min,
                      sequence_weight=args.sequence_weight, rules_weight=args.rules_weight,
                      view_rules=args.view_rules)
    train(args.events, args.out, cfg, labels_path=args.labels, column_map=parse_column_map(args.column_map),
          on_bad_row=args.on_bad_row)
    return 0


def cmd_score_file(args) -> int:
    import resource
    from .artifact import ModelArtifact
    from .batch import one_blas_thread, score_events, write_scores_csv
    t0 = time.time()
    rules = None
    if args.rules:
        if args.engine == "ray":
            raise ValueError("--rules runs with --engine local only (the Ray engine returns risk and actions only)")
        from .rules import load_rules
        rules = load_rules(args.rules)  # fail before reading a large log on a bad rules file
    if args.engine == "ray":
        from .ray_engine import import_ray
        import_ray()                    # fail before reading a large log when Ray is not installed
    if args.chunk_events < 1:
        raise ValueError(f"--chunk-events must be >= 1, got {args.chunk_events}")
    model = ModelArtifact.load(args.model)
    holds_index = _holds_index(args.holds_audit) if args.holds_audit else None
    # streamed in bounded memory when it can be; rules and holds (over the whole log) and Ray read it whole
    n = _stream_score_file(model, args) if args.engine == "local" and rules is None and holds_index is None else None
    if n is None:
        events = _read(args.input, args)
        t1 = time.time()
        outcome = None
        if args.engine == "ray":
            from .ray_engine import RayConfig, score_events_ray
            risk, actions = score_events_ray(model, events,
                                             RayConfig(address=args.ray_address, partitions=args.partitions),
                                             log=lambda m: print(m, file=sys.stderr))
        elif rules is not None:
            from .batch import score_events_with_rules
            with one_blas_thread():
                risk, actions, outcome = score_events_with_rules(model, events, rules, progress=not args.quiet)
        else:
            with one_blas_thread():
                risk, actions, _ = score_events(model, events, progress=not args.quiet)
        t2 = time.time()
        held = _apply_hold_index(holds_index, events, actions, outcome) if holds_index is not None else None
        write_scores_csv(args.output, events, risk, actions, model.model_version, outcome,
                         rules.version_tag if rules is not None else "", held)
        n = len(events)
        print(f"  read {t1 - t0:.1f}s, score {t2 - t1:.1f}s ({n / max(t2 - t1, 1e-9):,.0f} events/s), "
              f"write {time.time() - t2:.1f}s", file=sys.stderr)
    t3 = time.time()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"scored {n} events with model {model.model_version} -> {args.output}\n"
          f"  total {n / max(t3 - t0, 1e-9):,.0f} events/s ({t3 - t0:.1f}s); peak RSS {peak_mb:,.0f} MB",
          file=sys.stderr)
    return 0


def _holds_index(audit_path: str):
    """Hold windows from an exported audit stream (`seqguard holds-export`), keyed like the gateway's:
    it needs the deployment's pseudonymisation key (SEQGUARD_PSEUDONYM_KEY[_FILE])."""
    from seqguard.gateway.holds import HoldIndex, read_audit
    from seqguard.gateway.settings import Settings
    from seqguard.gateway.state import Pseudonymizer
    return HoldIndex.from_audit(read_audit(audit_path), Pseudonymizer(Settings.load().key_bytes()))


def _apply_hold_index(index, events, actions, outcome) -> tuple[list[str], list[str]]:
    """The gateway's rule for holds (gateway.holds.apply_holds) on the model's (or the rules') actions."""
    from seqguard.gateway.holds import apply_holds
    from .detector import ACTIONS
    codes = outcome.action if outcome is not None else actions
    per_event = index.for_events(events)
    final, _ = apply_holds([ACTIONS[a] for a in codes.tolist()], per_event)
    return final, [";".join(h.action for h in hs) for hs in per_event]


def _stream_score_file(model, args) -> int | None:
    """Score the log chunk by chunk (memory bounded by the chunk and the users/entities) when it is
    in time order; None when it is not (the caller scores it whole, in memory)."""
    from .batch import NotInTimeOrder, stream_scores_csv
    from .fastlog import read_events_fast
    from .schema import ReadReport, parse_column_map
    report = ReadReport()
    events = read_events_fast(args.input, parse_column_map(args.column_map), args.on_bad_row, report)
    try:
        n = stream_scores_csv(model, events, args.output, chunk_events=args.chunk_events, progress=not args.quiet)
    except NotInTimeOrder as e:
        print(f"score-file: the log is not in time order ({e}); scoring it whole, in memory "
              "(sort it by ts for bounded memory)", file=sys.stderr)
        return None
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    return n


def cmd_evaluate(args) -> int:
    from seqguard.training.evaluate import main_evaluate
    return main_evaluate(args)


def cmd_backtest(args) -> int:
    from seqguard.training.backtest import main_backtest
    return main_backtest(args)


def cmd_export(args) -> int:
    from seqguard.training.export import main_export
    return main_export(args)


def cmd_up(args) -> int:
    from seqguard.gateway.up import main_up
    return main_up(args)


def cmd_retrain(args) -> int:
    from seqguard.training.retrain import retrain
    from seqguard.training.train import TrainConfig
    from .artifact import ModelArtifact
    from .schema import parse_column_map
    live = ModelArtifact.load(args.live)
    cfg = TrainConfig(hidden=args.hidden or live.hidden, epochs=args.epochs, seed=args.seed, n_estimators=args.trees,
                      max_train_minutes=args.max_train_minutes, threads=args.threads,
                      session_alpha=args.session_alpha, tail_forest=not args.no_tail_forest,
                      signal_floors=not args.no_signal_floors, user_cap=args.user_cap,
                      user_cap_min=args.user_cap_min,
                      sequence_weight=args.sequence_weight, rules_weight=args.rules_weight,
                      view_rules=args.view_rules,
                      action_fpr=dict(live.metadata.get("action_fpr") or TrainConfig().action_fpr))
    import json
    report = retrain(args.live, args.events, args.out, cfg, labels_path=args.labels, holdout_frac=args.holdout_frac,
                     column_map=parse_column_map(args.column_map))
    print(json.dumps({k: report[k] for k in ("recommend_candidate", "reason")}))
    return 0


def cmd_drift(args) -> int:
    """PSI of score and feature distributions vs training; exit 0 either way (the report says DRIFT)."""
    import json
    from seqguard.training.drift import drift
    report = drift(args.model, _read(args.events, args), _read(args.reference, args) if args.reference else None,
                   threshold=args.threshold, log=lambda m: print(m, file=sys.stderr))
    from .artifact import ModelArtifact
    md = report.to_markdown(ModelArtifact.load(args.model).model_version)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(report.to_json(), f, indent=2)
    else:
        print(md, file=sys.stderr)
    print(json.dumps({"flagged": report.flagged, "score_psi": round(report.score_psi, 4),
                      "drifted_features": report.drifted_features}))
    return 0


def cmd_holds_export(args) -> int:
    import asyncio

    from seqguard.gateway.holds import export_audit
    from seqguard.gateway.redisconn import connect_redis, key_prefix
    from seqguard.gateway.settings import Settings
    settings = Settings.load()

    async def run() -> int:
        r = connect_redis(settings, 5.0)
        try:
            return await export_audit(r, key_prefix(settings), args.out)
        finally:
            await r.aclose()
    n = asyncio.run(run())
    print(f"wrote {n} audit records to {args.out}", file=sys.stderr)
    return 0


def cmd_alerts_sink(args) -> int:
    from seqguard.gateway.alerts import main_sink
    return main_sink(args)


def cmd_review(args) -> int:
    from seqguard.gateway.review.serve import main_review
    return main_review(args)


def cmd_demo(args) -> int:
    from .demo import main_demo
    return main_demo(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write a synthetic labelled event log (normal personas, attacks, hard negatives)")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--days", type=int, default=None,
                   help="log span in days (default 30, or with --world the world's own span)")
    p.add_argument("--world", type=int, default=None, metavar="K",
                   help="draw the generator's configuration from randomised world K (persona mix, look-alikes, "
                        "attack prevalence and cadence, ring sizes and spread, event-type names, extra types, "
                        "missing fields, log span; training/world_config.py); printed and written as "
                        "<out>.world.json. Absent: the fixed configuration. --seed draws the users within it")
    p.add_argument("--out", required=True, help="events file (.jsonl, .csv or .parquet)")
    p.add_argument("--labels", default=None, help="labels file (.jsonl), one line per event")
    p.set_defaults(fn=cmd_generate)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train encoder + IsolationForest on an (unlabelled) event log")
    p.add_argument("--events", required=True, help="event log (.jsonl, .csv, .parquet; schema v1)")
    p.add_argument("--labels", default=None, help="optional labels, only used for a report line")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--hidden", type=int, default=128, help="LSTM hidden size")
    _add_training_opts(p)
    p.add_argument("--min-type-count", type=int, default=5, help="event types seen this often get their own token")
    p.add_argument("--target-fpr", type=float, default=0.01, help="CHALLENGE threshold: FPR on training traffic")
    p.add_argument("--review-fpr", type=float, default=0.05)
    p.add_argument("--block-fpr", type=float, default=0.001)
    p.add_argument("--thresholds", default=None,
                   help="TOML/JSON file: target FPR per action (REVIEW/CHALLENGE/BLOCK); overrides the *-fpr flags")
    _add_input_opts(p)
    p.set_defaults(fn=cmd_train)


def _add_score_file(sub) -> None:
    p = sub.add_parser("score-file", help="batch-score a log: risk right after every event (same numbers as online)")
    p.add_argument("--model", required=True, help="artifact directory written by `seqguard train`")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="CSV: event_id,user_id,risk,action,model_version")
    p.add_argument("--rules", default=None, metavar="RULES.toml",
                   help="also evaluate a rules file (e.g. configs/rules/default.toml) on every event, as the gateway "
                        "does: adds the columns rule_score, rules_fired (;-joined), final_action (the model's action "
                        "raised by the rules) and rules_version. Without it the CSV is unchanged")
    p.add_argument("--holds-audit", default=None, metavar="AUDIT.jsonl",
                   help="replay holds as the gateway enforced them: the audit stream exported by "
                        "`seqguard holds-export`; each event gets at least the action of the holds active at its "
                        "time (columns final_action and holds). Needs the deployment's SEQGUARD_PSEUDONYM_KEY[_FILE]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: partition by user over a Ray cluster (needs the "
                        "`scale` extra): a first distributed pass computes the cross-user device/IP counters, "
                        "a second scores each user partition; output identical to local")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: an existing cluster (e.g. ray://head:10001 or auto); "
                        "default: start a local Ray on this machine's CPUs")
    p.add_argument("--partitions", type=int, default=0, metavar="N",
                   help="with --engine ray: number of partitions (default: one per CPU in the cluster)")
    p.add_argument("--chunk-events", type=int, default=65536, metavar="N",
                   help="with --engine local: a log in time order (timestamps never decrease) is scored N events "
                        "at a time, carrying only per-user and per-device/IP state, so memory does not grow with "
                        "the log (~1 GB at the default); a log out of order is scored whole, in memory (same output)")
    _add_input_opts(p)
    p.set_defaults(fn=cmd_score_file)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, baselines, plots and a Markdown report on a labelled log")
    p.add_argument("--events", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--report", required=True, help="directory for report.md and PNG plots")
    p.add_argument("--thresholds", default=None,
                   help="TOML/JSON file: target FPR per action; report precision/recall at those cut-offs "
                        "instead of the artifact's")
    p.add_argument("--rules", default=None, metavar="RULES.toml",
                   help="also report a rules file: the rules alone, the model alone and their combination (the "
                        "gateway's final action: the stronger of the two) at each action, and precision / recall "
                        "per rule")
    _add_input_opts(p)
    p.set_defaults(fn=cmd_evaluate)


def _add_backtest(sub) -> None:
    p = sub.add_parser("backtest", help="how a rules file would have behaved on a past log: hits per rule per day, "
                                        "users hit, overlap with the model, precision/recall with labels",
                       description="Backtest a rules file (configs/rules/default.toml is the shipped pack) on an event "
                                   "log: per rule the hits, hits per day, the share of users hit, with --model the "
                                   "overlap with the model's alerts, with --labels precision and recall; then the pack "
                                   "as a whole per action, and with --compare a second rules file side by side. Writes "
                                   "backtest.md and backtest.json. Rules that read only featuriser outputs and event "
                                   "fields need no model; without --model the ones that read risk or a model reason "
                                   "are listed as not evaluated.")
    p.add_argument("--rules", required=True, metavar="RULES.toml", help="the rules file to backtest (A)")
    p.add_argument("--events", required=True, help="event log (.jsonl, .csv, .parquet; schema v1)")
    p.add_argument("--labels", default=None, help="optional labels (.jsonl, one per event): precision / recall")
    p.add_argument("--model", default=None, help="optional artifact directory: risk, reasons and model alerts")
    p.add_argument("--compare", default=None, metavar="RULES2.toml", help="a second rules file (B), side by side")
    p.add_argument("--out", required=True, help="directory for backtest.md and backtest.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_input_opts(p)
    p.set_defaults(fn=cmd_backtest)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="(re-)export a trained encoder into a Triton model repository (ONNX, TensorRT)")
    p.add_argument("--model", required=True)
    p.add_argument("--repository", default=None, help="model repository (default: the artifact's own)")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT FP16 plan (needs a GPU + tensorrt)")
    p.add_argument("--int8", action="store_true", help="with --tensorrt: INT8 with calibration")
    p.add_argument("--instances", type=int, default=1)
    p.set_defaults(fn=cmd_export)


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="start Redis + Triton + the gRPC gateway for a model; Ctrl-C stops all three")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default=os.environ.get("SEQGUARD_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SEQGUARD_PORT", "50051")), help="gateway gRPC port")
    p.add_argument("--redis-port", type=int, default=int(os.environ.get("SEQGUARD_REDIS_PORT", "6379")))
    p.add_argument("--triton-http-port", type=int, default=int(os.environ.get("SEQGUARD_TRITON_HTTP_PORT", "8000")))
    p.add_argument("--triton-grpc-port", type=int, default=int(os.environ.get("SEQGUARD_TRITON_GRPC_PORT", "8001")))
    p.add_argument("--triton-metrics-port", type=int, default=int(os.environ.get("SEQGUARD_TRITON_METRICS_PORT", "8002")))
    p.add_argument("--run-dir", default=os.environ.get("SEQGUARD_RUN_DIR", "runs/up"),
                   help="logs, Redis AOF and the pseudonymisation key file live here")
    p.add_argument("--review-port", type=int, default=int(os.environ.get("SEQGUARD_REVIEW_PORT", "8088")),
                   help="the analysts' review queue (web) on this port; its URL is printed (0: a free port)")
    p.add_argument("--no-review", action="store_true", help="do not start the review queue")
    p.add_argument("--redis-appendfsync", choices=("always", "everysec"),
                   default=os.environ.get("SEQGUARD_REDIS_APPENDFSYNC", "everysec"),
                   help="everysec (default): an answered update survives a crash of Redis, up to ~1 s of them "
                        "can be lost in a crash of the host; always: survives a host crash too, at a much higher "
                        "p99 write latency (docs/reliability.md)")
    p.set_defaults(fn=cmd_up)


def _add_retrain(sub) -> None:
    p = sub.add_parser("retrain", help="train a candidate on new events (+ labels) and compare it with the live model")
    p.add_argument("--live", required=True, help="artifact directory of the model serving now")
    p.add_argument("--events", required=True, help="new event log; its latest --holdout-frac is held out for the comparison")
    p.add_argument("--labels", default=None, help="optional outcome labels (e.g. exported ReportOutcome labels)")
    p.add_argument("--out", required=True, help="artifact directory for the candidate (+ retrain_report.md/json)")
    p.add_argument("--holdout-frac", type=float, default=0.2)
    p.add_argument("--hidden", type=int, default=0, help="LSTM hidden size (default: the live model's)")
    _add_training_opts(p)
    _add_input_opts(p)
    p.set_defaults(fn=cmd_retrain)


def _add_drift(sub) -> None:
    p = sub.add_parser("drift", help="PSI of risk-score and feature distributions of an event log vs training")
    p.add_argument("--model", required=True, help="artifact directory (its drift_reference.json is the baseline)")
    p.add_argument("--events", required=True, help="recent events to check")
    p.add_argument("--reference", default=None,
                    help="training events log, used (and cached in the artifact) when the model has no reference yet")
    p.add_argument("--out", default=None, help="Markdown report (+ the same name .json); default: stderr")
    p.add_argument("--threshold", type=float, default=0.2, help="PSI above this is flagged (default 0.2)")
    _add_input_opts(p)
    p.set_defaults(fn=cmd_drift)


def _add_holds_export(sub) -> None:
    p = sub.add_parser("holds-export", help="write the holds audit stream (who set/released which hold) as JSONL, "
                                            "for `score-file --holds-audit`; Redis from SEQGUARD_REDIS_*")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(fn=cmd_holds_export)


def _add_alerts_sink(sub) -> None:
    p = sub.add_parser("alerts-sink", help="deliver the gateway's alerts stream to a webhook (signed, retried, "
                       "dead-lettered; at-least-once)", description=(
        "Reads <prefix>alerts (the gateway's REVIEW/CHALLENGE/BLOCK decisions and rule hits) in a Redis consumer "
        "group and POSTs each alert as JSON to --url, signed with HMAC-SHA256. An alert is acknowledged only after "
        "a 2xx answer; failures are retried with exponential backoff, and after --max-attempts (or at once on a "
        "4xx other than 408/429) the alert moves to <prefix>alerts:dead. Redis connection: the gateway's "
        "settings (SEQGUARD_REDIS_HOST, SEQGUARD_REDIS_PORT, ... or SEQGUARD_CONFIG). Stops on SIGINT/SIGTERM."))
    from seqguard.gateway.alerts import add_sink_args
    add_sink_args(p)
    p.set_defaults(fn=cmd_alerts_sink)


def _add_review(sub) -> None:
    p = sub.add_parser("review", help="the review queue in the browser: open alerts, cases, fraud/legitimate "
                       "labels, holds (prints its URL)", description=(
        "Serves the analysts' review queue (gateway/review/): open alerts sorted by risk with filters, a case page "
        "per pseudonymised user (risk over time, reasons and rules per alert, holds), and buttons that store "
        "labels the way ReportOutcome does and release or confirm holds. Log in with a gateway admin token "
        "(SEQGUARD_ADMIN_TOKEN / SEQGUARD_ADMIN_TOKEN_FILE; with none, a generated one in <run-dir>/review.token). "
        "Redis: the gateway's settings (SEQGUARD_REDIS_*)."))
    from seqguard.gateway.review.serve import add_review_args
    add_review_args(p)
    p.set_defaults(fn=cmd_review)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="end to end: generate, train a small model, start services, stream traffic, report")
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the stack and the review queue running after the report (Ctrl-C stops it)")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(fn=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqguard", description=(
        "Real-time risk scoring of e-commerce user behaviour sequences: an LSTM step encoder "
        "(served by Triton) + IsolationForest, with per-user state in Redis behind a gRPC gateway."))
    p.add_argument("--version", action="version", version=f"seqguard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_generate, _add_train, _add_score_file, _add_evaluate, _add_backtest, _add_export,
                        _add_up, _add_retrain, _add_drift, _add_holds_export, _add_alerts_sink, _add_review,
                        _add_demo):
        add_command(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .artifact import ArtifactError
        from .rules import RulesError
        from .schema import SchemaError
        if isinstance(e, (SchemaError, ArtifactError, RulesError, FileNotFoundError)) or os.environ.get("SEQGUARD_DEBUG") is None:
            print(f"seqguard {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
