"""Step-model throughput on a GPU without TensorRT: what serving one LSTM step per event costs.

    python bench/gpu_step.py [--model runs/model] [--batches 1,8,64,256,1024,4096]
    python bench/gpu_step.py --cpu          # the same table on CPU, for comparison

Backends (GPU): torch CUDA eager, torch CUDA graphs (one graph captured per batch size), and
ONNX Runtime with the CUDAExecutionProvider (needs `onnxruntime-gpu`; said so when missing).
Backends (--cpu): torch eager and ONNX Runtime on CPU.

torch rows use device-resident inputs (pure compute + launch overhead); ONNX Runtime rows are
fed numpy arrays, so they include the host<->device copies a server pays. Each timed iteration
is synchronised, so latency = one batch's wall time and events/s = batch / mean latency.

On a machine without CUDA (and without --cpu) it prints "no GPU: skipped" and exits 0.
For TensorRT numbers see `seqguard export --tensorrt` and trtexec/perf_analyzer (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from seqguard.step_contract import INPUT_NAMES, OUTPUT_NAMES, random_inputs

ROOT = Path(__file__).resolve().parent.parent


def load_encoder(model_dir: str | None, n_types: int, n_features: int, hidden: int, tmp: Path):
    """(SequenceEncoder, onnx path): a trained artifact's, or random weights of the given size."""
    import torch
    from seqguard.training.model import EncoderConfig, SequenceEncoder, export_onnx
    if model_dir:
        ckpt = torch.load(Path(model_dir) / "encoder.pt", map_location="cpu", weights_only=False)
        enc = SequenceEncoder(EncoderConfig(**ckpt["config"]))
        enc.load_state_dict(ckpt["state_dict"])
        return enc.eval(), Path(model_dir) / "model.onnx"
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_types=n_types, n_features=n_features, hidden=hidden)).eval()
    onnx_path = tmp / "step.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(enc, str(onnx_path))
    return enc, onnx_path


def make_inputs(batch: int, cfg, seed: int = 0) -> dict:
    return random_inputs(batch, cfg.n_features, cfg.hidden, cfg.n_types, seed)


def timed(fn, sync, iters: int, warmup: int, max_seconds: float) -> np.ndarray:
    for _ in range(warmup):
        fn()
    sync()
    lat = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(lat) >= 5:
            break
    return np.asarray(lat)


def bench_torch(step, cfg, batches, device, graphs: bool, args, rows: list, label: str) -> None:
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in batches:
        x = {k: torch.from_numpy(v).to(device) for k, v in make_inputs(b, cfg).items()}
        feeds = tuple(x[name] for name in INPUT_NAMES)
        with torch.inference_mode():
            if graphs:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):           # warm up (allocations) off the capture stream
                    for _ in range(3):
                        step(*feeds)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                static_out = []                         # the graph's output buffers stay alive with it
                with torch.cuda.graph(graph):
                    static_out.append(step(*feeds))
                fn = graph.replay
            else:
                def fn(feeds=feeds):
                    return step(*feeds)
            lat = timed(fn, sync, args.iters, args.warmup, args.max_seconds)
        rows.append((label, b, lat))
        print(f"  {label:24s} batch {b:5d}: {np.median(lat) * 1e3:8.3f} ms", file=sys.stderr, flush=True)


def bench_ort(onnx_path: Path, cfg, batches, provider: str, args, rows: list, label: str) -> None:
    import onnxruntime as ort
    so = ort.SessionOptions()
    if provider == "CPUExecutionProvider":
        so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=[provider])
    if provider not in sess.get_providers():
        raise RuntimeError(f"{provider} did not initialise (session has {sess.get_providers()})")
    for b in batches:
        feeds = make_inputs(b, cfg)
        lat = timed(lambda: sess.run(list(OUTPUT_NAMES), feeds), lambda: None, args.iters, args.warmup, args.max_seconds)
        rows.append((label, b, lat))
        print(f"  {label:24s} batch {b:5d}: {np.median(lat) * 1e3:8.3f} ms", file=sys.stderr, flush=True)


def markdown(rows: list) -> str:
    out = ["| backend | batch | p50 ms | p99 ms | mean ms | events/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for label, b, lat in rows:
        mean = float(lat.mean())
        out.append(f"| {label} | {b} | {np.median(lat) * 1e3:.3f} | {np.percentile(lat, 99) * 1e3:.3f} | "
                   f"{mean * 1e3:.3f} | {b / mean:,.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="artifact dir (encoder.pt + model.onnx); default: random weights")
    p.add_argument("--cpu", action="store_true", help="run the CPU backends instead (comparison)")
    p.add_argument("--batches", default="1,8,64,256,1024,4096")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=3.0, help="time cap per backend and batch")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--features", type=int, default=40)
    p.add_argument("--types", type=int, default=64)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("no GPU: skipped (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}). Run with --cpu for the CPU comparison table.")
        return 0
    from seqguard.training.model import StepModel

    rows: list = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        enc, onnx_path = load_encoder(args.model, args.types, args.features, args.hidden, Path(tmp))
        cfg = enc.cfg
        if args.cpu:
            torch.set_num_threads(args.threads)
            device = torch.device("cpu")
            title = f"CPU ({args.threads} threads, torch {torch.__version__})"
            bench_torch(StepModel(enc).eval(), cfg, batches, device, False, args, rows, "torch CPU eager")
            bench_ort(onnx_path, cfg, batches, "CPUExecutionProvider", args, rows, "ONNX Runtime CPU")
        else:
            device = torch.device("cuda")
            title = f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
            step = StepModel(enc).eval().to(device)
            bench_torch(step, cfg, batches, device, False, args, rows, "torch CUDA eager")
            bench_torch(step, cfg, batches, device, True, args, rows, "torch CUDA graphs")
            import onnxruntime as ort
            if "CUDAExecutionProvider" in ort.get_available_providers():
                try:
                    bench_ort(onnx_path, cfg, batches, "CUDAExecutionProvider", args, rows,
                              "ONNX Runtime CUDA EP")
                except Exception as exc:  # noqa: BLE001 - report and keep the torch rows
                    notes.append(f"ONNX Runtime CUDAExecutionProvider failed: {exc}")
            else:
                notes.append("ONNX Runtime CUDAExecutionProvider not available in this onnxruntime "
                             f"{ort.__version__} (providers {ort.get_available_providers()}); "
                             "install onnxruntime-gpu for those rows")
    print(f"\n### seqguard step model on {title}\n")
    print(f"F={cfg.n_features}, H={cfg.hidden}, {cfg.n_types} event types; "
          f"{'trained model ' + args.model if args.model else 'random weights'}. "
          + ("torch and ONNX Runtime both fed in-memory tensors/arrays.\n" if args.cpu else
             "torch rows: device-resident inputs; ONNX Runtime rows: numpy in/out (includes copies).\n"))
    print(markdown(rows))
    for n in notes:
        print(f"\nnote: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
