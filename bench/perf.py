"""perf_analyzer (shipped in the tritonclient wheel) against the Triton step model.

The binary needs libb64.so.0d and libcudart.so.12; the nvidia-pytriton wheel carries both
under hashed names in site-packages/nvidia_pytriton.libs, so we symlink them under their
sonames into a directory put first on LD_LIBRARY_PATH (even on CPU it links libcudart).
Inputs are zeros (event type 0 is the "unknown" token, always valid); batch 1, one
perf_analyzer run per concurrency, gRPC.

    python -m bench.perf --url 127.0.0.1:8001 --model seqguard_encoder --concurrency 1,2,4,8,16
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

SONAMES = {"libb64.so.0d": "libb64*.so.0d*", "libcudart.so.12": "libcudart*.so.12*"}


class PerfAnalyzerUnavailable(RuntimeError):
    pass


def find_perf_analyzer() -> Path:
    for cand in (Path(sys.prefix) / "bin" / "perf_analyzer", shutil.which("perf_analyzer")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise PerfAnalyzerUnavailable("perf_analyzer not found: it ships in the tritonclient wheel "
                                  "(pip install 'tritonclient[grpc]==2.50.0')")


def lib_dir(dest: Path) -> Path:
    """A directory with libb64.so.0d and libcudart.so.12 links (from nvidia_pytriton.libs)."""
    import importlib.util
    dest.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return dest   # maybe the system has them (e.g. a CUDA machine)
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    for soname, pattern in SONAMES.items():
        found = sorted(libs.glob(pattern))
        link = dest / soname
        if found and not link.exists():
            link.symlink_to(found[0])
    return dest


def _env(libs: Path) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _num(x: str):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _sum(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def run_perf_analyzer(url: str, model: str, concurrencies=(1, 2, 4, 8, 16), work_dir: Path | None = None,
                      measurement_ms: int = 2000, stability: int = 50, max_trials: int = 10,
                      batch: int = 1, timeout_s: float = 180.0, log=print) -> dict:
    """{"rows": [{concurrency, infer_per_s, p50_us, p90_us, p95_us, p99_us, avg_us, server_queue_us,
    server_compute_us}], "errors": {conc: text}, "command": str}."""
    pa = find_perf_analyzer()
    work = Path(work_dir or ".perf_analyzer").resolve()
    libs = lib_dir(work / "libs")
    env = _env(libs)
    rows, errors, cmd = [], {}, []
    for c in concurrencies:
        out_csv = work / f"perf_c{c}.csv"
        cmd = [str(pa), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
               "--concurrency-range", str(c), "--measurement-interval", str(measurement_ms),
               "--stability-percentage", str(stability), "--max-trials", str(max_trials),
               "--input-data", "zero", "-f", str(out_csv)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            errors[c] = f"timed out after {timeout_s:.0f} s"
            log(f"  perf_analyzer c={c}: {errors[c]}")
            continue
        (work / f"perf_c{c}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0 or not out_csv.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            errors[c] = " | ".join(tail) or f"exit code {p.returncode}"
            log(f"  perf_analyzer c={c}: failed: {errors[c]}")
            continue
        with open(out_csv) as f:
            for rec in csv.DictReader(f):
                g = lambda k: _num(rec.get(k))  # noqa: E731
                queue, compute = g("Server Queue"), [g("Server Compute Input"), g("Server Compute Infer"),
                                                     g("Server Compute Output")]
                row = {"concurrency": int(float(rec["Concurrency"])), "infer_per_s": g("Inferences/Second"),
                       "p50_us": g("p50 latency"), "p90_us": g("p90 latency"), "p95_us": g("p95 latency"),
                       "p99_us": g("p99 latency"),
                       # the CSV has no average column: the mean is the sum of its mean components
                       "avg_us": g("Avg latency") or _sum(g(k) for k in (
                           "Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                           "Server Compute Infer", "Server Compute Output", "Client Recv")),
                       "server_queue_us": queue,
                       "server_compute_us": sum(x for x in compute if x is not None) if any(
                           x is not None for x in compute) else None}
                rows.append(row)
                log(f"  perf_analyzer c={row['concurrency']}: {row['infer_per_s'] or 0:.0f} infer/s, "
                    f"p50 {(row['p50_us'] or 0) / 1000:.2f} ms, p99 {(row['p99_us'] or 0) / 1000:.2f} ms")
    return {"rows": rows, "errors": {str(k): v for k, v in errors.items()},
            "command": " ".join(cmd[:-2]).replace(str(pa), "perf_analyzer") if cmd else ""}


def markdown(res: dict) -> str:
    lines = ["| concurrency | infer/s | p50 ms | p90 ms | p99 ms | mean ms | server queue ms | server compute ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda us: "-" if us is None else f"{us / 1000:.2f}"  # noqa: E731
    for r in res.get("rows", []):
        lines.append(f"| {r['concurrency']} | {r['infer_per_s'] or 0:.0f} | {ms(r['p50_us'])} | {ms(r['p90_us'])} | "
                     f"{ms(r['p99_us'])} | {ms(r['avg_us'])} | {ms(r['server_queue_us'])} | "
                     f"{ms(r['server_compute_us'])} |")
    for c, e in res.get("errors", {}).items():
        lines.append(f"| {c} | failed: {e} | | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="perf_analyzer concurrency sweep against a Triton model")
    ap.add_argument("--url", required=True, help="Triton gRPC host:port")
    ap.add_argument("--model", default="seqguard_encoder")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--measurement-ms", type=int, default=2000)
    ap.add_argument("--work-dir", default=None)
    a = ap.parse_args(argv)
    res = run_perf_analyzer(a.url, a.model, [int(x) for x in a.concurrency.split(",")],
                            Path(a.work_dir) if a.work_dir else None, a.measurement_ms)
    print(markdown(res))
    return 0 if res["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
