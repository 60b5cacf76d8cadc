"""Smoke test of the benchmark suite: `python -m bench.run --quick` end to end on a tiny model.

Starts the real echo server, the real gateway stack (Redis + Triton + gateway) and the naive
service, drives each with the open-loop load generator for a few seconds, replays a small
generated clickstream through the gateway's Ingest and ScoreBatch, runs score-file on it, and
checks that the one table has every row with finite numbers. It never asserts on timing: numbers
from a shared CI machine mean nothing, only that the harness measures something.
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    from seqguard.services import ServiceNotInstalled, find_redis_server, find_tritonserver
    try:
        find_redis_server()
        find_tritonserver()
    except ServiceNotInstalled as exc:
        pytest.skip(str(exc))
    pytest.importorskip("torch", reason="the naive baseline and training need torch")
    from seqguard.training.generate import generate, write_events
    from seqguard.training.train import TrainConfig, train
    d = tmp_path_factory.mktemp("bench")
    events, _ = generate(200, seed=5, days=5)
    write_events(events, d / "events.jsonl")
    cfg = TrainConfig(hidden=16, epochs=1, n_estimators=30, max_samples=64, seed=1, threads=2)
    train(str(d / "events.jsonl"), str(d / "model"), cfg, log=lambda m: None)
    return d / "model", d / "events.jsonl"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_run_reports_every_system(bench_model, tmp_path):
    model, events = bench_model
    out = tmp_path / "results"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "bench.run", "--model", str(model), "--events", str(events),
                        "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"bench.run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert time.monotonic() - t0 < 300

    md = (out / "results.md").read_text()
    assert md.strip() == p.stdout.strip()       # the table printed is the table written
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]["systems"]
    for system in ("echo", "gateway", "gateway_local", "naive"):
        assert f"| {system} |" in md, f"no row for {system} in:\n{md}"
        res = results["systems"][system]
        assert len(res["steps"]) == 1           # --quick: one rate per system
        step = res["steps"][0]
        assert step["ok"] > 0, (system, step)
        assert step["requests"] > 0
        for k in ("p50", "p99", "p999", "max"):
            assert _finite(step["latency_ms"][k]) and step["latency_ms"][k] > 0, (system, k, step["latency_ms"])
        assert _finite(step["achieved_rps"]) and step["achieved_rps"] > 0
        assert _finite(step["cpu_ms_per_req"]["server"]) and step["cpu_ms_per_req"]["server"] >= 0
        assert _finite(summary[system]["cpu_ms_per_req"])
        assert _finite(summary[system]["sustained_rps"])
    gw = results["systems"]["gateway"]
    assert gw["redis"]["keys"]["user"] > 0
    assert _finite(gw["redis"]["bytes_per_user"])
    # CPU of the gateway tree is broken down by process (Redis and Triton are children of it)
    assert {"server", "gateway", "redis", "triton"} <= set(gw["steps"][0]["cpu_ms_per_req"])
    assert "perf_analyzer" in gw                # rows, or the reason it could not run
    _check_bulk_and_score_file(results)
    _check_table_rows(md)


def _check_bulk_and_score_file(results):
    """Ingest and ScoreBatch sent the whole generated log and counted what was applied twice (Redis'
    apply counter, the users' n_events read back); score-file scored every event. Whether all of it
    was applied depends on the load here (a gateway past its deadline defers or drops work), so the
    counts are checked for consistency, not for equality with what was sent."""
    events = results["config"]["replay_events"]
    bulk = results["systems"]["gateway"]["bulk"]
    assert events > 0 and bulk["events"] == events
    for kind in ("ingest", "score_batch"):
        r = bulk[kind]
        assert r["sent"] == events, (kind, r)
        assert 0 < r["user_n_events"] <= r["applied_in_redis"] <= events, (kind, r)
        assert r["all_applied"] == (r["user_n_events"] == r["applied_in_redis"] == events)
        assert _finite(r["events_per_s"]) and r["events_per_s"] > 0
        assert {"server", "gateway", "redis", "triton"} <= set(r["cpu_ms_per_event"])
        assert r["encoder"]["triton_alive"] is not None     # the gateway's counters and Triton were watched
        assert {"local_steps", "deferred_steps", "caught_up_steps"} <= set(r["encoder"])
    assert bulk["redis"]["keys"]["user"] == len({json.loads(line)["user_id"]
                                                 for line in open(results["config"]["replay_log"])})
    assert _finite(bulk["redis"]["bytes_per_user"]) and bulk["redis"]["bytes_per_user"] > 0
    # the user + entity state is measured without the streams, which the replay's alerts filled
    assert 0 < bulk["redis"]["user_entity_bytes_per_user"] < bulk["redis"]["bytes_per_user"]
    assert bulk["redis"]["other_keys"]["sg:alerts"]["entries"] > 0
    sf = results["score_file"]
    assert sf["returncode"] == 0 and sf["rows"] == sf["events"] == events
    assert _finite(sf["events_per_s"]) and sf["peak_rss_mb"] > 50


def _check_table_rows(md):
    from bench.table import LABELS, row_systems
    rows = row_systems(md)
    for system in ("echo", "gateway", "gateway_local", "naive"):
        assert ("`Score`, open loop: highest rate with p99 <= 10 ms, no errors", LABELS[system]) in rows, rows
        assert ("CPU ms per `Score` request, by process", LABELS[system]) in rows, rows
    figures = {f for f, _ in rows}
    for prefix in ("`Ingest` (client stream) events/s", "`ScoreBatch` events/s", "Redis bytes per active user",
                   "`score-file`", "CPU ms per event applied, `Ingest`", "CPU ms per event applied, `ScoreBatch`"):
        assert any(f.startswith(prefix) for f in figures), (prefix, figures)


def test_idle_cost_prints_every_stage_and_gap(bench_model):
    """bench.idle_cost (why low-rate latency is high, BENCHMARKS.md): a row per stage and idle gap."""
    model, _ = bench_model
    p = subprocess.run([sys.executable, "-m", "bench.idle_cost", "--model", str(model), "--n", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split("|") for line in p.stdout.splitlines() if line.startswith("| ") and "ms |" not in line]
    got = {(r[1].strip(), int(r[2])) for r in rows}
    assert got == {(s, g) for s in ("detector (1 event)", "triton live (no model)", "triton step (batch 1)")
                   for g in (0, 2, 20)}
    assert all(float(r[3]) > 0 and float(r[4]) >= float(r[3]) for r in rows)   # p50 > 0, p90 >= p50


def test_quick_run_against_an_external_triton(bench_model, tmp_path):
    """--triton-url/--triton-model (how the bench targets a GPU Triton): the gateway uses that server,
    not one of its own, and perf_analyzer is pointed at it."""
    from seqguard.services import TritonServer
    model, events = bench_model
    out = tmp_path / "results"
    with TritonServer(model / "model_repository", models=["seqguard_encoder"], run_dir=tmp_path / "triton") as tr:
        p = subprocess.run([sys.executable, "-m", "bench.run", "--model", str(model), "--events", str(events),
                            "--quick", "--systems", "gateway", "--triton-url", tr.grpc_url,
                            "--triton-model", "seqguard_encoder", "--bulk-systems", "", "--no-score-file",
                            "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"bench.run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # loopback, never a proxy
        served = opener.open(tr.metrics_url, timeout=5).read().decode()
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["triton_url"] == tr.grpc_url
    step = results["systems"]["gateway"]["steps"][0]
    assert step["ok"] > 0
    # the external server did the inference: its success counter moved
    ok = [line for line in served.splitlines()
          if line.startswith("nv_inference_request_success") and 'model="seqguard_encoder"' in line]
    assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) > 0, served[:2000]
