"""Where one Score's time goes: the gateway's stages timed from inside the gateway process.

Starts gateway.up.LocalStack (Redis AOF off) in this process, wraps the engine's stages with
time.perf_counter, drives it with the open-loop client (bench.loadgen, separate processes) at a
low rate (one request at a time, so batches are of one event), and prints p50 / mean per stage:

    rpc (client)   latency the client sees (from the scheduled send time)
    rpc (server)   RiskScoringService.Score, decode to response
    batch          ScoringEngine.score for the batch
    redis load     RedisStateStore.load (GET per user + MGET entities + MGET event ids, one pipeline)
    featurise      tokens + featurize for the batch
    triton         TritonStepClient.step (all waves)
    detector       Detector.risk + action_codes
    reasons        explain() for the batch
    redis save     RedisStateStore.save (pack + Lua compare-and-set)

The wrappers cost ~1-2 us per stage. Throwaway-grade measuring tool, not a test:

    python -m bench.stages --model runs/m20k_p64 --events data/test5k.jsonl --rate 50 --duration 10
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

SAMPLES: dict[str, list[float]] = defaultdict(list)


def _timed_async(name, fn):
    @functools.wraps(fn)
    async def inner(*a, **kw):
        t0 = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            SAMPLES[name].append(time.perf_counter() - t0)
    return inner


class _Acc:
    """Sums a sync function's time within one batch (featurise runs once per event)."""

    def __init__(self):
        self.t = 0.0

    def wrap(self, fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t += time.perf_counter() - t0
        return inner


def instrument() -> None:
    import seqguard.gateway.engine as eng
    from seqguard.gateway.server import RiskScoringService
    from seqguard.gateway.state import RedisStateStore
    from seqguard.gateway.triton_client import TritonStepClient
    from seqguard.detector import Detector
    from seqguard.featurizer import Featurizer

    accs = {k: _Acc() for k in ("featurise", "detector", "reasons", "triton")}
    Featurizer.featurize = accs["featurise"].wrap(Featurizer.featurize)
    Featurizer.tokens = accs["featurise"].wrap(Featurizer.tokens)
    Detector.risk = accs["detector"].wrap(Detector.risk)
    Detector.action_codes = accs["detector"].wrap(Detector.action_codes)
    eng.explain = accs["reasons"].wrap(eng.explain)
    RedisStateStore.load = _timed_async("redis load", RedisStateStore.load)
    RedisStateStore.save = _timed_async("redis save", RedisStateStore.save)
    step = TritonStepClient.step

    async def timed_step(*a, **kw):
        t0 = time.perf_counter()
        try:
            return await step(*a, **kw)
        finally:
            accs["triton"].t += time.perf_counter() - t0
    TritonStepClient.step = timed_step

    score = eng.ScoringEngine.score

    async def timed_score(self, events, *a, **kw):
        for acc in accs.values():
            acc.t = 0.0
        t0 = time.perf_counter()
        try:
            return await score(self, events, *a, **kw)
        finally:
            SAMPLES["batch"].append(time.perf_counter() - t0)
            SAMPLES["batch size"].append(len(events))
            for k, acc in accs.items():
                SAMPLES[k].append(acc.t)
    eng.ScoringEngine.score = timed_score
    RiskScoringService.Score = _timed_async("rpc (server)", RiskScoringService.Score)


ORDER = ("rpc (client)", "rpc (server)", "batch", "redis load", "featurise", "triton", "detector", "reasons",
         "redis save", "batch rest")


def summarise(client_lat_s: list[float]) -> dict:
    n = len(SAMPLES["batch"])
    stages = {k: np.asarray(v) for k, v in SAMPLES.items()}
    if n:
        parts = sum(stages[k][-n:] for k in ("redis load", "featurise", "triton", "detector", "reasons", "redis save")
                    if len(stages.get(k, ())) >= n)
        stages["batch rest"] = stages["batch"] - parts
    stages["rpc (client)"] = np.asarray(client_lat_s)
    out = {}
    for k in ORDER:
        v = stages.get(k)
        if v is None or not len(v):
            continue
        out[k] = {"n": int(len(v)), "p50_ms": float(np.percentile(v, 50) * 1000), "mean_ms": float(v.mean() * 1000),
                  "p99_ms": float(np.percentile(v, 99) * 1000)}
    if "batch size" in stages:
        out["batch size mean"] = float(np.mean(stages["batch size"]))
    return out


def table(res: dict) -> str:
    lines = ["| stage | p50 ms | mean ms | p99 ms | n |", "|---|---:|---:|---:|---:|"]
    for k in ORDER:
        if k in res:
            r = res[k]
            lines.append(f"| {k} | {r['p50_ms']:.3f} | {r['mean_ms']:.3f} | {r['p99_ms']:.3f} | {r['n']} |")
    return "\n".join(lines) + f"\n\nmean batch size {res.get('batch size mean', 0):.2f}"


async def run(a) -> dict:
    from bench.loadgen import LoadGenerator
    from seqguard.gateway.up import LocalStack

    instrument()
    overrides = dict(p.split("=", 1) for p in a.set)
    stack = LocalStack(a.model, a.run_dir or tempfile.mkdtemp(prefix="sg-stages-"), port=0,
                       redis_appendonly=False, **overrides)
    await stack.start(log=lambda m: print(m, file=sys.stderr))
    try:
        def drive():
            with LoadGenerator(f"127.0.0.1:{stack.port}", a.events, 1, 1, 1.0, a.arrival) as lg:
                lg.run(a.rate, 1.0, 1.0)              # warm-up step, not counted
                SAMPLES.clear()
                return lg, lg.run(a.rate, a.duration, 0.0)
        lg, step = await asyncio.to_thread(drive)
    finally:
        await stack.stop()
    res = summarise([])
    lat = step["latency_ms"]
    res["rpc (client)"] = {"n": step["ok"], "p50_ms": lat["p50"], "mean_ms": lat["mean"], "p99_ms": lat["p99"]}
    res["load"] = {k: step[k] for k in ("offered_rps", "achieved_rps", "ok", "degraded", "n_errors")}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--arrival", default="uniform", choices=("uniform", "poisson"))
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default="", help="also write the numbers here")
    a = ap.parse_args(argv)
    res = asyncio.run(run(a))
    print(table(res))
    print("load:", res["load"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
