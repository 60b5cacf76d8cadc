"""Bulk paths of the benchmark: `Ingest` and `ScoreBatch` events/s with the state applied, and
`seqguard score-file` events/s and peak RSS, on one generated clickstream.

Ingest / ScoreBatch run against a gateway that is already serving (bench.run passes the one it
swept). The log's users are split into --streams groups (a user lives in exactly one, so each
user's events arrive in their own order); each group is one Ingest call streaming its events,
or one worker sending ScoreBatch requests of --batch events and waiting for each answer (the
flow control a bulk client gets for free). A pass starts on an empty Redis and ends with two
counts that prove the events were applied, not just answered: Redis' global apply counter
(sg:seq, one increment per applied event) and the sum of every user's n_events (GetUserState).
A pass stops sending after --max-seconds (the events sent are then the ones counted), so the
run stays bounded on a slow machine.

    python -m bench.throughput --target 127.0.0.1:PORT --redis-port P --log FILE [--streams 4]
    python -m bench.throughput --score-file --model DIR --log FILE
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .cpu import CpuMeter

RETRY_SLEEP_S = 0.05           # after RESOURCE_EXHAUSTED: the gateway's queue is full, back off briefly
REOPEN_SLEEP_S = 0.5           # ... and before reopening an Ingest stream it ended that way
RESUME_BACK = 1024             # events a reopened stream re-sends: the gateway's chunks in flight and gRPC's buffers
# The gateway runs a user's deferred model steps when that user is next scored, so after a replay
# they may never run without more traffic: wait this long at most, then count what is applied.
CATCH_UP_WAIT_S = 10.0


# ----------------------------------------------------------------------------- the clickstream
def generate_log(path: Path, users: int, days: int, seed: int) -> int:
    """Write a generated clickstream (views, searches, carts, payments, ...) once; its event count."""
    path = Path(path)
    if not path.exists():
        from seqguard.training.generate import generate, write_events
        events, _ = generate(users, seed=seed, days=days)
        tmp = path.with_suffix(".partial.jsonl")
        write_events(events, tmp)
        tmp.rename(path)
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def load_streams(path: Path, n_streams: int) -> tuple[list[list], list[str]]:
    """The log's events as proto Events, split by user into n_streams groups in time order."""
    from seqguard.gateway.proto import risk_pb2
    from seqguard.schema import read_events
    groups: list[list] = [[] for _ in range(n_streams)]
    slot: dict[str, int] = {}
    for ev in read_events(str(path)):
        k = slot.setdefault(ev.user_id, len(slot) % n_streams)
        groups[k].append(risk_pb2.Event(**{f: v for f, v in ev._asdict().items() if v is not None}))
    return [g for g in groups if g], list(slot)


# ----------------------------------------------------------------------------- the two clients
async def ingest_pass(target: str, streams: list[list], max_s: float, timeout_s: float) -> dict:
    """One Ingest call per stream, all at once; each stops yielding after max_s. A stream the gateway
    ends with RESOURCE_EXHAUSTED (too many events in flight) is reopened after a pause from
    RESUME_BACK events before where it stopped: events it had taken but maybe not applied are sent
    again with the same event_id (the gateway answers those it applied from its idempotency record).
    Events a summary names as not applied (IngestSummary.not_applied_event_ids) are sent again once
    at the end; the re-sends count in the time."""
    import grpc
    from seqguard.gateway.proto import risk_pb2_grpc
    pos = [0] * len(streams)
    out = {"accepted": 0, "rejected": 0, "errors": [], "reopened": 0, "failed_streams": [],
           "not_applied": 0, "resent_not_applied": 0}
    missed: list[list[str]] = [[] for _ in streams]      # event ids a summary named as not applied
    stop_at = time.monotonic() + max_s

    async def events(k: int):
        while pos[k] < len(streams[k]) and time.monotonic() < stop_at:
            pos[k] += 1
            yield streams[k][pos[k] - 1]

    async def one(stub, k: int) -> None:
        while pos[k] < len(streams[k]) and time.monotonic() < stop_at:
            try:
                s = await stub.Ingest(events(k), timeout=timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    out["failed_streams"].append(f"{e.code().name}: {e.details()}")
                    return
                out["reopened"] += 1
                pos[k] = max(0, pos[k] - RESUME_BACK)
                await asyncio.sleep(REOPEN_SLEEP_S)
                continue
            out["accepted"] += s.accepted
            out["rejected"] += s.rejected
            out["not_applied"] += s.not_applied
            missed[k] += list(s.not_applied_event_ids)
            out["errors"] += list(s.errors)[:5 - len(out["errors"])] if len(out["errors"]) < 5 else []

    async def resend(stub, k: int) -> None:
        """Once, at the end, as a client would: the events the summary named, same event ids."""
        ids = set(missed[k])
        again = [ev for ev in streams[k][:pos[k]] if ev.event_id in ids]
        if again:
            s = await stub.Ingest(iter(again), timeout=timeout_s)
            out["resent_not_applied"] += len(again)
            out["accepted"] += s.accepted

    async with grpc.aio.insecure_channel(target) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        await asyncio.gather(*(one(stub, k) for k in range(len(streams))))
        await asyncio.gather(*(resend(stub, k) for k in range(len(streams))))
    out["sent"] = sum(pos)      # distinct events sent (re-sends not counted twice)
    return out


async def score_batch_pass(target: str, streams: list[list], batch: int, max_s: float, timeout_s: float) -> dict:
    """One worker per stream sending ScoreBatch requests of `batch` events, one at a time. Events
    answered without a sequence (DEGRADED: not applied, or applied after the deadline) are re-sent
    once at the end with the same event_id, as a client would: the gateway then applies those that
    were not and answers the others from its idempotency record. The re-sends count in the time."""
    import grpc
    from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
    counts = {"sent": 0, "ok": 0, "degraded": 0, "requests": 0, "resource_exhausted": 0, "resent": 0,
              "resent_unapplied": 0}
    details: Counter = Counter()                 # DEGRADED answers by the start of their status detail
    unapplied: list[list] = [[] for _ in streams]
    stop_at = time.monotonic() + max_s

    async def call(stub, events: list):
        req = risk_pb2.ScoreBatchRequest(events=events)
        while True:
            try:
                return await stub.ScoreBatch(req, timeout=timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                counts["resource_exhausted"] += 1      # nothing of it was applied: send it again
                await asyncio.sleep(RETRY_SLEEP_S)

    async def worker(stub, k: int) -> None:
        events = streams[k]
        for a in range(0, len(events), batch):
            if time.monotonic() >= stop_at:
                return
            chunk = events[a:a + batch]
            resp = await call(stub, chunk)
            counts["requests"] += 1
            counts["sent"] += len(chunk)
            for ev, r in zip(chunk, resp.results):
                counts["ok"] += r.status == risk_pb2.OK
                if r.status == risk_pb2.DEGRADED:
                    counts["degraded"] += 1
                    details[r.status_detail.split(":")[0]] += 1
                if r.sequence < 1:
                    unapplied[k].append(ev)

    async def resend(stub, k: int) -> None:
        for a in range(0, len(unapplied[k]), batch):
            resp = await call(stub, unapplied[k][a:a + batch])
            counts["resent"] += len(resp.results)
            counts["resent_unapplied"] += sum(r.sequence < 1 for r in resp.results)

    async with grpc.aio.insecure_channel(target) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        await asyncio.gather(*(worker(stub, k) for k in range(len(streams))))
        await asyncio.gather(*(resend(stub, k) for k in range(len(streams))))
    counts["degraded_details"] = dict(details.most_common(3))
    return counts


async def users_n_events(target: str, users: list[str], concurrency: int = 8, tries: int = 5) -> int:
    """Sum of n_events over the users, as the gateway reads it back from Redis. A read the gateway
    answers UNAVAILABLE (its Redis timeout, on a loaded machine) is asked again after a pause."""
    import grpc
    from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
    total, todo = 0, list(users)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)

        async def read(u: str) -> int:
            for attempt in range(tries):
                try:
                    st = await stub.GetUserState(risk_pb2.UserStateRequest(user_id=u), timeout=30)
                    return int(st.n_events)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == tries - 1:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))

        async def worker():
            nonlocal total
            while todo:
                n = await read(todo.pop())   # not `total += await ...`: that reads total before the
                total += n                   # await, and a concurrent worker's addition is lost
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


# ----------------------------------------------------------------------------- the encoder's side
COUNTERS = {"seqguard_local_encoder_steps_total": "local_steps", "seqguard_deferred_steps_total": "deferred_steps",
            "seqguard_caught_up_steps_total": "caught_up_steps", "seqguard_degraded_events_total": "degraded_events"}


def scrape_counters(url: str) -> dict | None:
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # loopback, never a proxy
    try:
        text = opener.open(url, timeout=5).read().decode()
    except OSError:
        return None
    out = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in COUNTERS:
            out[COUNTERS[name]] += float(line.rsplit(" ", 1)[1])
    return out


def process_alive(pid: int | None) -> bool | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


class EncoderWatch:
    """What the gateway's encoder did over a window, from its Prometheus counters: model steps the
    in-process standby computed because Triton timed out or was down, steps deferred, DEGRADED
    events; and whether the Triton process is still alive. A gateway with Triton under CPU pressure
    fails over to its standby (settings local_encoder_fallback) and keeps answering OK, so without
    this a "Triton" number could silently be a local-encoder number."""

    def __init__(self, metrics_url: str | None, triton_pid: int | None):
        self.url, self.triton_pid = metrics_url, triton_pid
        self._t0: dict | None = None

    def start(self) -> None:
        self._t0 = scrape_counters(self.url) if self.url else None

    def wait_caught_up(self, timeout_s: float) -> tuple[float, bool | None]:
        """Wait until the steps deferred since start() have run (deferred == caught up over the
        window; steps deferred before a FLUSHALL never will): only then is every user's state
        applied. (seconds waited, caught up?)."""
        t0 = time.monotonic()
        while self.url and self._t0 and time.monotonic() - t0 < timeout_s:
            c = scrape_counters(self.url)
            if c is None:
                break
            if c["deferred_steps"] - self._t0["deferred_steps"] <= c["caught_up_steps"] - self._t0["caught_up_steps"]:
                return time.monotonic() - t0, True
            time.sleep(0.2)
        return time.monotonic() - t0, (False if self.url and self._t0 else None)

    def stop(self) -> dict:
        t1 = scrape_counters(self.url) if self.url else None
        out = {k: int(t1[k] - self._t0[k]) for k in t1} if t1 and self._t0 else {}
        out["triton_alive"] = process_alive(self.triton_pid)
        return out


# ----------------------------------------------------------------------------- one measured pass
def run_pass(kind: str, target: str, redis_port: int, streams: list[list], users: list[str], *,
             max_s: float, batch: int, groups: dict | None = None, profile=None,
             watch: EncoderWatch | None = None) -> dict:
    """Flush Redis, push the log through `kind` (ingest | score_batch), count what was applied.

    profile: an optional callable(seconds) -> stop() started with the pass (bench.profile)."""
    import redis
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        r.flushall(asynchronous=False)
        meter = CpuMeter(groups) if groups else None
        if meter:
            meter.start()
        prof = profile(max_s) if profile else None
        if watch:
            watch.start()
        t0 = time.monotonic()
        if kind == "ingest":
            res = asyncio.run(ingest_pass(target, streams, max_s, max_s + 120))
        else:
            res = asyncio.run(score_batch_pass(target, streams, batch, max_s, 60.0))
        wall = time.monotonic() - t0
        if watch:       # deferred steps still to run: the state is not applied until they have
            waited, res["caught_up"] = watch.wait_caught_up(CATCH_UP_WAIT_S)
            if res["caught_up"]:
                res["caught_up_wait_s"] = waited
                wall += waited
        if prof:
            res["profile"] = prof()
        cpu = meter.stop() if meter else {}
        if watch:
            res["encoder"] = watch.stop()
        res["applied_in_redis"] = int(r.get("sg:seq") or 0)
    finally:
        r.close()
    res["user_n_events"] = asyncio.run(users_n_events(target, users))
    res.update(kind=kind, wall_s=wall, streams=len(streams), users=len(users),
               events_per_s=res["applied_in_redis"] / wall if wall > 0 else None,
               all_applied=res["applied_in_redis"] == res["sent"] == res["user_n_events"],
               cpu_ms_per_event={k: v * 1000 / max(1, res["applied_in_redis"]) for k, v in cpu.items()})
    if kind == "score_batch":
        res["batch"] = batch
    return res


def format_pass(r: dict) -> str:
    return (f"{r['kind']}: {r['applied_in_redis']:,} of {r['sent']:,} sent applied (users' n_events "
            f"{r['user_n_events']:,}) in {r['wall_s']:.1f} s = {r['events_per_s']:,.0f} events/s")


# ----------------------------------------------------------------------------- score-file
def score_file(model: Path, log_path: Path, out_dir: Path, events: int) -> dict:
    """`seqguard score-file` on the log in a child process: wall, CPU and peak RSS (wait4's rusage)."""
    exe = shutil.which("seqguard", path=str(Path(sys.executable).parent))
    argv = ([exe] if exe else [sys.executable, "-m", "seqguard.cli"]) + [
        "score-file", "--model", str(model), "--input", str(log_path), "--output", str(out_dir / "scores.csv"),
        "--quiet"]
    t0 = time.monotonic()
    with open(out_dir / "score_file.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=logf)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rows = 0
    if proc.returncode == 0:
        with open(out_dir / "scores.csv", "rb") as f:
            rows = sum(1 for _ in f) - 1            # minus the header
        (out_dir / "scores.csv").unlink()
    cpu = ru.ru_utime + ru.ru_stime
    return {"argv": argv, "returncode": proc.returncode, "events": events, "rows": rows, "wall_s": wall,
            "cpu_s": cpu, "peak_rss_mb": ru.ru_maxrss / 1024, "events_per_s": rows / wall if wall else None,
            "events_per_cpu_s": rows / cpu if cpu else None}


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True, type=Path)
    ap.add_argument("--target", default="", help="gateway host:port (Ingest and ScoreBatch passes)")
    ap.add_argument("--redis-port", type=int, default=0, help="that gateway's Redis (it is FLUSHED)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--score-file", action="store_true")
    ap.add_argument("--model", type=Path)
    a = ap.parse_args(argv)
    out = {}
    if a.target:
        streams, users = load_streams(a.log, a.streams)
        for kind in ("ingest", "score_batch"):
            out[kind] = run_pass(kind, a.target, a.redis_port, streams, users, max_s=a.max_seconds, batch=a.batch)
            print(format_pass(out[kind]), file=sys.stderr)
    if a.score_file:
        with open(a.log, "rb") as f:
            n = sum(1 for _ in f)
        out["score_file"] = score_file(a.model, a.log, a.log.parent, n)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
