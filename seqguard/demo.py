"""`seqguard demo`: the whole product in one run, on this machine.

generate a training log and a labelled test log with injected attacks -> train a small model
-> start Redis + Triton + gateway (LocalStack) -> stream the test traffic through the gateway
over gRPC in time order -> print the riskiest events, actions per family, ROC-AUC and latency
-> stop everything.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def _bar(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def main_demo(args) -> int:
    from training.generate import generate, write_events, write_labels
    from training.train import TrainConfig, train

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

    _bar("3/4 start Redis + Triton + gateway, stream live traffic through gRPC")
    results = asyncio.run(_stream(work, test_ev))

    _bar("4/4 results")
    _report(test_ev, test_lab, results)
    print(f"\ndemo finished in {time.time() - t0:.0f}s; artifacts in {work}/")
    return 0


async def _stream(work: Path, events: list[dict]) -> dict:
    import grpc
    from gateway.proto import risk_pb2, risk_pb2_grpc
    from gateway.up import LocalStack
    from seqguard.services import free_port

    stack = LocalStack(str(work / "model"), str(work / "run"), port=free_port(), redis_appendonly=False)
    await stack.start()
    out: dict = {}
    try:
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
    finally:
        await stack.stop()
    return out


def _report(events, labels, results) -> None:
    from sklearn.metrics import roc_auc_score
    from gateway.proto import risk_pb2
    lab = {r["event_id"]: r for r in labels}
    ev = {e["event_id"]: e for e in events}
    ids = [e["event_id"] for e in events]
    y = np.array([lab[i]["label"] for i in ids])
    risk = np.array([results[i].risk for i in ids])
    pay = np.array([ev[i]["event_type"] == "payment" for i in ids])
    top = sorted(ids, key=lambda i: -results[i].risk)[:12]
    print(f"{'event':>14} {'user':>8} {'type':>16} {'risk':>6} {'action':>9}  {'truth':<24} reasons")
    for i in top:
        r = results[i]
        truth = lab[i]["family"] + (f"/{lab[i]['variant']}" if lab[i]["variant"] else "")
        reasons = "; ".join(x.message for x in r.reasons) or "-"
        print(f"{i[-14:]:>14} {ev[i]['user_id']:>8} {ev[i]['event_type']:>16} {r.risk:6.3f} "
              f"{risk_pb2.Action.Name(r.action):>9}  {truth:<24} {reasons[:70]}")
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
