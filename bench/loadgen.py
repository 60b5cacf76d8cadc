"""Open-loop gRPC load generator for seqguard.v1.RiskScoring/Score.

Open loop: request k has a scheduled send time fixed before the run (Poisson arrivals by
default, or a uniform schedule) and is sent then whatever happened to earlier requests; its
latency is measured from the SCHEDULED time, not from when the client got round to sending
it, so a stalled server (or client) shows up in the tail instead of silently lowering the
offered rate ("coordinated omission").

* Client processes (multiprocessing, spawn): each runs its own asyncio loop with several
  grpc.aio channels (separate TCP connections) and sends rate / N of the traffic, so the
  client never shares an event loop with the server, nor one loop with itself at high rates.
* Requests are real Score calls built from an event log (JSONL/CSV/Parquet, schema v1): users
  are split between client processes and taken round-robin; each user's events are sent in
  their own order. Every event_id is rewritten to "<id>.<tag><cycle>" (tag: random per load
  generator) so ids stay unique across repeats and runs (the gateway answers a re-sent id
  from its dedupe cache, which would flatter it); when a user's events run out they start
  again with ts shifted forward by the log's time span, so each user's time keeps moving
  forward (the cursor persists across rate steps).
* A warm-up period (sent, not counted) precedes the measured window.
* Reports: offered and achieved rate, latency p50/p90/p99/p99.9/max, gRPC errors by status
  code, DEGRADED responses, and the client's own send lag: if the client could not send on
  schedule (> 1% of sends over 5 ms late, or a backlog of 50 ms at the end) it says so
  (client_behind) rather than quietly offering less load. Lateness is charged to latency anyway.

    python -m bench.loadgen --target 127.0.0.1:50051 --events data/test5k.jsonl --rate 500 \
        --duration 10 --warmup 3 [--clients 2] [--channels 4] [--arrival poisson|uniform]
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import secrets
import sys
import time
import traceback
from collections import Counter

import numpy as np

METHOD = "/seqguard.v1.RiskScoring/Score"
DAY_MS = 86_400_000
REPLAY_YEARS = 20              # see UserStreams.from_log
LATE_S = 0.005                 # a send this late counts as "late"
BEHIND_LATE_FRAC = 0.01        # client_behind when more than this fraction of sends are late ...
BEHIND_END_LAG_S = 0.050       # ... or the last send of a client left this late (a growing backlog)
UNFINISHED = -1                # pseudo status code: no answer by the end of the drain


def status_names() -> dict[int, str]:
    import grpc
    names = {sc.value[0]: sc.name for sc in grpc.StatusCode}
    names[UNFINISHED] = "UNFINISHED"
    return names


# ----------------------------------------------------------------------------- requests
class UserStreams:
    """The request sequence of one client process: its share of the users, round-robin."""

    def __init__(self, users: list[tuple[str, list[dict]]], period_ms: int, tag: str):
        if not users:
            raise ValueError("no users for this client")
        self.users = users
        self.period_ms = period_ms
        self.tag = tag
        self.pos = [0] * len(users)
        self.cycle = [0] * len(users)
        self.rr = 0
        self.wrapped = 0

    @classmethod
    def from_log(cls, path: str, part: int = 0, parts: int = 1, tag: str | None = None,
                 max_users: int = 0) -> "UserStreams":
        from seqguard.schema import read_events
        by_user: dict[str, list[dict]] = {}      # only this client's users (first-appearance order)
        index: dict[str, int] = {}
        t_min = t_max = None
        for ev in read_events(path):
            i = index.get(ev.user_id)
            if i is None:
                i = index[ev.user_id] = len(index)
            t_min = ev.ts if t_min is None else min(t_min, ev.ts)
            t_max = ev.ts if t_max is None else max(t_max, ev.ts)
            if i % parts != part or (max_users and i >= max_users):
                continue
            by_user.setdefault(ev.user_id, []).append({k: v for k, v in ev._asdict().items() if v is not None})
        if t_min is None:
            raise ValueError(f"{path}: no events")
        # A user whose events run out starts over one period later (next_payload). Replayed as logged,
        # a short history wraps dozens of times in a sweep and would walk past the gateway's clock
        # into its future-skew bound (INVALID_ARGUMENT): the log is moved to start REPLAY_YEARS ago,
        # which the gateway accepts (no past bound by default).
        shift = int(time.time() * 1000) - REPLAY_YEARS * 365 * DAY_MS - t_min
        users = list(by_user.items())
        for _, evs in users:
            evs.sort(key=lambda d: d["ts"])       # stable: file order among equal ts
            for d in evs:
                d["ts"] += shift
        period = (t_max - t_min) + DAY_MS
        return cls(users, period, tag or secrets.token_hex(3))

    def next_payload(self) -> bytes:
        from seqguard.gateway.proto import risk_pb2
        i = self.rr
        self.rr = (i + 1) % len(self.users)
        _, evs = self.users[i]
        p, c = self.pos[i], self.cycle[i]
        d = dict(evs[p])
        d["event_id"] = f"{d['event_id']}.{self.tag}{c}"    # unique: the gateway dedupes event ids
        if c:
            d["ts"] = d["ts"] + c * self.period_ms
        p += 1
        if p == len(evs):
            p = 0
            self.cycle[i] += 1
            self.wrapped += 1
        self.pos[i] = p
        return risk_pb2.ScoreRequest(event=risk_pb2.Event(**d)).SerializeToString()


def n_users(path: str, max_users: int = 0) -> int:
    from seqguard.schema import read_events
    n = len({ev.user_id for ev in read_events(path)})
    return min(n, max_users) if max_users else n


def schedule_offsets(rate_per_client: float, total_s: float, arrival: str, part: int, parts: int,
                     seed: int) -> np.ndarray:
    """Seconds after the start at which this client sends, for [0, total_s)."""
    if rate_per_client <= 0:
        return np.zeros(0)
    if arrival == "uniform":
        step = 1.0 / rate_per_client
        off = (np.arange(int(total_s * rate_per_client) + 1) + part / parts) * step
    elif arrival == "poisson":
        rng = np.random.default_rng(seed)
        n = int(total_s * rate_per_client * 1.3) + 64
        off = np.cumsum(rng.exponential(1.0 / rate_per_client, n))
        while off[-1] < total_s:
            off = np.concatenate([off, off[-1] + np.cumsum(rng.exponential(1.0 / rate_per_client, n))])
    else:
        raise ValueError(f"arrival must be poisson or uniform, got {arrival!r}")
    return off[off < total_s]


# ----------------------------------------------------------------------------- client process
class _Client:
    def __init__(self, channels, calls):
        self.channels, self.calls = channels, calls

    @classmethod
    async def connect(cls, target: str, n_channels: int, part: int) -> "_Client":
        import grpc

        from seqguard.gateway.proto import risk_pb2
        channels, calls = [], []
        for j in range(n_channels):
            # a local subchannel pool + a distinct arg: one TCP connection per channel
            ch = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                            ("seqguard.bench.channel", part * 1000 + j)])
            await asyncio.wait_for(ch.channel_ready(), 20)
            channels.append(ch)
            calls.append(ch.unary_unary(METHOD, request_serializer=None,
                                        response_deserializer=risk_pb2.ScoreResponse.FromString))
        return cls(channels, calls)

    async def close(self):
        for ch in self.channels:
            await ch.close()

    async def run_step(self, streams: UserStreams, *, rate: float, parts: int, part: int, start_at: float,
                       warmup: float, duration: float, arrival: str, seed: int, timeout_s: float) -> dict:
        import grpc

        from seqguard.gateway.proto import risk_pb2
        DEGRADED = risk_pb2.DEGRADED
        total = warmup + duration
        off = schedule_offsets(rate / parts, total, arrival, part, parts, seed)
        n = len(off)
        payloads = [streams.next_payload() for _ in range(n)]
        sched = start_at + off
        lat = np.full(n, np.nan)
        done = np.full(n, np.nan)
        code = np.full(n, UNFINISHED, np.int16)
        degraded = np.zeros(n, bool)
        lag = np.zeros(n)
        calls = self.calls
        nch = len(calls)
        loop = asyncio.get_running_loop()
        pending: set = set()
        mono = time.monotonic

        async def one(i: int, t_sched: float) -> None:
            try:
                resp = await calls[i % nch](payloads[i], timeout=timeout_s)
                t = mono()
                code[i] = 0
                degraded[i] = resp.status == DEGRADED
            except grpc.aio.AioRpcError as e:
                t = mono()
                code[i] = e.code().value[0]
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - counted as UNKNOWN, never kills the run
                t = mono()
                code[i] = grpc.StatusCode.UNKNOWN.value[0]
            done[i] = t
            lat[i] = t - t_sched

        burst = 0
        for i in range(n):
            t = sched[i]
            d = t - mono()
            if d > 0.0002:
                await asyncio.sleep(d - 0.0001)     # waking takes ~0.1-0.2 ms
                burst = 0
            else:
                burst += 1
                if burst % 16 == 0:          # behind schedule: still let responses in
                    await asyncio.sleep(0)
            lag[i] = mono() - t
            task = loop.create_task(one(i, t))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(set(pending), timeout=timeout_s + 1.0)
        for task in list(pending):
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        w0, w1 = start_at + warmup, start_at + total
        win = (sched >= w0) & (sched < w1)
        ok_done_in_window = int(np.sum((code == 0) & (done >= w0) & (done < w1)))
        return {"pid": os.getpid(), "lat": lat[win], "code": code[win], "degraded": degraded[win],
                "lag": lag[win], "ok_done_in_window": ok_done_in_window, "sent_total": n,
                "send_end_lag": float(lag[-1]) if n else 0.0, "wrapped_users": streams.wrapped}


def _client_main(conn, target: str, events_path: str, part: int, parts: int, n_channels: int, tag: str,
                 max_users: int) -> None:
    try:
        streams = UserStreams.from_log(events_path, part, parts, tag, max_users)
        # select(2) takes a microsecond timeout; epoll (asyncio's default) rounds every sleep UP to
        # the next millisecond, which alone made sends ~0.7 ms late (p99 2 ms) on these machines
        import selectors
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        asyncio.set_event_loop(loop)
        client = loop.run_until_complete(_Client.connect(target, n_channels, part))
        conn.send(("ready", {"pid": os.getpid(), "users": len(streams.users)}))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            res = loop.run_until_complete(client.run_step(streams, **msg[1]))
            conn.send(("result", res))
        loop.run_until_complete(client.close())
        loop.close()
    except (KeyboardInterrupt, EOFError):
        pass
    except BaseException:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


# ----------------------------------------------------------------------------- parent side
def percentiles_ms(lat_s: np.ndarray) -> dict:
    if len(lat_s) == 0:
        return {k: None for k in ("p50", "p90", "p99", "p999", "max", "mean")}
    ms = lat_s * 1000.0
    p = np.percentile(ms, [50, 90, 99, 99.9], method="higher")
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "p999": float(p[3]),
            "max": float(ms.max()), "mean": float(ms.mean())}


class LoadGenerator:
    """Client processes connected to one target; run() one fixed-rate step at a time."""

    def __init__(self, target: str, events_path: str, clients: int = 2, channels: int = 4,
                 timeout_s: float = 1.0, arrival: str = "poisson", max_users: int = 0, seed: int = 0):
        self.target, self.events_path = target, events_path
        self.clients, self.channels = clients, channels
        self.timeout_s, self.arrival, self.max_users, self.seed = timeout_s, arrival, max_users, seed
        self.tag = secrets.token_hex(3)
        self.procs: list = []
        self.conns: list = []
        self.pids: list[int] = []
        self.users = 0
        self._step = 0

    def start(self) -> "LoadGenerator":
        ctx = mp.get_context("spawn")      # no fork: grpc and fork do not mix
        users = n_users(self.events_path, self.max_users)
        self.clients = max(1, min(self.clients, users))
        for part in range(self.clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_main, name=f"loadgen-{part}", daemon=True,
                            args=(child, self.target, self.events_path, part, self.clients, self.channels,
                                  self.tag, self.max_users))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        for c in self.conns:
            kind, info = self._recv(c, 120)
            if kind != "ready":
                self.close()
                raise RuntimeError(f"load generator client failed to start:\n{info}")
            self.pids.append(info["pid"])
            self.users += info["users"]
        return self

    def _recv(self, conn, timeout: float):
        if not conn.poll(timeout):
            raise RuntimeError(f"load generator client did not answer within {timeout:.0f} s")
        return conn.recv()

    def run(self, rate: float, duration: float, warmup: float, meters=(), lead_s: float | None = None) -> dict:
        """One step at `rate` req/s: warm-up then a measured window of `duration` s.

        `meters`: objects with start()/stop() (e.g. cpu.CpuMeter), started and stopped exactly
        around the measured window.
        """
        self._step += 1
        total = warmup + duration
        per_client = rate * total / self.clients
        lead = lead_s if lead_s is not None else 0.5 + per_client * 40e-6   # time to build payloads
        start_at = time.monotonic() + lead
        for part, c in enumerate(self.conns):
            c.send(("step", {"rate": rate, "parts": self.clients, "part": part, "start_at": start_at,
                             "warmup": warmup, "duration": duration, "arrival": self.arrival,
                             "seed": self.seed * 1_000_003 + self._step * 101 + part,
                             "timeout_s": self.timeout_s}))
        meter_out = []
        if meters:
            time.sleep(max(0.0, start_at + warmup - time.monotonic()))
            for m in meters:
                m.start()
            time.sleep(max(0.0, start_at + total - time.monotonic()))
            meter_out = [m.stop() for m in meters]
        results = []
        for c in self.conns:
            kind, res = self._recv(c, total + lead + self.timeout_s + 60)
            if kind != "result":
                raise RuntimeError(f"load generator client failed:\n{res}")
            results.append(res)
        out = self.merge(results, rate, duration, warmup)
        out["meters"] = meter_out
        return out

    def merge(self, results: list[dict], rate: float, duration: float, warmup: float) -> dict:
        lat = np.concatenate([r["lat"] for r in results])
        code = np.concatenate([r["code"] for r in results])
        degraded = np.concatenate([r["degraded"] for r in results])
        lag = np.concatenate([r["lag"] for r in results])
        names = status_names()
        ok = code == 0
        errors = Counter(names.get(int(c), str(int(c))) for c in code[~ok])
        lag_p = np.percentile(lag, [50, 99], method="higher") if len(lag) else np.zeros(2)
        late_frac = float(np.mean(lag > LATE_S)) if len(lag) else 0.0
        end_lag = max((r["send_end_lag"] for r in results), default=0.0)
        behind = bool(late_frac > BEHIND_LATE_FRAC or end_lag > BEHIND_END_LAG_S)
        return {
            "target_rps": rate, "duration_s": duration, "warmup_s": warmup, "arrival": self.arrival,
            "clients": self.clients, "channels_per_client": self.channels, "users": self.users,
            "requests": int(len(code)),
            "offered_rps": len(code) / duration,
            "achieved_rps": sum(r["ok_done_in_window"] for r in results) / duration,
            "ok": int(ok.sum()), "degraded": int(degraded[ok].sum()),
            "errors": dict(errors), "n_errors": int((~ok).sum()),
            "latency_ms": percentiles_ms(lat[ok]),
            "send_lag_ms": {"p50": float(lag_p[0] * 1000), "p99": float(lag_p[1] * 1000),
                            "max": float(lag.max() * 1000) if len(lag) else 0.0,
                            "end": end_lag * 1000},
            "late_frac": late_frac, "client_behind": behind,
            "wrapped_users": sum(r["wrapped_users"] for r in results),
        }

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        self.procs, self.conns = [], []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def format_step(r: dict) -> str:
    lat = r["latency_ms"]
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    errs = ",".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "0"
    s = (f"offered {r['offered_rps']:.0f}/s achieved {r['achieved_rps']:.0f}/s  p50 {f(lat['p50'])} "
         f"p99 {f(lat['p99'])} p99.9 {f(lat['p999'])} max {f(lat['max'])} ms  errors {errs}  "
         f"degraded {r['degraded']}  send lag p99 {r['send_lag_ms']['p99']:.2f} ms")
    if r["client_behind"]:
        s += "  CLIENT BEHIND SCHEDULE"
    return s


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="open-loop gRPC load generator for seqguard.v1.RiskScoring/Score")
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--events", required=True, help="event log (JSONL/CSV/Parquet, schema v1)")
    ap.add_argument("--rate", type=float, action="append", required=True, help="req/s (repeat for a sweep)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels per client process")
    ap.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    ap.add_argument("--timeout", type=float, default=1.0, help="per-call gRPC deadline, s")
    ap.add_argument("--max-users", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per step")
    a = ap.parse_args(argv)
    with LoadGenerator(a.target, a.events, a.clients, a.channels, a.timeout, a.arrival, a.max_users) as lg:
        for rate in a.rate:
            r = lg.run(rate, a.duration, a.warmup)
            print(json.dumps(r) if a.json else f"{rate:>7.0f}/s  {format_step(r)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
