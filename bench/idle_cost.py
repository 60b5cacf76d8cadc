"""What an idle gap between requests costs: each stage timed back to back and after gaps.

At low request rates every Score arrives after an idle gap, and on this VM everything runs
slower after one (threads asleep, caches and branch predictors cold, vCPUs halted). This
measures the same calls with 0, 2 and 20 ms of sleep between them, in one process, against a
real Triton serving the model:

    detector      Detector risk for one event (in-process numpy + ONNX Runtime forest)
    triton live   tritonclient.grpc.aio is_server_live (gRPC round trip, no model)
    triton step   TritonStepClient.step, batch 1 (gRPC + Python backend + ONNX Runtime)

    python -m bench.idle_cost --model runs/m20k_sess [--n 300]

Not a test: it prints p50 / p90 per stage and gap.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from seqguard.featurizer import N_FEATURES

GAPS_S = (0.0, 0.002, 0.02)


def _row(name: str, gap: float, xs: list[float]) -> str:
    a = np.asarray(xs) * 1e3
    return f"| {name} | {gap * 1e3:.0f} | {np.percentile(a, 50):.3f} | {np.percentile(a, 90):.3f} |"


def detector_rows(model_dir: str, n: int) -> list[str]:
    from seqguard.artifact import ModelArtifact
    det = ModelArtifact.load(model_dir).detector
    rng = np.random.default_rng(0)
    emb = rng.random((1, det.proj_mean.shape[0])).astype(np.float32)
    sur, feats, t = rng.random((1, 2)).astype(np.float32), rng.random((1, N_FEATURES)).astype(np.float32), np.array([5])
    rows = []
    for _ in range(50):
        det.risk(emb, sur, feats, t)
    for gap in GAPS_S:
        xs = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            det.risk(emb, sur, feats, t)
            xs.append(time.perf_counter() - t0)
        rows.append(_row("detector (1 event)", gap, xs))
    return rows


async def triton_rows(model_dir: str, n: int) -> list[str]:
    import tritonclient.grpc.aio as grpcclient

    from seqguard.gateway.triton_client import TritonStepClient
    from seqguard.artifact import ModelArtifact
    from seqguard.services import TritonServer
    art = ModelArtifact.load(model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, TritonServer(Path(model_dir) / "model_repository",
                                                            models=["seqguard_encoder"], run_dir=tmp) as tr:
        live = grpcclient.InferenceServerClient(tr.address)
        step = TritonStepClient(tr.address, art.triton_model_name, art.triton_model_version, timeout_ms=2000)
        H, F = art.hidden, art.encoder_features
        args = (np.zeros(1, np.int64), np.zeros((1, F), np.float32), np.zeros((1, H), np.float32),
                np.zeros((1, H), np.float32))
        for _ in range(50):
            await step.step(*args)
        for name, call in (("triton live (no model)", live.is_server_live), ("triton step (batch 1)",
                                                                            lambda: step.step(*args))):
            for gap in GAPS_S:
                xs = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await call()
                    xs.append(time.perf_counter() - t0)
                    if gap:
                        await asyncio.sleep(gap)
                rows.append(_row(name, gap, xs))
        await live.close()
        await step.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/m20k_sess")
    ap.add_argument("--n", type=int, default=300, help="calls per stage and gap")
    args = ap.parse_args(argv)
    rows = detector_rows(args.model, args.n) + asyncio.run(triton_rows(args.model, args.n))
    print("| stage | idle gap ms | p50 ms | p90 ms |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
