"""The benchmark, one command, one table: every figure of issue 22 measured in the same run.

    python -m bench.run --model DIR --events FILE [--rates 25,50,100,...] [--duration 8] [--warmup 2]
                        [--triton-url H:P --triton-model NAME] [--systems echo,gateway,gateway_local,naive]
                        [--bulk-systems ...] [--replay-users N --replay-days D] [--no-score-file] [--quick]
                        [--only bulk]

For each system (each in its own process, its server CPU metered from /proc):
  * echo     bench/echo_server.py   constant answer, the ceiling of Python gRPC here
  * gateway  bench/gateway_server.py  Redis + Triton + gateway (gateway.up.LocalStack), or the
             gateway + Redis against an external Triton (--triton-url, e.g. a GPU one)
  * gateway_local  the same gateway + Redis with SEQGUARD_ENCODER=local (ONNX Runtime in-process)
  * naive    bench/naive_service.py   per-request full-window torch + sklearn, no batching
it sweeps the arrival rates upwards with bench/loadgen.py (client processes, Poisson arrivals,
latency from the scheduled send time) and stops once a step fails (p99 > --p99-ms, any gRPC
error or DEGRADED answer) --max-fails times in a row or --max-sweep-s is spent. Then, for the
gateways: one step at half the sustained rate (the p50 target), Redis memory per user, the
Ingest / ScoreBatch replay of a generated clickstream (bench/throughput.py), py-spy profiles
under Score and ScoreBatch load (bench/profile.py) and perf_analyzer against Triton. Last,
`seqguard score-file` on a larger generated log. bench/table.py renders the one table.

Writes bench/results/<timestamp>/{results.json, results.md, logs, profiles} and prints the Markdown;
`python -m bench.run --render DIR` rebuilds the report of a finished run from its results.json.
--quick: one low rate per system, seconds-long steps, a tiny replay (a smoke test for CI; numbers
meaningless). --only bulk: only the Ingest / ScoreBatch replay of each --bulk-systems gateway (no
Score sweep, profiles, perf_analyzer or score-file), to compare bulk passes between two builds.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from .cpu import CpuMeter
from .loadgen import LoadGenerator, format_step
from .procs import ROOT, ServerProcess
from .table import headline
from .throughput import EncoderWatch

SYSTEMS = ("echo", "gateway", "gateway_local", "naive")
DEFAULT_RATES = "25,50,100,200,300,400,500,600,800,1000,1200,1400,1600,2000,2400,3200,4000"
TARGETS = {"rate_vs_echo": 0.7, "p50_half_rate_ms": 2.0, "rate_vs_naive": 5.0, "kept_pace_vs_naive": 5.0,
           "cpu_vs_echo": 2.0,
           "redis_bytes_per_user": 2048}


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        import grpc
        grpc_v = grpc.__version__
    except ImportError:
        grpc_v = ""
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
            "mem_gib": round(mem_kb / 1024 / 1024, 1), "loadavg_at_start": list(os.getloadavg()),
            "kernel": platform.release(), "python": platform.python_version(), "grpcio": grpc_v,
            "hostname": platform.node()}


# ----------------------------------------------------------------------------- servers
def server_process(system: str, a, out_dir: Path) -> ServerProcess:
    py = sys.executable
    if system == "echo":
        argv = [py, "-m", "bench.echo_server", "--port", "0"]
    elif system == "naive":
        argv = [py, "-m", "bench.naive_service", "--model", str(a.model), "--port", "0",
                "--window", str(a.naive_window), "--threads", str(a.naive_threads)]
    elif system == "gateway_local":         # the same gateway with the model on ONNX Runtime in-process
        argv = [py, "-m", "bench.gateway_server", "--model", str(a.model), "--run-dir",
                str(out_dir / "gateway_local_run"), "--set", "encoder=local"]
        for kv in a.gateway_set:
            argv += ["--set", kv]
    elif system == "gateway":
        argv = [py, "-m", "bench.gateway_server", "--model", str(a.model), "--run-dir", str(out_dir / "gateway_run")]
        if a.triton_url:
            argv += ["--triton-url", a.triton_url]
            if a.triton_model:
                argv += ["--triton-model", a.triton_model]
        for kv in a.gateway_set:
            argv += ["--set", kv]
    else:
        raise ValueError(system)
    metrics_url = None
    if system.startswith("gateway"):         # its counters say when the standby encoder took over
        from seqguard.services import free_port
        port = free_port()
        argv += ["--set", f"metrics_port={port}"]
        metrics_url = f"http://127.0.0.1:{port}/metrics"
    srv = ServerProcess(system, argv, out_dir / "logs" / f"{system}.log")
    srv.metrics_url = metrics_url
    return srv


def cpu_groups(system: str, info: dict) -> dict:
    pid = info["pid"]
    groups = {"server": ([pid], True)}            # the whole tree: gateway + redis + triton (+ stubs)
    if system.startswith("gateway"):
        groups["gateway"] = ([pid], False)        # the gateway process alone (all its threads)
        if info.get("redis_pid"):
            groups["redis"] = ([info["redis_pid"]], True)
        if info.get("triton_pid"):
            groups["triton"] = ([info["triton_pid"]], True)
    return groups


# ----------------------------------------------------------------------------- redis memory
KEY_KINDS = {"u": "user", "d": "device", "i": "ip", "p": "ip_prefix", "e": "dedupe"}


def expire_entities_by_event_time(r) -> int:
    """A replay pushes weeks of events through in minutes, so no TTL fires during it. Live, a device /
    IP / prefix key lives ENTITY_TTL_S after its last event (gateway/state.py): delete the entity keys
    that a live system would already have let expire at the replay's last event time (read from each
    context's last_ts), so the figure is what a real-time deployment holds. Returns how many."""
    from seqguard.featurizer import EntityContext
    from seqguard.gateway.state import ENTITY_TTL_S
    last_ts = {}
    for kind in ("d", "i", "p"):
        for key in r.scan_iter(match=f"sg:{kind}:*", count=2000):
            raw = r.get(key)
            if raw:
                last_ts[key] = EntityContext.from_bytes(raw).last_ts
    if not last_ts:
        return 0
    horizon = max(last_ts.values()) - ENTITY_TTL_S * 1000
    stale = [k for k, ts in last_ts.items() if ts < horizon]
    for a in range(0, len(stale), 1000):
        r.delete(*stale[a:a + 1000])
    return len(stale)


def redis_memory(port: int) -> dict:
    """Memory of the gateway's keys, measured by deleting them (call it at the end of the sweep).

    used_memory with everything, after deleting the idempotency keys (sg:e:*, one per answered
    event, kept dedupe_ttl_s), and after FLUSHALL SYNC. Differences, not absolute values, so
    connection buffers and the allocator's baseline are not counted:
      state per user   = (users + devices/IPs/prefixes) / users   -- what grows with users
      dedupe per event = sg:e:* / their count                     -- what grows with rate x TTL
    MEMORY USAGE of up to 200 keys per kind is reported alongside.
    """
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        expired = expire_entities_by_event_time(r)
        counts, avg, dedupe_keys = {}, {}, []
        for k, name in KEY_KINDS.items():
            sample, n = [], 0
            for key in r.scan_iter(match=f"sg:{k}:*", count=2000):
                n += 1
                if len(sample) < 200:
                    sample.append(key)
                if k == "e":
                    dedupe_keys.append(key)
            counts[name] = n
            sizes = [r.memory_usage(key, samples=0) or 0 for key in sample]
            avg[name] = (sum(sizes) / len(sizes)) if sizes else None
        used_all = int(r.info("memory")["used_memory"])
        for a in range(0, len(dedupe_keys), 1000):
            r.delete(*dedupe_keys[a:a + 1000])
        used_state = int(r.info("memory")["used_memory"])
        # the rest: the alerts and outcomes streams (trimmed by count, alerts_max, not per user) and
        # counters; measured and removed apart so the user + entity state stands alone
        others = {}
        for key in r.scan_iter(match="sg:*", count=2000):
            name = key.decode()
            if name.split(":")[1] not in KEY_KINDS:
                others[name] = {"bytes": r.memory_usage(key, samples=0) or 0, "type": r.type(key).decode(),
                                "entries": r.xlen(key) if r.type(key) == b"stream" else None}
        if others:
            r.delete(*others)
        used_users_entities = int(r.info("memory")["used_memory"])
        r.flushall(asynchronous=False)
        used_empty = int(r.info("memory")["used_memory"])
    finally:
        r.close()
    users, n_e = counts["user"], counts["dedupe"]
    return {"used_memory": used_all, "used_memory_without_dedupe": used_state, "used_memory_after_flush": used_empty,
            "delta_bytes": used_all - used_empty, "state_bytes": used_state - used_empty,
            "dedupe_bytes": used_all - used_state, "keys": counts, "avg_key_bytes": avg,
            "bytes_per_user": (used_state - used_empty) / users if users else None,
            "user_entity_bytes_per_user": (used_users_entities - used_empty) / users if users else None,
            "other_keys": others,
            "entity_keys_expired_by_event_time": expired,
            "all_bytes_per_user": (used_all - used_empty) / users if users else None,
            # below ~1000 keys the difference drowns in used_memory noise (it can come out negative)
            "dedupe_bytes_per_event": (used_all - used_state) / n_e if n_e >= 1000 else None}


# ----------------------------------------------------------------------------- sweep
def passed(step: dict, p99_ms: float) -> bool:
    p99 = step["latency_ms"]["p99"]
    return (step["ok"] > 0 and step["n_errors"] == 0 and step["degraded"] == 0
            and p99 is not None and p99 <= p99_ms)


def run_step(lg: LoadGenerator, rate: float, a, groups: dict, watch: EncoderWatch | None = None) -> dict:
    server_meter = CpuMeter(groups)
    client_meter = CpuMeter({"client": (lg.pids, True)})
    if watch:
        watch.start()
    r = lg.run(rate, a.duration, a.warmup, meters=[server_meter, client_meter])
    if watch:
        r["encoder"] = watch.stop()
    server_cpu, client_cpu = r.pop("meters")
    done = max(1.0, r["achieved_rps"] * a.duration)         # answers inside the metered window
    r["cpu_s"] = server_cpu
    r["cpu_ms_per_req"] = {k: v * 1000 / done for k, v in server_cpu.items()}
    r["client_cpu_ms_per_req"] = client_cpu["client"] * 1000 / done
    r["cpu_window_s"] = server_meter.wall_s
    r["passed"] = passed(r, a.p99_ms)
    return r


def sweep_rates(system: str, lg: LoadGenerator, a, rates: list[float], groups: dict, res: dict,
                watch: EncoderWatch | None) -> None:
    """The open-loop sweep upwards until --max-fails steps in a row fail (or the system's time budget is
    spent), then, if it stopped below --cpu-rate while still keeping pace, a CPU step there."""
    fails, t0 = 0, time.monotonic()
    for rate in rates:
        if res["steps"] and time.monotonic() - t0 > a.max_sweep_s:
            log(f"[{system}] sweep budget of {a.max_sweep_s:.0f} s spent; stopping before {rate:.0f}/s")
            res["sweep_budget_hit"] = rate
            break
        r = run_step(lg, rate, a, groups, watch)
        res["steps"].append(r)
        log(f"[{system}] {rate:>6.0f}/s {'ok  ' if r['passed'] else 'FAIL'} {format_step(r)}  "
            f"cpu {r['cpu_ms_per_req']['server']:.3f} ms/req{format_encoder(r.get('encoder'))}")
        fails = 0 if r["passed"] else fails + 1
        if fails >= a.max_fails:
            break
    last = res["steps"][-1] if res["steps"] else None
    if (a.quick or last is None or last["target_rps"] >= a.cpu_rate or not kept_up(last)
            or (last["latency_ms"]["p99"] or 0) > 5 * a.p99_ms):
        return
    # The latency sweep stopped below the CPU rate although the server still kept pace (it missed
    # the p99 bound, not throughput): measure CPU at the CPU rate anyway, or at half of it. Not for
    # a server already queueing (p99 > 5x the bound): an overloaded run would only pile up a backlog.
    for rate in (a.cpu_rate, round(a.cpu_rate / 2)):
        if rate <= last["target_rps"]:
            break
        r = run_step(lg, rate, a, groups, watch)
        r["cpu_only"] = True
        res.setdefault("cpu_steps", []).append(r)
        log(f"[{system}] {rate:>6.0f}/s (CPU step) {'kept up' if kept_up(r) else 'fell behind'} "
            f"{format_step(r)}  cpu {r['cpu_ms_per_req']['server']:.3f} ms/req")
        if kept_up(r):
            break


def profile_score(system: str, lg: LoadGenerator, a, info: dict, groups: dict, res: dict, out_dir: Path,
                  watch: EncoderWatch | None) -> None:
    """One more Score step at the CPU rate (or the highest rate kept below it) with py-spy on the gateway."""
    from .profile import record
    cs = cpu_step(res["steps"] + res.get("cpu_steps", []), a.cpu_rate)
    if cs is None:
        return
    stop = record(info["pid"], a.duration + a.warmup, out_dir / "profiles" / f"{system}-score.txt")
    if stop is None:
        res["profile_score"] = {"error": "py-spy not installed (pip install py-spy)"}
        return
    r = run_step(lg, cs["target_rps"], a, groups, watch)
    res["profile_score"] = {"rate": cs["target_rps"], "step": r, **stop()}
    log(f"[{system}] profiled a Score step at {cs['target_rps']:.0f}/s: {res['profile_score'].get('samples')} samples")


def sweep_system(system: str, a, rates: list[float], out_dir: Path) -> dict:
    srv = server_process(system, a, out_dir)
    t0 = time.monotonic()
    info = srv.start()
    log(f"[{system}] ready on 127.0.0.1:{info['port']} in {time.monotonic() - t0:.1f} s (pid {info['pid']})")
    res: dict = {"system": system, "server": info, "steps": []}
    groups = cpu_groups(system, info)
    watch = EncoderWatch(srv.metrics_url, info.get("triton_pid")) if system.startswith("gateway") else None
    lg = None
    try:
        if a.only == "bulk":
            res["bulk"] = bulk_passes(system, a, info, groups, out_dir, watch)
            return res
        lg = LoadGenerator(f"127.0.0.1:{info['port']}", str(a.events), a.clients, a.channels, a.timeout,
                           a.arrival, a.max_users, seed=a.seed).start()
        res["load"] = {"clients": lg.clients, "channels_per_client": a.channels, "users": lg.users,
                       "arrival": a.arrival, "timeout_s": a.timeout}
        sweep_rates(system, lg, a, rates, groups, res, watch)
        best = sustained_step(res["steps"])
        if system == "gateway" and best is not None and not a.quick:
            half = max(1.0, round(best["target_rps"] / 2))
            r = run_step(lg, half, a, groups, watch)
            res["half_rate_step"] = r
            log(f"[{system}] {half:>6.0f}/s (half of sustained) {format_step(r)}")
        if system in a.profile_systems:
            profile_score(system, lg, a, info, groups, res, out_dir, watch)
        if system.startswith("gateway") and info.get("redis_port"):
            res["redis"] = redis_memory(info["redis_port"])
            m = res["redis"]
            log(f"[{system}] redis: {m['keys']} keys; state {(m['bytes_per_user'] or 0):.0f} B per user, "
                f"idempotency {_f(m['dedupe_bytes_per_event'], '{:.0f}', 'n/a (< 1000 keys)')} B per event")
        lg.close()
        if system in a.bulk_systems and info.get("redis_port"):
            try:
                res["bulk"] = bulk_passes(system, a, info, groups, out_dir, watch)
            except Exception as e:  # noqa: BLE001 - a failed replay must not lose the rest of the run
                log(f"[{system}] replay failed: {type(e).__name__}: {e}")
                res["bulk_error"] = f"{type(e).__name__}: {e}"
        if system == "gateway" and not a.no_perf and info.get("triton_url"):
            res["perf_analyzer"] = perf_analyzer(system, a, info, out_dir)
    finally:
        if lg is not None:
            lg.close()
        srv.stop()
    return res


def bulk_passes(system: str, a, info: dict, groups: dict, out_dir: Path, watch: EncoderWatch | None) -> dict:
    """Ingest, then ScoreBatch, each replaying the generated clickstream into an empty Redis; Redis
    memory per user after the Ingest replay; with profiling, one more ScoreBatch pass under py-spy."""
    from . import throughput
    from .profile import record
    target, port = f"127.0.0.1:{info['port']}", info["redis_port"]
    out: dict = {"log": str(a.replay_log), "events": a.replay_events, "days": a.replay_days}
    for kind in ("ingest", "score_batch"):
        r = throughput.run_pass(kind, target, port, a.replay_streams, a.replay_users_ids, max_s=a.replay_max_s,
                                batch=a.replay_batch, groups=groups, watch=watch)
        out[kind] = r
        log(f"[{system}] {throughput.format_pass(r)}; all applied: {r['all_applied']}"
            f"{format_encoder(r.get('encoder'))}")
        if kind == "ingest":
            out["redis"] = redis_memory(port)
            log(f"[{system}] redis after the replay: {out['redis']['keys']['user']} users, "
                f"{_f(out['redis']['bytes_per_user'], '{:.0f}')} B of state per user")
    if system in a.profile_systems:
        prof = lambda s: record(info["pid"], s, out_dir / "profiles" / f"{system}-score_batch.txt")  # noqa: E731
        r = throughput.run_pass("score_batch", target, port, a.replay_streams, a.replay_users_ids,
                                max_s=a.profile_seconds, batch=a.replay_batch, profile=prof, watch=watch)
        out["profile_score_batch"] = {"pass": {k: v for k, v in r.items() if k != "profile"},
                                      **(r.get("profile") or {"error": "py-spy not installed (pip install py-spy)"})}
        log(f"[{system}] profiled a ScoreBatch pass: {out['profile_score_batch'].get('samples')} samples")
    return out


def perf_analyzer(system: str, a, info: dict, out_dir: Path) -> dict:
    try:
        from .perf import run_perf_analyzer
        log(f"[{system}] perf_analyzer on {info['triton_url']} model {info['triton_model']}")
        return run_perf_analyzer(info["triton_url"], info["triton_model"], a.perf_concurrency,
                                 out_dir / "perf_analyzer", measurement_ms=a.perf_interval_ms,
                                 stability=a.perf_stability, max_trials=a.perf_max_trials, log=log)
    except Exception as e:  # noqa: BLE001 - a missing binary must not lose the sweep
        log(f"[{system}] perf_analyzer skipped: {e}")
        return {"rows": [], "errors": {"all": f"{type(e).__name__}: {e}"}}


def format_encoder(enc: dict | None) -> str:
    if not enc:
        return ""
    out = f"  standby encoder steps {enc['local_steps']}" if enc.get("local_steps") else ""
    out += f"  deferred steps {enc['deferred_steps']}" if enc.get("deferred_steps") else ""
    return out + ("  TRITON IS DEAD" if enc.get("triton_alive") is False else "")


def sustained_step(steps: list[dict]) -> dict | None:
    ok = [s for s in steps if s["passed"]]
    return max(ok, key=lambda s: s["target_rps"]) if ok else None


def kept_up(step: dict) -> bool:
    """The server answered everything, on time enough to keep pace (latency bound or not):
    the condition under which CPU per request means something."""
    return (step["n_errors"] == 0 and step["degraded"] == 0 and step["ok"] > 0
            and step["achieved_rps"] >= 0.95 * step["offered_rps"])


def cpu_step(steps: list[dict], cpu_rate: float) -> dict | None:
    """The step at cpu_rate if the server kept up there, else the highest rate below it where it
    did, else the lowest step. Latency does not matter here: CPU per request does not depend on
    whether p99 made 10 ms, and at very low rates the servers' idle CPU inflates it."""
    exact = [s for s in steps if s["target_rps"] == cpu_rate and kept_up(s)]
    if exact:
        return exact[0]
    below = [s for s in steps if s["target_rps"] < cpu_rate and kept_up(s)]
    if below:
        return max(below, key=lambda s: s["target_rps"])
    return min(steps, key=lambda s: s["target_rps"]) if steps else None


def summarize(results: dict, a) -> dict:
    out = {}
    for name, res in results["systems"].items():
        steps = res["steps"]
        best = sustained_step(steps)
        cs = cpu_step(steps + res.get("cpu_steps", []), a.cpu_rate)
        out[name] = {
            "sustained_rps": best["target_rps"] if best else 0.0,
            "sustained_achieved_rps": best["achieved_rps"] if best else None,
            "latency_ms": best["latency_ms"] if best else None,
            "client_behind_at_sustained": best["client_behind"] if best else None,
            "cpu_rate": cs["target_rps"] if cs else None,
            "cpu_ms_per_req": cs["cpu_ms_per_req"]["server"] if cs else None,
            "cpu_breakdown_ms_per_req": cs["cpu_ms_per_req"] if cs else None,
            "client_cpu_ms_per_req": cs["client_cpu_ms_per_req"] if cs else None,
            "max_rate_tried": max((s["target_rps"] for s in steps), default=None),
            # highest rate answered in full (latency aside): the throughput it kept pace with
            "kept_pace_rps": max((s["target_rps"] for s in steps + res.get("cpu_steps", []) if kept_up(s)),
                                 default=0.0),
        }
    g, e, n = out.get("gateway"), out.get("echo"), out.get("naive")
    ratio = lambda x, y: (x / y) if (x is not None and y) else None  # noqa: E731
    checks = {}
    if g:
        if e:
            g["rate_vs_echo"] = ratio(g["sustained_rps"], e["sustained_rps"])
            g["cpu_vs_echo"] = ratio(g["cpu_ms_per_req"], e["cpu_ms_per_req"])
            checks["rate_vs_echo"] = g["rate_vs_echo"]
            checks["cpu_vs_echo"] = g["cpu_vs_echo"]
        if n:
            g["rate_vs_naive"] = ratio(g["sustained_rps"], n["sustained_rps"]) if n["sustained_rps"] else (
                math.inf if g["sustained_rps"] else None)
            checks["rate_vs_naive"] = g["rate_vs_naive"]
            g["kept_pace_vs_naive"] = ratio(g["kept_pace_rps"], n["kept_pace_rps"])
            if g.get("kept_pace_vs_naive") is not None:
                checks["kept_pace_vs_naive"] = g["kept_pace_vs_naive"]
        half = results["systems"]["gateway"].get("half_rate_step")
        if half:
            g["half_rate"] = half["target_rps"]
            g["p50_half_rate_ms"] = half["latency_ms"]["p50"]
            checks["p50_half_rate_ms"] = g["p50_half_rate_ms"]
        redis = results["systems"]["gateway"].get("redis")
        if redis:
            g["redis_bytes_per_user"] = redis["bytes_per_user"]
            checks["redis_bytes_per_user"] = redis["bytes_per_user"]
    for name in ("echo", "naive", "gateway_local"):
        if name in out and e:
            out[name]["rate_vs_echo"] = ratio(out[name]["sustained_rps"], e["sustained_rps"])
            out[name]["cpu_vs_echo"] = ratio(out[name]["cpu_ms_per_req"], e["cpu_ms_per_req"])
    verdict = {}
    for k, v in checks.items():
        if v is None:
            verdict[k] = None
        elif k in ("rate_vs_echo", "rate_vs_naive", "kept_pace_vs_naive"):
            verdict[k] = v >= TARGETS[k]
        else:
            verdict[k] = v <= TARGETS[k]
    return {"systems": out, "checks": checks, "pass": verdict}


# ----------------------------------------------------------------------------- markdown
def _f(x, fmt="{:.2f}", none="—"):
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return fmt.format(x)


def markdown(results: dict) -> str:
    s = results["summary"]["systems"]
    cfg, m = results["config"], results["machine"]
    lines = []
    mode = "QUICK smoke run (numbers meaningless)" if cfg["quick"] else "sweep"
    lines.append(f"## seqguard benchmark — {mode}, {m['date']}")
    lines.append("")
    lines.append(f"{m['nproc']} CPUs ({m['cpu_model'] or 'unknown CPU'}), {m['mem_gib']} GiB, load average at "
                 f"start {m['loadavg_at_start'][0]:.2f}; Python {m['python']}, grpcio {m['grpcio']}. "
                 f"Open loop, {cfg['arrival']} arrivals, {cfg['duration']} s measured after {cfg['warmup']} s "
                 f"warm-up per rate, {cfg['clients']} client processes x {cfg['channels']} channels, "
                 f"{cfg['users']} users. Sustained = highest rate with p99 <= {cfg['p99_ms']:g} ms, no gRPC "
                 f"error and no DEGRADED answer. CPU = server process tree CPU over the measured window / answers.")
    lines.append("")
    lines.append(f"Command: `python -m bench.run {' '.join(cfg['argv'])}`; load average at the end "
                 f"{_f((results.get('loadavg_at_end') or [None])[0])}; {results.get('elapsed_s', 0):.0f} s in all. "
                 "✗ marks a rate that missed the bound (p99, errors or DEGRADED).")
    lines.append("")
    lines.append(headline(results))
    lines.append("### Score sweep, details")
    lines.append("")
    lines.append("| system | sustained req/s | p50 / p99 / p99.9 ms at that rate | server CPU ms/req (at req/s) "
                 "| rate ÷ echo | rate ÷ naive | CPU/req ÷ echo | kept pace at req/s |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in SYSTEMS:
        if name not in s:
            continue
        r = s[name]
        lat = r["latency_ms"]
        lat_s = (f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p999']:.2f}" if lat else
                 f"none held (tried up to {_f(r['max_rate_tried'], '{:.0f}')})")
        if r.get("client_behind_at_sustained"):
            lat_s += " (client behind)"
        cpu = f"{_f(r['cpu_ms_per_req'], '{:.3f}')} (at {_f(r['cpu_rate'], '{:.0f}')})"
        vs_naive = _f(r.get("rate_vs_naive")) if name == "gateway" else "—"
        lines.append(f"| {name} | {r['sustained_rps']:.0f} | {lat_s} | {cpu} | {_f(r.get('rate_vs_echo'))} | "
                     f"{vs_naive} | {_f(r.get('cpu_vs_echo'))} | {r['kept_pace_rps']:.0f} |")
    lines.append("")
    lines.append("*Kept pace*: highest rate tried that was answered in full (>= 95% of the offered rate "
                 "answered within the window, no error, no DEGRADED), whatever the latency; the sweep stops "
                 "early, so it is a lower bound of capacity.")
    lines.append("")
    g = s.get("gateway")
    if g and g.get("cpu_breakdown_ms_per_req"):
        b = g["cpu_breakdown_ms_per_req"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in b.items() if k != "server")
        lines.append(f"Gateway server CPU per request ({b['server']:.3f} ms) by process: {parts} ms "
                     f"(client: {g['client_cpu_ms_per_req']:.3f} ms/req).")
        lines.append("")
    checks, verdict = results["summary"]["checks"], results["summary"]["pass"]
    if checks:
        names = {"rate_vs_echo": ("gateway sustained rate ÷ echo", ">= 0.7", "{:.2f}"),
                 "p50_half_rate_ms": ("gateway p50 at half its sustained rate, ms", "<= 2", "{:.2f}"),
                 "rate_vs_naive": ("gateway sustained rate ÷ naive", ">= 5", "{:.1f}"),
                 "kept_pace_vs_naive": ("(info) gateway ÷ naive, rate kept pace, latency aside", ">= 5", "{:.1f}"),
                 "cpu_vs_echo": ("gateway CPU per request ÷ echo", "<= 2", "{:.2f}"),
                 "redis_bytes_per_user": ("Redis state per active user (users + entities), bytes", "<= 2048", "{:.0f}")}
        lines.append("| target | goal | measured | met |")
        lines.append("|---|---|---:|---|")
        for k, (label, goal, fmt) in names.items():
            if k in checks:
                ok = verdict.get(k)
                lines.append(f"| {label} | {goal} | {_f(checks[k], fmt)} | "
                             f"{'—' if ok is None else ('yes' if ok else 'NO')} |")
        lines.append("")
    gw = results["systems"].get("gateway", {})
    if gw.get("redis"):
        rm = gw["redis"]
        k = rm["keys"]
        avg = ", ".join(f"{n} {v:.0f} B" for n, v in rm["avg_key_bytes"].items() if v is not None)
        lines.append(f"Redis after the gateway sweep: {k['user']} users, {k['device']} devices, {k['ip']} IPs, "
                     f"{k['ip_prefix']} IP prefixes, {k.get('dedupe', 0)} idempotency keys. State (users + "
                     f"entities) {rm['state_bytes'] / 1024:.0f} KiB = {_f(rm['bytes_per_user'], '{:.0f}')} B per "
                     f"user; idempotency keys {rm['dedupe_bytes'] / 1024:.0f} KiB = "
                     f"{_f(rm['dedupe_bytes_per_event'], '{:.0f}')} B per answered event (kept dedupe_ttl_s, so they "
                     f"grow with rate x TTL, not with users); all keys / users = "
                     f"{_f(rm['all_bytes_per_user'], '{:.0f}')} B. MEMORY USAGE per key: {avg}.")
        lines.append("")
    if gw.get("perf_analyzer"):
        from .perf import markdown as perf_md
        pa = gw["perf_analyzer"]
        lines.append(f"perf_analyzer against the Triton step model ({gw['server'].get('triton_model')}, "
                     f"batch 1, zero inputs, gRPC):")
        lines.append("")
        lines.append(perf_md(pa))
        lines.append("")
    for name in SYSTEMS:
        res = results["systems"].get(name) or {}
        for key, what in (("profile_score", "`Score`"), ("profile_score_batch", "`ScoreBatch`")):
            prof = res.get(key) if key == "profile_score" else (res.get("bulk") or {}).get(key)
            if prof:
                from .profile import markdown as profile_md
                lines.append(profile_md(f"Where the time goes: py-spy of the {name} process under {what} load", prof))
    lines.append("<details><summary>every step</summary>")
    lines.append("")
    lines.append("| system | offered req/s | achieved req/s | p50 | p99 | p99.9 | max ms | errors | degraded "
                 "| send lag p99 ms | server CPU ms/req | client CPU ms/req | held |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for name in SYSTEMS:
        res = results["systems"].get(name)
        if not res:
            continue
        steps = (list(res["steps"]) + res.get("cpu_steps", [])
                 + ([res["half_rate_step"]] if res.get("half_rate_step") else []))
        for st in steps:
            lat = st["latency_ms"]
            errs = ", ".join(f"{k} {v}" for k, v in sorted(st["errors"].items())) or "0"
            lines.append(f"| {name} | {st['offered_rps']:.0f} | {st['achieved_rps']:.0f} | {_f(lat['p50'])} | "
                         f"{_f(lat['p99'])} | {_f(lat['p999'])} | {_f(lat['max'])} | {errs} | {st['degraded']} | "
                         f"{st['send_lag_ms']['p99']:.2f}{' behind' if st['client_behind'] else ''} | "
                         f"{st['cpu_ms_per_req']['server']:.3f} | {st['client_cpu_ms_per_req']:.3f} | "
                         f"{'yes' if st['passed'] else 'no'}{' (CPU step)' if st.get('cpu_only') else ''} |")
    lines.append("")
    lines.append("</details>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="model directory (seqguard train --out)")
    ap.add_argument("--events", required=True, type=Path, help="event log the requests are drawn from")
    ap.add_argument("--rates", default=None, help=f"arrival rates, req/s, ascending (default {DEFAULT_RATES})")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per rate (default 10)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per rate, not counted (default 3)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--triton-url", default="", help="gateway uses this Triton (gRPC host:port) instead of its own")
    ap.add_argument("--triton-model", default="", help="model name on --triton-url")
    ap.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                    help="gateway setting override, e.g. coalesce_max_wait_us=200 (repeatable)")
    ap.add_argument("--p99-ms", type=float, default=10.0, help="p99 bound of a sustained rate")
    ap.add_argument("--cpu-rate", type=float, default=500.0, help="rate at which CPU/request is reported")
    ap.add_argument("--clients", type=int, default=None, help="load generator processes (default 2)")
    ap.add_argument("--channels", type=int, default=None, help="gRPC channels per client process (default 4)")
    ap.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    ap.add_argument("--timeout", type=float, default=1.0, help="client deadline per call, s")
    ap.add_argument("--max-users", type=int, default=0, help="use only the first N users of the log")
    ap.add_argument("--naive-window", type=int, default=64)
    ap.add_argument("--naive-threads", type=int, default=1, help="torch threads in the naive service")
    ap.add_argument("--perf-concurrency", default=None, help="perf_analyzer concurrencies (default 1,2,4,8,16)")
    ap.add_argument("--perf-interval-ms", type=int, default=None, help="perf_analyzer window (default 2000)")
    ap.add_argument("--perf-stability", type=int, default=50)
    ap.add_argument("--perf-max-trials", type=int, default=10)
    ap.add_argument("--no-perf", action="store_true", help="skip perf_analyzer")
    ap.add_argument("--max-fails", type=int, default=2,
                    help="a sweep stops after this many failing rates in a row (more: sturdier on a noisy machine)")
    ap.add_argument("--max-sweep-s", type=float, default=None,
                    help="stop a system's sweep once it has run this long (default 150; quick: no bound)")
    ap.add_argument("--bulk-systems", default="gateway,gateway_local",
                    help="gateways that also get the Ingest / ScoreBatch replay (empty: none)")
    ap.add_argument("--replay-users", type=int, default=None, help="users of the generated clickstream (default 2000)")
    ap.add_argument("--replay-days", type=int, default=None, help="its span in days (default 30)")
    ap.add_argument("--replay-streams", dest="replay_streams_n", type=int, default=4, help="concurrent Ingest streams / ScoreBatch workers")
    ap.add_argument("--replay-batch", type=int, default=256, help="events per ScoreBatch request")
    ap.add_argument("--replay-max-s", type=float, default=None,
                    help="a replay pass stops sending after this many seconds (default 90)")
    ap.add_argument("--score-file-users", type=int, default=None, help="users of the score-file log (default 5000)")
    ap.add_argument("--score-file-days", type=int, default=None, help="its span in days (default 90)")
    ap.add_argument("--no-score-file", action="store_true", help="skip score-file")
    ap.add_argument("--profile-systems", default=None,
                    help="gateways profiled with py-spy under Score and ScoreBatch load (default gateway when "
                         "py-spy is installed; quick: none)")
    ap.add_argument("--profile-seconds", type=float, default=15.0, help="length of the profiled ScoreBatch pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/<timestamp>)")
    ap.add_argument("--quick", action="store_true", help="smoke run: one low rate per system, short steps")
    ap.add_argument("--only", choices=("bulk",), default=None,
                    help="bulk: only the Ingest / ScoreBatch replay of the --bulk-systems gateways")
    a = ap.parse_args(argv)
    q = a.quick
    a.rates = [float(x) for x in (a.rates or ("50" if q else DEFAULT_RATES)).split(",") if x.strip()]
    a.rates.sort()
    a.duration = a.duration if a.duration is not None else (1.5 if q else 8.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if q else 2.0)
    a.clients = a.clients or (1 if q else 2)
    a.channels = a.channels or (2 if q else 4)
    a.perf_concurrency = [int(x) for x in (a.perf_concurrency or ("1" if q else "1,2,4,8,16")).split(",")]
    a.perf_interval_ms = a.perf_interval_ms or (500 if q else 2000)
    if q:
        a.perf_max_trials = min(a.perf_max_trials, 3)
    a.max_sweep_s = a.max_sweep_s if a.max_sweep_s is not None else (math.inf if q else 150.0)
    a.replay_users = a.replay_users or (60 if q else 2000)
    a.replay_days = a.replay_days or (5 if q else 30)
    a.replay_max_s = a.replay_max_s or (20.0 if q else 90.0)
    a.score_file_users = a.score_file_users or (a.replay_users if q else 5000)
    a.score_file_days = a.score_file_days or (a.replay_days if q else 90)
    a.bulk_systems = [x.strip() for x in a.bulk_systems.split(",") if x.strip()]
    if a.profile_systems is None:
        from .profile import find_py_spy
        a.profile_systems = "" if q or find_py_spy() is None else "gateway"
    a.profile_systems = [x.strip() for x in a.profile_systems.split(",") if x.strip()]
    a.systems = [x.strip() for x in a.systems.split(",") if x.strip()]
    if a.only == "bulk":     # the bulk gateways alone: no sweep, no profiles, no perf_analyzer, no score-file
        a.systems, a.profile_systems, a.no_perf, a.no_score_file = list(a.bulk_systems), [], True, True
    bad = [x for x in a.systems + a.bulk_systems + a.profile_systems if x not in SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {bad}; choose from {SYSTEMS}")
    try:   # fail before starting anything: a model this code cannot load would only fail in the servers
        from seqguard.artifact import ModelArtifact
        ModelArtifact.load(a.model)
    except Exception as e:  # noqa: BLE001
        ap.error(f"--model {a.model}: cannot load it with this code ({type(e).__name__}: {e}); "
                 "retrain it with `seqguard train`")
    if not a.events.is_file():
        ap.error(f"--events {a.events}: no such file")
    a.model, a.events = a.model.resolve(), a.events.resolve()
    return a


def render(results_dir: Path) -> int:
    """Rebuild the summary and Markdown of a finished run from its results.json (no measuring)."""
    path = Path(results_dir) / "results.json"
    results = json.loads(path.read_text())
    cfg = results["config"]
    results["summary"] = summarize(results, argparse.Namespace(cpu_rate=cfg["cpu_rate"]))
    md = markdown(results)
    path.write_text(json.dumps(results, indent=1, default=_json_default))
    (Path(results_dir) / "results.md").write_text(md)
    print(md, flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m bench.run --render RESULTS_DIR")
        return render(Path(argv[1]))
    a = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = (a.out or ROOT / "bench" / "results" / (f"quick-{stamp}" if a.quick else stamp)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from .loadgen import n_users
    results = {"machine": machine_info(),
               "config": {"model": str(a.model), "events": str(a.events), "rates": a.rates, "duration": a.duration,
                          "warmup": a.warmup, "systems": a.systems, "triton_url": a.triton_url or None,
                          "gateway_set": a.gateway_set, "p99_ms": a.p99_ms, "cpu_rate": a.cpu_rate,
                          "clients": a.clients, "channels": a.channels, "arrival": a.arrival, "timeout_s": a.timeout,
                          "users": n_users(str(a.events), a.max_users), "naive_window": a.naive_window,
                          "naive_threads": a.naive_threads, "quick": a.quick, "argv": sys.argv[1:]},
               "systems": {}}
    log(f"results -> {out_dir}")
    t0 = time.monotonic()
    prepare_replay(a, out_dir)
    results["config"].update(replay_log=str(a.replay_log) if a.replay_log else None, replay_users=a.replay_users,
                             replay_days=a.replay_days, replay_events=a.replay_events,
                             replay_streams=len(a.replay_streams), replay_batch=a.replay_batch,
                             replay_max_s=a.replay_max_s, bulk_systems=a.bulk_systems,
                             profile_systems=a.profile_systems, max_sweep_s=a.max_sweep_s)
    for system in a.systems:
        results["systems"][system] = sweep_system(system, a, a.rates, out_dir)
    if not a.no_score_file:
        try:
            results["score_file"] = run_score_file(a, out_dir)
        except Exception as e:  # noqa: BLE001 - report what the run did measure
            log(f"score-file failed: {type(e).__name__}: {e}")
    results["summary"] = summarize(results, a)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["loadavg_at_end"] = list(os.getloadavg())
    md = markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out_dir / "results.md").write_text(md)
    print(md, flush=True)
    log(f"wrote {out_dir / 'results.json'} and results.md ({results['elapsed_s']:.0f} s)")
    return 0


def clickstream(a, out_dir: Path, users: int, days: int) -> tuple[Path, int]:
    """A generated clickstream log, kept between full runs (generating 1M events takes a while)."""
    from .throughput import generate_log
    folder = out_dir if a.quick else ROOT / "bench" / "results" / "clickstreams"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clickstream-u{users}-d{days}-s{a.seed + 7}.jsonl"
    t0 = time.monotonic()
    n = generate_log(path, users, days, seed=a.seed + 7)
    log(f"clickstream {path.name}: {n:,} events of {users} users over {days} days ({time.monotonic() - t0:.0f} s)")
    return path, n


def prepare_replay(a, out_dir: Path) -> None:
    """Generate and load the replayed clickstream once, before any server starts."""
    a.replay_log, a.replay_events, a.replay_streams, a.replay_users_ids = None, 0, [], []
    if not set(a.bulk_systems) & set(a.systems):
        return
    from .throughput import load_streams
    a.replay_log, a.replay_events = clickstream(a, out_dir, a.replay_users, a.replay_days)
    a.replay_streams, a.replay_users_ids = load_streams(a.replay_log, a.replay_streams_n)


def run_score_file(a, out_dir: Path) -> dict:
    from .throughput import score_file
    path, n = clickstream(a, out_dir, a.score_file_users, a.score_file_days)
    work = out_dir / "score_file"
    work.mkdir(exist_ok=True)
    r = score_file(a.model, path, work, n)
    r.update(users=a.score_file_users, days=a.score_file_days)
    log(f"score-file: {r['rows']:,} of {n:,} events in {r['wall_s']:.1f} s = {_f(r['events_per_s'], '{:,.0f}')} "
        f"events/s ({r['cpu_s']:.1f} CPU s), peak RSS {r['peak_rss_mb']:.0f} MB (rc {r['returncode']})")
    return r


def _json_default(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
