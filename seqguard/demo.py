"""`seqguard demo`: the whole product in one run, on this machine.

generate a training log and a labelled test log with injected attacks -> train a small model
-> start Redis + Triton + gateway with the default rules pack, and the review queue (LocalStack)
-> stream the test traffic through the gateway over gRPC in time order -> print the riskiest
events with their reasons and rules, actions per family, alerts by action, ROC-AUC and latency
-> stop everything (or, with --keep-running, leave the stack and the review queue up until Ctrl-C).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

RULES_PACK = Path(__file__).resolve().parent.parent / "configs" / "rules" / "default.toml"


def _bar(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def main_demo(args) -> int:
    from seqguard.training.generate import generate, write_events, write_labels
    from seqguard.training.train import TrainConfig, train

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _bar(f"1/4 generate: {args.users} users for training, {max(200, args.users // 5)} for live traffic")
    train_ev, _ = generate(args.users, args.seed)
    test_ev, test_lab = generate(max(200, args.users // 5), args.seed + 1000, days=7)
    write_events(train_ev, work / "train.jsonl")
    write_events(test_ev, work / "live.jsonl")
    write_labels(test_lab, work / "live_labels.jsonl")
    print(f"training log {len(train_ev)} events; live log {len(test_ev)} events "
          f"({sum(r['label'] for r in test_lab)} attack events)")

    _bar("2/4 train a small model (encoder + IsolationForest)")
    cfg = TrainConfig(hidden=64, epochs=1, max_train_minutes=3, n_estimators=150, seed=args.seed)
    train(str(work / "train.jsonl"), str(work / "model"), cfg)

    _bar("3/4 start Redis + Triton + gateway (+ rules, review queue), stream live traffic through gRPC")
    asyncio.run(_stream_and_report(work, test_ev, test_lab, getattr(args, "keep_running", False)))
    print(f"\ndemo finished in {time.time() - t0:.0f}s; artifacts in {work}/")
    return 0


async def _stream_and_report(work: Path, events: list[dict], labels: list[dict], keep_running: bool) -> None:
    from seqguard.gateway.up import LocalStack
    from seqguard.services import free_port

    stack = LocalStack(str(work / "model"), str(work / "run"), port=free_port(), redis_appendonly=False,
                       review_port=0, rules_path=str(RULES_PACK))
    await stack.start()
    try:
        results = await _stream(stack, events)
        _bar("4/4 results")
        _report(events, labels, results)
        _alert_counts(stack)
        if keep_running:
            print(f"\nthe stack keeps running: gateway 127.0.0.1:{stack.port}, review queue {stack.review.url} "
                  f"(token in {work / 'run' / 'review.token'}); Ctrl-C stops it", flush=True)
            await _wait_for_interrupt()
    finally:
        await stack.stop()


async def _wait_for_interrupt() -> None:
    import signal
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _alert_counts(stack) -> None:
    """The alerts the gateway wrote with its decisions (sg:alerts), by action."""
    r = stack.redis.client()
    by_action = Counter(fields[b"action"].decode() for _, fields in r.xrange("sg:alerts"))
    print(f"\nalerts written with the decisions (sg:alerts): {sum(by_action.values())} "
          f"({', '.join(f'{a} {n}' for a, n in sorted(by_action.items())) or 'none'}); "
          f"review queue: {stack.review.url if stack.review else '-'}")


async def _stream(stack, events: list[dict]) -> dict:
    import grpc
    from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc

    out: dict = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.port}") as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        lat = []
        t = time.time()
        # time order; per-user order is what matters, so send small batches in order
        for a in range(0, len(events), 64):
            chunk = [risk_pb2.Event(**{k: v for k, v in e.items() if v is not None}) for e in events[a:a + 64]]
            t1 = time.perf_counter()
            rep = await stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=chunk), timeout=10)
            lat.append((time.perf_counter() - t1) * 1000)
            for r in rep.results:
                out[r.event_id] = r
        dt = time.time() - t
        # single Score calls: the checkout path's latency
        single = []
        for e in events[-200:]:
            e2 = dict(e, event_id=e["event_id"] + "-replay")
            t1 = time.perf_counter()
            await stub.Score(risk_pb2.ScoreRequest(event=risk_pb2.Event(**{k: v for k, v in e2.items()
                                                                            if v is not None})), timeout=2)
            single.append((time.perf_counter() - t1) * 1000)
    statuses = Counter(risk_pb2.Status.Name(r.status) for r in out.values())
    print(f"streamed {len(out)} events in {dt:.1f}s ({len(out) / dt:,.0f} events/s via ScoreBatch of 64); "
          f"statuses {dict(statuses)}")
    print(f"Score (one event) latency: p50 {np.percentile(single, 50):.2f} ms, "
          f"p99 {np.percentile(single, 99):.2f} ms over {len(single)} calls")
    return out


def _report(events, labels, results) -> None:
    from sklearn.metrics import roc_auc_score
    from seqguard.gateway.proto import risk_pb2
    lab = {r["event_id"]: r for r in labels}
    ev = {e["event_id"]: e for e in events}
    ids = [e["event_id"] for e in events]
    y = np.array([lab[i]["label"] for i in ids])
    risk = np.array([results[i].risk for i in ids])
    pay = np.array([ev[i]["event_type"] == "payment" for i in ids])
    top = sorted(ids, key=lambda i: -results[i].risk)[:12]
    print(f"{'event':>14} {'user':>8} {'type':>16} {'risk':>6} {'action':>9}  {'truth':<24} "
          f"{'rules fired':<28} reasons")
    for i in top:
        r = results[i]
        truth = lab[i]["family"] + (f"/{lab[i]['variant']}" if lab[i]["variant"] else "")
        reasons = "; ".join(x.message for x in r.reasons) or "-"
        fired = ",".join(r.rules) or "-"
        print(f"{i[-14:]:>14} {ev[i]['user_id']:>8} {ev[i]['event_type']:>16} {r.risk:6.3f} "
              f"{risk_pb2.Action.Name(r.action):>9}  {truth:<24} {fired[:28]:<28} {reasons[:60]}")
    fired_by_rule = Counter(name for i in ids for name in results[i].rules)
    print(f"\nrules fired (default pack {RULES_PACK.name}): " +
          (", ".join(f"{name} {n}" for name, n in fired_by_rule.most_common(8)) or "none"))
    by_fam = defaultdict(Counter)
    for i in ids:
        by_fam[lab[i]["family"]][risk_pb2.Action.Name(results[i].action)] += 1
    print(f"\n{'family':<22} {'events':>7} {'ALLOW':>7} {'REVIEW':>7} {'CHALLENGE':>9} {'BLOCK':>6}")
    for fam, c in sorted(by_fam.items(), key=lambda kv: (kv[0] == "normal", kv[0])):
        print(f"{fam:<22} {sum(c.values()):>7} {c['ALLOW']:>7} {c['REVIEW']:>7} {c['CHALLENGE']:>9} {c['BLOCK']:>6}")
    if 0 < y.mean() < 1:
        msg = f"\nROC-AUC (online scores vs labels): all events {roc_auc_score(y, risk):.4f}"
        if 0 < y[pay].mean() < 1:
            msg += f", payment events {roc_auc_score(y[pay], risk[pay]):.4f}"
        print(msg)
    print(json.dumps({"events": len(ids), "attack_events": int(y.sum())}))
