"""The one table of a bench.run report: every headline figure of issue 22 with its target.

Rows: the open-loop `Score` sweep of each system (sustained rate, its p50/p99, p50/p99 at every
rate tried, the ratio to echo), `Ingest` and `ScoreBatch` events/s with the state applied,
`score-file` events/s and peak RSS, Redis bytes per user after the replay, CPU per request by
process. A figure that was not measured in the run (a system left out, --no-score-file) shows
as "not run".
"""
from __future__ import annotations

import math

LABELS = {"echo": "echo (do-nothing grpc.aio)", "gateway": "gateway, Triton encoder",
          "gateway_local": "gateway, `encoder: local`", "naive": "naive service"}
TARGETS = {"score_vs_echo": 0.7, "bulk_events_per_s": 20_000, "score_file_events_per_s": 200_000,
           "score_file_peak_rss_mb": 2048, "redis_bytes_per_user": 2048}
ORDER = ("echo", "gateway", "gateway_local", "naive")


def _n(x, fmt="{:,.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if isinstance(x, float) and math.isinf(x) else fmt.format(x)


def _met(ok) -> str:
    return "—" if ok is None else ("**yes**" if ok else "**NO**")


def _per_rate(steps: list[dict]) -> str:
    parts = []
    for st in steps:
        lat = st["latency_ms"]
        mark = "" if st["passed"] else "✗"
        parts.append(f"{st['target_rps']:.0f}: {_n(lat['p50'], '{:.1f}')}/{_n(lat['p99'], '{:.1f}')}{mark}")
    return ", ".join(parts)


def score_rows(results: dict) -> list[tuple]:
    s = results["summary"]["systems"]
    echo = s.get("echo")
    rows = []
    for name in ORDER:
        if name not in s:
            continue
        r, res = s[name], results["systems"][name]
        if not res["steps"]:                 # not swept (bench.run --only bulk)
            continue
        lat = r["latency_ms"]
        held = (f"**{r['sustained_rps']:,.0f} req/s** (p50 {lat['p50']:.2f} / p99 {lat['p99']:.2f} ms)" if lat
                else f"**none held** (tried up to {_n(r['max_rate_tried'])} req/s)")
        ratio = r.get("rate_vs_echo") if name != "echo" else None
        if ratio is not None:
            held += f"; **{ratio:.2f}x echo**"
        held += f"<br>p50/p99 ms at each rate: {_per_rate(res['steps'])}"
        held += encoder_note(res["steps"] + res.get("cpu_steps", []), sum(st["ok"] for st in res["steps"]))
        if name in ("gateway", "gateway_local"):
            target, ok = ">= 0.7x echo", (ratio >= TARGETS["score_vs_echo"] if ratio is not None and echo else None)
        else:
            target, ok = ("the ceiling" if name == "echo" else "reference"), None
        rows.append(("`Score`, open loop: highest rate with p99 <= 10 ms, no errors", LABELS[name], held, target, ok))
    return rows


def encoder_note(steps: list[dict], events: int) -> str:
    """How many model steps the gateway's standby encoder computed instead of Triton, and whether
    Triton was still alive after these steps: a "Triton" figure is only one if both are clean."""
    encs = [st["encoder"] for st in steps if st.get("encoder")]
    if not encs:
        return ""
    local = sum(e.get("local_steps", 0) for e in encs)
    deferred = sum(e.get("deferred_steps", 0) for e in encs)
    caught_up = sum(e.get("caught_up_steps", 0) for e in encs)
    out = f"; **{local:,} model steps on the local standby** (Triton timed out) for ~{events:,} events" if local else ""
    out += f"; {deferred:,} steps deferred, {caught_up:,} caught up" if deferred else ""
    if any(e.get("triton_alive") is False for e in encs):
        out += "; **Triton died** during these steps"
    return out


def bulk_rows(results: dict) -> list[tuple]:
    rows = []
    for name in ORDER:
        res = results["systems"].get(name, {})
        if res.get("bulk_error"):
            rows.append(("`Ingest` / `ScoreBatch` replay", LABELS[name], f"**failed**: {res['bulk_error']}",
                         ">= 20,000 events/s", False))
        bulk = res.get("bulk")
        if not bulk:
            continue
        for kind, label in (("ingest", "`Ingest` (client stream)"), ("score_batch", "`ScoreBatch`")):
            r = bulk.get(kind)
            if not r:
                continue
            how = (f"{r['streams']} streams" if kind == "ingest"
                   else f"{r['batch']} events/request, {r['streams']} workers")
            proof = ("all applied" if r["all_applied"] else "**NOT all applied**")
            text = (f"**{_n(r['events_per_s'])} events/s** ({r['applied_in_redis']:,} of {r['sent']:,} sent "
                    f"applied (Redis apply counter) in {r['wall_s']:.0f} s, {how}; users' n_events read back: "
                    f"{r['user_n_events']:,}: {proof}")
            if r.get("degraded"):
                why = "; ".join(f"{k} x{v:,}" for k, v in (r.get("degraded_details") or {}).items())
                text += f"; {r['degraded']:,} DEGRADED answers ({why})"
            text += encoder_note([r], r["sent"])
            if r.get("caught_up_wait_s"):
                text += f"; the time includes {r['caught_up_wait_s']:.1f} s waiting for deferred steps to run"
            enc = r.get("encoder") or {}
            if enc.get("deferred_steps", 0) > enc.get("caught_up_steps", 0):
                text += (f"; {enc['deferred_steps'] - enc['caught_up_steps']:,} deferred model steps still pending "
                         "10 s after the pass (not in the time)")
            if r.get("reopened"):
                text += f"; the gateway ended a stream with RESOURCE_EXHAUSTED {r['reopened']:,} times (reopened)"
            if r.get("failed_streams"):
                text += f"; **{len(r['failed_streams'])} streams failed**: {r['failed_streams'][0]}"
            if r.get("resent"):
                text += (f"; {r['resent']:,} answered without a sequence re-sent once at the end, "
                         f"{r['resent_unapplied']:,} of them still without one")
            text += ")"
            ok = r["all_applied"] and (r["events_per_s"] or 0) >= TARGETS["bulk_events_per_s"]
            rows.append((f"{label} events/s, state applied, {bulk['days']}-day clickstream of "
                         f"{r['users']:,} users", LABELS[name], text, ">= 20,000 events/s", ok))
        red = bulk.get("redis")
        if red:
            k = red["keys"]
            per_user = red.get("user_entity_bytes_per_user", red["bytes_per_user"])
            streams = {n: o for n, o in (red.get("other_keys") or {}).items() if o.get("entries") is not None}
            text = (f"**{_n(per_user)} B** of user + entity state ({k['user']:,} users, {k['device']:,} devices, "
                    f"{k['ip']:,} IPs, {k['ip_prefix']:,} prefixes; idempotency keys not counted; "
                    f"{red.get('entity_keys_expired_by_event_time', 0):,} entity keys past their TTL "
                    f"by event time removed first); {_n(red['bytes_per_user'])} B with the streams ("
                    + ", ".join(f"{n}: {o['entries']:,} entries, {o['bytes'] / max(1, k['user']):,.0f} B per user"
                                for n, o in sorted(streams.items()))
                    + "; kept by count, `alerts_max`, not per user)")
            enc = (bulk.get("ingest") or {}).get("encoder") or {}
            pending = enc.get("deferred_steps", 0) - enc.get("caught_up_steps", 0)
            if pending > 0:                         # a user's key holds the features of its pending steps
                text += f"; **includes the features of {pending:,} deferred model steps still pending**"
            ok = per_user is not None and per_user <= TARGETS["redis_bytes_per_user"]
            rows.append((f"Redis bytes per active user after the {bulk['days']}-day `Ingest` replay", LABELS[name],
                         text, "<= 2,048 B", ok))
    return rows


def score_file_row(results: dict) -> list[tuple]:
    sf = results.get("score_file")
    if not sf:
        return []
    if sf["returncode"] != 0:
        return [("`score-file`", "offline", f"**failed** (rc {sf['returncode']})", ">= 200k events/s, <= 2 GB", False)]
    text = (f"**{_n(sf['events_per_s'])} events/s** wall ({_n(sf['events_per_cpu_s'])} per CPU-s), peak RSS "
            f"**{sf['peak_rss_mb']:,.0f} MB**; {sf['rows']:,} events ({sf['users']:,} users, {sf['days']} days)")
    ok = ((sf["events_per_s"] or 0) >= TARGETS["score_file_events_per_s"]
          and sf["peak_rss_mb"] <= TARGETS["score_file_peak_rss_mb"])
    return [("`score-file` on a generated log", "offline (one process)", text, ">= 200,000 events/s, <= 2 GB", ok)]


def cpu_rows(results: dict) -> list[tuple]:
    rows, bulk_rows_ = [], []
    s = results["summary"]["systems"]
    for name in ORDER:
        r = s.get(name)
        if not r or not r.get("cpu_breakdown_ms_per_req"):
            continue
        b = r["cpu_breakdown_ms_per_req"]
        parts = [f"{k} {b[k]:.3f}" for k in ("gateway", "triton", "redis") if k in b]
        text = f"**{b['server']:.3f}** at {r['cpu_rate']:,.0f} req/s" + (f" ({', '.join(parts)})" if parts else "")
        if r.get("cpu_vs_echo") is not None and name != "echo":
            text += f"; {r['cpu_vs_echo']:.2f}x echo"
        rows.append(("CPU ms per `Score` request, by process", LABELS[name], text, "", None))
        bulk = results["systems"].get(name, {}).get("bulk") or {}
        for kind, label in (("ingest", "`Ingest`"), ("score_batch", "`ScoreBatch`")):
            c = (bulk.get(kind) or {}).get("cpu_ms_per_event")
            if c:
                parts = ", ".join(f"{k} {c[k]:.3f}" for k in ("gateway", "triton", "redis") if k in c)
                bulk_rows_.append((f"CPU ms per event applied, {label}, by process", LABELS[name],
                                   f"**{c['server']:.3f}** ({parts})", "", None))
    return rows + bulk_rows_


def headline(results: dict) -> str:
    rows = score_rows(results) + bulk_rows(results) + score_file_row(results) + cpu_rows(results)
    lines = ["| figure | system | measured | target | met |", "|---|---|---|---|---|"]
    last = None
    for figure, system, text, target, ok in rows:
        lines.append(f"| {figure if figure != last else '〃'} | {system} | {text} | {target} | {_met(ok)} |")
        last = figure
    return "\n".join(lines) + "\n"


def row_systems(md: str) -> list[tuple[str, str]]:
    """(figure, system) of every row of the headline table in a report (for the smoke test)."""
    lines = md.splitlines()
    start = lines.index("| figure | system | measured | target | met |") + 2
    out, last = [], None
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        figure = last if cells[0] == "〃" else cells[0]
        out.append((figure, cells[1]))
        last = figure
    return out
