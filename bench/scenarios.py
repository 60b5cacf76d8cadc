"""Reliability scenarios on real servers, each reported as counts (the issue-7 closing table).

    python -m bench.scenarios --model runs/m20k_p64 [--quick] [--only full,redis,triton]

Every scenario: one redis-server (AOF, appendfsync everysec, a data dir), one tritonserver, two
`python -m seqguard.gateway.server` processes sharing them, N concurrent asyncio clients taking events
from one time-ordered queue (a user's events race each other across clients and gateways).

* full:   no faults.
* redis:  Redis stopped (SIGTERM: AOF flushed) and restarted on the same port and data dir mid-run;
          the gateways are NOT restarted.
* triton: tritonserver stopped and restarted on the same ports mid-run.

Checks (a "mismatch" is any of them failing, per event or per user):
* every applied event (ScoreResponse.sequence >= 1) has a unique sequence and Redis' counter equals
  their number: nothing doubled, nothing lost;
* every OK risk equals the sequential offline replay (seqguard.batch.score_events) of the applied
  events in sequence order (|diff| <= 1e-5) - after a Triton outage this holds only if the deferred
  steps were applied, after a Redis restart only if the state survived;
* each user's n_events (GetUserState) equals the number of their applied events.
An RPC that ended in a gRPC error has an unknown outcome: it is re-sent once at the end (same
event_id, so idempotency returns the original answer if it was applied).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.schema import read_events
from seqguard.services import RedisServer, TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-scenarios-pseudonym-key-0123456789"
CLIENT_TIMEOUT_S = 2.0


def pick_events(path: str, users: int, n: int):
    """The `users` busiest users of the log, their first events in time order (at most n)."""
    events = list(read_events(path))
    counts = Counter(e.user_id for e in events)
    chosen = {u for u, _ in counts.most_common(users)}
    return [e for e in sorted(events, key=lambda e: (e.ts, e.event_id)) if e.user_id in chosen][:n]


class Stack:
    """Redis (AOF everysec) + Triton + 2 gateway processes, all on loopback."""

    def __init__(self, artifact: ModelArtifact, run_dir: Path, gateways: int = 2):
        self.artifact, self.run_dir = artifact, run_dir
        self.redis = RedisServer(run_dir=run_dir / "redis", appendonly=True)
        self.triton = TritonServer(artifact.repository_dir, models=[artifact.triton_model_name],
                                   run_dir=run_dir / "triton")
        self.n_gw = gateways
        self.gws: list[tuple[subprocess.Popen, int]] = []

    def start(self):
        self.redis.start()
        self.triton.start()
        self.redis.wait_ready(30)
        self.triton.wait_ready(180)
        for k in range(self.n_gw):
            port = free_port()
            env = dict(os.environ, SEQGUARD_MODEL_DIR=str(self.artifact.path), SEQGUARD_PORT=str(port),
                       SEQGUARD_REDIS_PORT=str(self.redis.port), SEQGUARD_TRITON_URL=self.triton.grpc_url,
                       SEQGUARD_TRITON_MODEL=self.artifact.triton_model_name, SEQGUARD_PSEUDONYM_KEY=KEY,
                       SEQGUARD_DEADLINE_MS="1000", SEQGUARD_TRITON_TIMEOUT_MS="500",
                       SEQGUARD_REDIS_TIMEOUT_MS="200")
            log = open(self.run_dir / f"gw{k}.log", "w")
            proc = subprocess.Popen([sys.executable, "-m", "seqguard.gateway.server"], cwd=ROOT, env=env,
                                    stdout=log, stderr=log)
            self.gws.append((proc, port))
        for proc, port in self.gws:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                t_end = time.time() + 90
                while True:
                    try:
                        grpc.channel_ready_future(ch).result(timeout=1)
                        break
                    except grpc.FutureTimeoutError:
                        if proc.poll() is not None or time.time() > t_end:
                            raise RuntimeError(f"gateway did not start; see {self.run_dir}")
        return self

    def stop(self):
        for proc, _ in self.gws:
            proc.terminate()
        for proc, _ in self.gws:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.triton.stop()
        self.redis.stop()


# ----------------------------------------------------------------------------- faults
def restart_redis(stack: Stack, outage_s: float, log: dict):
    log["down_at"] = time.perf_counter()
    stack.redis.stop()                     # SIGTERM: redis fsyncs the AOF on shutdown
    time.sleep(outage_s)
    stack.redis.start()                    # same port, same data dir: the AOF is replayed
    stack.redis.wait_ready(60)
    log["up_at"] = time.perf_counter()


def restart_triton(stack: Stack, outage_s: float, log: dict):
    log["down_at"] = time.perf_counter()
    stack.triton.stop()
    time.sleep(outage_s)
    stack.triton.start()                   # same ports
    stack.triton.wait_ready(180)
    log["up_at"] = time.perf_counter()


# ----------------------------------------------------------------------------- load
def _msg(e):
    return risk_pb2.Event(**{f: v for f, v in e._asdict().items() if v is not None})


async def drive(events, ports, clients: int, fault=None, fault_at=0.3, hold_at=0.7):
    """Run the clients; `fault(log)` (blocking) runs in a thread once fault_at of the events were
    sent; clients pause at hold_at until it is done, so some load always follows the recovery."""
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    stubs = [risk_pb2_grpc.RiskScoringStub(c) for c in chans]
    n = len(events)
    results: list = [None] * n
    lat = np.zeros(n)
    sent_at = np.zeros(n)
    queue = list(range(n))[::-1]
    fault_log: dict = {}
    fault_done = asyncio.Event()
    fault_task = None
    if fault is None:
        fault_done.set()

    async def client(k):
        nonlocal fault_task
        stub = stubs[k % len(stubs)]
        while queue:
            i = queue.pop()
            if fault is not None and fault_task is None and i >= fault_at * n:
                fault_task = asyncio.create_task(asyncio.to_thread(fault, fault_log))
                fault_task.add_done_callback(lambda _: fault_done.set())
            if i >= hold_at * n and not fault_done.is_set():
                await fault_done.wait()
            t0 = time.perf_counter()
            sent_at[i] = t0
            try:
                results[i] = await stub.Score(risk_pb2.ScoreRequest(event=_msg(events[i])), timeout=CLIENT_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                results[i] = err.code().name
            lat[i] = time.perf_counter() - t0

    t_start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    if fault_task is not None:
        await fault_task
    wall = time.perf_counter() - t_start
    first = list(results)
    # unknown outcomes: a gRPC error, or an answer without a sequence (DEGRADED: deadline hit or state
    # "not saved" - the write may still have committed). Re-send once with the same event_id, as a client
    # would: an event that was applied returns its original answer (and sequence), one that was not is
    # applied now.
    retried = [i for i, r in enumerate(results) if isinstance(r, str) or r.sequence < 1]
    for i in retried:
        try:
            results[i] = await stubs[0].Score(risk_pb2.ScoreRequest(event=_msg(events[i])), timeout=10)
        except grpc.aio.AioRpcError as err:
            results[i] = "RETRY_" + err.code().name
    for c in chans:
        await c.close()
    return first, results, lat, sent_at, wall, fault_log, retried


def user_counts(port: int, users) -> dict:
    stub = risk_pb2_grpc.RiskScoringStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return {u: stub.GetUserState(risk_pb2.UserStateRequest(user_id=u), timeout=10).n_events for u in users}


def check(artifact, events, first, results, stack: Stack) -> dict:
    """Counts for the table: first-try codes and statuses, and every kind of state mismatch (final)."""
    first_errors = [r for r in first if isinstance(r, str)]
    ok = [i for i, r in enumerate(results) if not isinstance(r, str) and r.status == risk_pb2.OK]
    first_ok = sum(1 for r in first if not isinstance(r, str) and r.status == risk_pb2.OK)
    first_degraded = sum(1 for r in first if not isinstance(r, str) and r.status == risk_pb2.DEGRADED)
    applied = [i for i, r in enumerate(results) if not isinstance(r, str) and r.sequence >= 1]
    seqs = np.array([results[i].sequence for i in applied])
    dup_seq = len(seqs) - len(set(seqs.tolist()))
    counter = int(stack.redis.client().get("sg:seq") or 0)
    sub = [events[i] for i in applied]
    risk_off, _, _ = score_events(artifact, sub, order=np.argsort(seqs, kind="stable"))
    pos = {i: k for k, i in enumerate(applied)}
    ok_applied = [i for i in ok if i in pos]
    diff = np.array([abs(results[i].risk - risk_off[pos[i]]) for i in ok_applied]) if ok_applied else np.zeros(0)
    risk_mismatch = int((diff > 1e-5).sum())
    want = Counter(e.user_id for e in sub)
    users = sorted({e.user_id for e in events})
    got = user_counts(stack.gws[0][1], users)
    user_mismatch = sum(1 for u in users if got[u] != want.get(u, 0))
    return {"sent": len(events), "answered": len(events) - len(first_errors),
            "ok": first_ok, "degraded": first_degraded, "applied": len(applied),
            "grpc_errors": dict(Counter(first_errors)),
            "dup_seq": dup_seq, "counter_mismatch": int(counter != len(applied)),
            "risk_mismatch": risk_mismatch, "max_risk_diff": float(diff.max()) if len(diff) else 0.0,
            "user_mismatch": user_mismatch, "users": len(users), "redis_seq": counter}


def run_scenario(name, artifact, events, clients, outage_s, workdir: Path) -> dict:
    stack = Stack(artifact, workdir / name).start()
    try:
        fault = {"full": None,
                 "redis": lambda log: restart_redis(stack, outage_s, log),
                 "triton": lambda log: restart_triton(stack, outage_s, log)}[name]
        first, results, lat, sent_at, wall, flog, retried = asyncio.run(
            drive(events, [p for _, p in stack.gws], clients, fault))
        row = check(artifact, events, first, results, stack)
        row["retry_original"] = sum(1 for i in retried if not isinstance(results[i], str)
                                    and results[i].status_detail.startswith("duplicate event_id"))
        row.update(name=name, clients=clients, wall_s=wall, p50_ms=float(np.percentile(lat, 50) * 1000),
                   p99_ms=float(np.percentile(lat, 99) * 1000), max_ms=float(lat.max() * 1000),
                   retried=len(retried), retry_errors=sum(1 for r in results if isinstance(r, str)))
        if flog:
            during = (sent_at >= flog["down_at"]) & (sent_at < flog["up_at"])
            outage = [r for r, d in zip(first, during) if d]
            row.update(outage_s=flog["up_at"] - flog["down_at"], outage_events=int(during.sum()),
                       outage_degraded=sum(1 for r in outage if not isinstance(r, str) and r.status == risk_pb2.DEGRADED),
                       outage_max_ms=float(lat[during].max() * 1000) if during.any() else 0.0)
            after = sent_at >= flog["up_at"]
            row["after_ok"] = sum(1 for r, a in zip(first, after) if a and not isinstance(r, str)
                                  and r.status == risk_pb2.OK)
            row["after_events"] = int(after.sum())
            first_ok_after = [sent_at[i] + lat[i] for i, r in enumerate(first) if after[i] and not isinstance(r, str)
                              and r.status == risk_pb2.OK]
            row["recovered_s"] = float(min(first_ok_after) - flog["up_at"]) if first_ok_after else float("nan")
        return row
    finally:
        stack.stop()


def table(rows) -> str:
    head = ("| scenario | events sent | answered | OK | DEGRADED | gRPC errors (first try) | applied | "
            "dup seq | lost/doubled (Redis counter) | risk mismatches | user-state mismatches | "
            "re-sent (no sequence) / of which already applied | "
            "outage: events / DEGRADED / max ms | after recovery OK / sent (first OK after) | p50 / p99 / max ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out = (f"{r['outage_events']} / {r['outage_degraded']} / {r['outage_max_ms']:.0f} ({r['outage_s']:.1f} s)"
               if "outage_s" in r else "-")
        aft = (f"{r['after_ok']} / {r['after_events']} ({r['recovered_s']:.1f} s)" if "after_ok" in r else "-")
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["grpc_errors"].items())) or "0"
        lines.append(f"| {r['name']} ({r['clients']} clients, {r['users']} users) | {r['sent']} | {r['answered']} | "
                     f"{r['ok']} | {r['degraded']} | {errs} | {r['applied']} | {r['dup_seq']} | "
                     f"{r['counter_mismatch']} | {r['risk_mismatch']} (max diff {r['max_risk_diff']:.1e}) | "
                     f"{r['user_mismatch']} | {r['retried']} / {r['retry_original']} | {out} | {aft} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--events", default="data/test5k.jsonl")
    p.add_argument("--quick", action="store_true", help="~5k events over 200 users instead of 100k over 1k")
    p.add_argument("--only", default="full,redis,triton")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--outage-s", type=float, default=2.0)
    p.add_argument("--out", default="docs/reliability.md")
    args = p.parse_args(argv)
    artifact = ModelArtifact.load(args.model)
    users, n = (200, 5000) if args.quick else (1000, 100_000)
    events = pick_events(args.events, users, n)
    print(f"{len(events)} events over {len({e.user_id for e in events})} users, {args.clients} clients", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="seqguard-scenarios-") as tmp:
        for name in args.only.split(","):
            t0 = time.perf_counter()
            rows.append(run_scenario(name, artifact, events, args.clients, args.outage_s, Path(tmp)))
            print(f"{name}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            stamp = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs "
                     f"(shared with other work), model {args.model}, {len(events)} events, "
                     f"`python -m bench.scenarios {' '.join(argv or sys.argv[1:])}`")
            write_results(Path(args.out), table(rows), stamp, args.quick)     # after each: a partial run still reports
    print(table(rows))
    bad = sum(r["dup_seq"] + r["counter_mismatch"] + r["risk_mismatch"] + r["user_mismatch"] + r["retry_errors"]
              for r in rows)
    return 1 if bad else 0


def write_results(path: Path, md: str, stamp: str, quick: bool) -> None:
    """Replace the marked results block of docs/reliability.md (the prose around it stays)."""
    tag = "quick" if quick else "full"
    begin, end = f"<!-- scenarios:{tag}:begin -->", f"<!-- scenarios:{tag}:end -->"
    block = f"{begin}\n{stamp}\n\n{md}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n### Scenarios ({tag})\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
