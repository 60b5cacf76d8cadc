"""The TensorRT entry ``seqguard_encoder_trt``: its Triton config, the engine build (FP16, INT8 with
calibration), the parity check against ONNX Runtime, timing, and publishing a checked plan.

Same I/O contract as the CPU entry (seqguard.step_contract). TensorRT is imported lazily:
everything here except the build/run/parity functions runs (and is tested) on a machine
without a GPU. See docs/gpu.md for the container that has TensorRT.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from seqguard.step_contract import INPUT_NAMES, OUTPUT_NAMES, random_inputs, trailing_dims
from seqguard.triton_repo import onnx_dims, publish_version, tensor_blocks

TRT_MODEL_NAME = "seqguard_encoder_trt"
TRT_PREFERRED_BATCH_SIZES = (64, 256, 1024)
GPU_DOC = "docs/gpu.md"
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"   # Triton 2.51 (= nvidia-pytriton 0.7.0), TensorRT 10.5
TRT_PIP = "tensorrt-cu12==10.5.0"                             # the same TensorRT, as a PyPI wheel


class TensorRTUnavailable(RuntimeError):
    """The TensorRT Python bindings (or a CUDA device) are missing on this machine."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _n_event_types(onnx_path: str | os.PathLike) -> int | None:
    """Rows of the event-type embedding table (the largest valid id + 1), if it can be found."""
    try:
        import onnx
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - only a hint for random inputs
        return None
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input and node.input[0] in inits:
            dims = list(inits[node.input[0]].dims)
            if len(dims) == 2:
                return int(dims[0])
    return None


# ------------------------------------------------------------------------ the Triton config (no TRT)
def render_tensorrt_config(*, model_name: str = TRT_MODEL_NAME, n_features: int = 40,
                           hidden: int = 128, max_batch_size: int = 4096, instances: int = 1,
                           gpus: Sequence[int] | None = None,
                           preferred_batch_sizes: Sequence[int] = TRT_PREFERRED_BATCH_SIZES,
                           max_queue_delay_us: int = 100, keep_versions: int = 2,
                           event_type_dtype: str = "TYPE_INT64") -> str:
    """config.pbtxt text for the TensorRT plan (pure string work: testable without TensorRT)."""
    for label, value in (("n_features", n_features), ("hidden", hidden),
                         ("max_batch_size", max_batch_size), ("instances", instances),
                         ("keep_versions", keep_versions)):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if event_type_dtype not in ("TYPE_INT64", "TYPE_INT32"):
        raise ValueError(f"event_type_dtype must be TYPE_INT64 or TYPE_INT32, got {event_type_dtype}")
    if not model_name or any(not (ch.isalnum() or ch in "_.-") for ch in model_name):
        raise ValueError(f"bad model name {model_name!r}")
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})
    if not preferred:
        preferred = [max_batch_size]
    gpu_line = ""
    if gpus:
        gpu_line = f"\n    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]"
    dims = trailing_dims(n_features, hidden)
    data_types = {"event_type": event_type_dtype}

    return f"""\
# seqguard step encoder as a TensorRT plan (GPU). Rendered by
# seqguard.training.tensorrt.render_tensorrt_config(); re-export instead of editing by hand.
# Same I/O contract as seqguard_encoder; I/O stays FP32 (h/c round-trip through Redis in FP32)
# even when the engine computes in FP16/INT8 inside.
name: "{model_name}"
platform: "tensorrt_plan"
# Must not exceed the engine's optimization-profile max batch (build_tensorrt_engine max_batch).
max_batch_size: {max_batch_size}
input [
{tensor_blocks(INPUT_NAMES, dims, data_types=data_types)}
]
output [
{tensor_blocks(OUTPUT_NAMES, dims)}
]

# One step is tiny on a GPU: throughput comes from merging many users' events into one launch.
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}

# Execution instances per GPU: 2 overlap one batch's H2D/D2H copies with another's compute.
instance_group [
  {{
    count: {instances}
    kind: KIND_GPU{gpu_line}
  }}
]

# Keep the previous version loaded too, so gateways pinned to it (metadata.triton.model_version)
# keep working while a rolling update moves them to the new one.
version_policy: {{ latest: {{ num_versions: {keep_versions} }} }}
default_model_filename: "model.plan"
"""


def write_tensorrt_repository(repository: str | os.PathLike, plan_path: str | os.PathLike, *,
                              model_name: str = TRT_MODEL_NAME, version: int = 1,
                              n_features: int, hidden: int, max_batch_size: int = 4096,
                              instances: int = 1, gpus: Sequence[int] | None = None,
                              keep_versions: int = 2, event_type_dtype: str = "TYPE_INT64",
                              move: bool = False) -> Path:
    """Write ``<repository>/<model_name>/config.pbtxt`` and ``<version>/model.plan``; return the
    model directory. The version directory is staged and renamed into place (a polling Triton
    never sees half a plan). ``move`` moves the plan instead of copying it."""
    repository, plan_path = Path(repository), Path(plan_path)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    if not plan_path.is_file():
        raise FileNotFoundError(f"TensorRT plan not found: {plan_path}")
    config = render_tensorrt_config(model_name=model_name, n_features=n_features, hidden=hidden,
                                    max_batch_size=max_batch_size, instances=instances, gpus=gpus,
                                    keep_versions=keep_versions, event_type_dtype=event_type_dtype)
    return publish_version(repository / model_name, version, {"model.plan": plan_path}, config, move=move)


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT Python bindings are not installed ({exc}). On a GPU machine, inside "
            f"{TRITON_CONTAINER} (or any host with an NVIDIA driver): `pip install {TRT_PIP}` (the "
            f"TensorRT that Triton image runs), or build with trtexec there; exact commands in "
            f"{GPU_DOC}.") from None
    return trt


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def calibration_batches(onnx_path: str | os.PathLike, *, batch: int, n_batches: int,
                        features: np.ndarray | None = None, n_event_types: int | None = None,
                        feature_mean: Sequence[float] | None = None,
                        feature_std: Sequence[float] | None = None, seed: int = 0) -> list[dict]:
    """Input batches for INT8 calibration, with REALISTIC recurrent state.

    Features come from ``features`` (rows of a [N, F] array, e.g. a .npy of featurised training
    events) or, without it, a normal distribution (per-feature ``feature_mean``/``feature_std``
    when known, else N(0, 1)). h/c are not random: each batch's h_in/c_in is the h_out/c_out of
    the previous batch run through ONNX Runtime (zeros first), so the calibrator sees the state
    distribution the engine will see in production. Runs on CPU; no TensorRT needed.
    """
    import onnxruntime as ort
    n_features, hidden = onnx_dims(onnx_path)
    rng = np.random.default_rng(seed)
    if n_event_types is None:
        n_event_types = _n_event_types(onnx_path) or 1
    if features is not None:
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] < n_features:
            raise ValueError(f"calibration features have shape {features.shape}, expected [N, >= {n_features}]")
        features = np.ascontiguousarray(features[:, :n_features])   # the encoder reads the first F
    mean = np.zeros(n_features, np.float32) if feature_mean is None else np.asarray(feature_mean, np.float32)[:n_features]
    std = np.ones(n_features, np.float32) if feature_std is None else np.asarray(feature_std, np.float32)[:n_features]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    h = np.zeros((batch, hidden), np.float32)
    c = np.zeros((batch, hidden), np.float32)
    out = []
    for _ in range(n_batches):
        if features is not None:
            feats = features[rng.integers(0, len(features), size=batch)]
        else:
            feats = (mean + std * rng.standard_normal((batch, n_features))).astype(np.float32)
        feeds = {"event_type": rng.integers(0, n_event_types, size=(batch, 1), dtype=np.int64),
                 "features": np.ascontiguousarray(feats, np.float32), "h_in": h, "c_in": c}
        out.append(feeds)
        h, c = sess.run(["h_out", "c_out"], feeds)
        # every few steps start some users afresh, as new users do
        reset = rng.random(batch) < 0.1
        h, c = h.copy(), c.copy()
        h[reset] = 0.0
        c[reset] = 0.0
    return out


def _torch_dtype(trt, dt):
    import torch
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
             trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    return table[dt]


def _make_calibrator(trt, batches: list[dict], cache_file: Path | None, input_dtypes: dict):
    """An IInt8EntropyCalibrator2 feeding ``batches`` (device copies via torch CUDA tensors)."""
    import torch
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration (IInt8EntropyCalibrator2); "
            "quantise explicitly (Q/DQ nodes, e.g. NVIDIA ModelOpt) or build FP16 instead")

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._it = iter(batches)
            self._keep = {}
            self._batch = int(next(iter(batches[0].values())).shape[0])

        def get_batch_size(self):
            return self._batch

        def get_batch(self, names, *args):
            try:
                feeds = next(self._it)
            except StopIteration:
                return None
            ptrs = []
            for name in names:
                arr = feeds[name]
                if name in input_dtypes:
                    arr = arr.astype(input_dtypes[name], copy=False)
                t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
                self._keep[name] = t                  # keep alive until the next batch
                ptrs.append(int(t.data_ptr()))
            return ptrs

        def read_calibration_cache(self, *args):
            if cache_file is not None and cache_file.is_file():
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache, *args):
            if cache_file is not None:
                cache_file.write_bytes(bytes(cache))

    return _Calibrator()


def build_tensorrt_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *,
                          fp16: bool = True, int8: bool = False,
                          calib_data: str | os.PathLike | np.ndarray | None = None,
                          min_batch: int = 1, opt_batch: int = 256, max_batch: int = 4096,
                          workspace_gb: float = 4, calib_batches: int = 16, calib_batch: int = 256,
                          n_event_types: int | None = None,
                          feature_stats: tuple | None = None, verbose: bool = False) -> Path:
    """Build a TensorRT plan of the step model with one optimization profile over the batch dim.

    * Every input gets the profile (min/opt/max batch) x its static trailing dims:
      event_type [b,1], features [b,F], h_in/c_in [b,H].
    * ``fp16``: BuilderFlag.FP16 (I/O stays FP32; TensorRT picks FP16 kernels where faster).
    * ``int8``: BuilderFlag.INT8 + an IInt8EntropyCalibrator2 over ``calib_batches`` batches from
      :func:`calibration_batches` (features from ``calib_data``: a [N, F] array or a .npy path,
      else normal draws using ``feature_stats=(mean, std)``), with a cache next to the plan.
    * INT64 ``event_type``: TensorRT >= 10 has INT64 tensors, so the engine input is INT64 and
      the Triton config matches what the gateway sends. TensorRT 8.x has no INT64: its ONNX
      parser casts INT64 inputs down to INT32, so the engine takes INT32 ``event_type`` (ids are
      small, nothing is lost) and the Triton config must say TYPE_INT32 -- which the gateway does
      not send; :func:`main_export` therefore refuses to *serve* an 8.x plan (build is fine for
      benchmarking with trtexec/perf_analyzer). Use a TensorRT 10 container (docs/gpu.md).
    """
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}/{opt_batch}/{max_batch}")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse_onnx(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    else:                               # TensorRT < 8.4
        config.max_workspace_size = int(workspace_gb * (1 << 30))
    input_dtypes = _add_batch_profile(trt, builder, network, config, (min_batch, opt_batch, max_batch), onnx_path)
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            _log("warning: this GPU has no fast FP16; building anyway")
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (weakly typed "
                                      "networks removed); export an FP16 ONNX and build strongly typed")
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        if not getattr(builder, "platform_has_fast_int8", True):
            _log("warning: this GPU has no fast INT8; building anyway")
        feats = np.load(calib_data) if isinstance(calib_data, (str, os.PathLike)) else (
            None if calib_data is None else np.asarray(calib_data))
        mean, std = feature_stats if feature_stats is not None else (None, None)
        batches = calibration_batches(onnx_path, batch=calib_batch, n_batches=calib_batches,
                                      features=feats, n_event_types=n_event_types,
                                      feature_mean=mean, feature_std=std)
        _enable_int8(trt, builder, network, config, batches, plan_path.with_suffix(".calib"), input_dtypes)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(f".{plan_path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, plan_path)
    return plan_path


def _parse_onnx(trt, builder, logger, onnx_path: Path):
    """The TensorRT network of the ONNX step model (explicit batch)."""
    flags = 0
    if _trt_major(trt) < 10:           # explicit batch is the only mode (and the default) in 10+
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network


def _input_tails(network) -> dict[str, tuple[int, ...]]:
    """Each network input's dims after the batch dimension."""
    return {network.get_input(i).name: tuple(int(d) for d in tuple(network.get_input(i).shape)[1:])
            for i in range(network.num_inputs)}


def _add_batch_profile(trt, builder, network, config, batch: tuple[int, int, int], onnx_path: Path) -> dict:
    """One optimization profile, (min, opt, max) ``batch`` x each input's static trailing dims.
    Returns the numpy dtype the engine takes per input (the INT8 calibrator feeds those)."""
    profile = builder.create_optimization_profile()
    input_dtypes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        tail = tuple(int(d) for d in tuple(tensor.shape)[1:])
        if any(d < 0 for d in tail):
            raise ValueError(f"input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, *((b, *tail) for b in batch))
        input_dtypes[tensor.name] = np.int32 if tensor.dtype == trt.DataType.INT32 else (
            np.int64 if tensor.dtype == getattr(trt.DataType, "INT64", None) else np.float32)
    missing = set(INPUT_NAMES) - set(input_dtypes)
    if missing:
        raise ValueError(f"{onnx_path}: missing step-model inputs {sorted(missing)} (has {list(input_dtypes)})")
    config.add_optimization_profile(profile)
    return input_dtypes


def _enable_int8(trt, builder, network, config, batches: list[dict], cache: Path, input_dtypes: dict) -> None:
    """INT8 with an entropy calibrator over ``batches``; its profile is fixed at their batch size."""
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = _make_calibrator(trt, batches, cache, input_dtypes)
    calib_batch = int(next(iter(batches[0].values())).shape[0])
    calib_profile = builder.create_optimization_profile()
    for name, tail in _input_tails(network).items():
        shape = (calib_batch, *tail)
        calib_profile.set_shape(name, shape, shape, shape)
    config.set_calibration_profile(calib_profile)


class TensorRTStep:
    """Runs a step-model plan on the current CUDA device with torch tensors as buffers."""

    def __init__(self, plan_path: str | os.PathLike, device: int = 0):
        trt = import_tensorrt()
        try:
            import torch
        except ImportError as exc:
            raise TensorRTUnavailable(f"torch (with CUDA) is needed for device buffers: {exc}") from None
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA device visible (torch.cuda.is_available() is False)")
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {plan_path} (built with another TensorRT "
                               "version or for another GPU architecture?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def input_dtype_name(self, name: str) -> str:
        return str(self.dtypes[name]).replace("torch.", "")

    def run_torch(self, feeds: dict) -> dict:
        """feeds: name -> CUDA tensor (any dtype; converted to the engine's). Returns CUDA tensors."""
        torch = self.torch
        keep = {}
        # inputs may have been written on another stream (e.g. an H2D copy on the default one)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                t = feeds[name].to(self.device, self.dtypes[name]).contiguous()
                keep[name] = t
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outs

    def run(self, feeds: dict) -> dict:
        """numpy in, numpy out (float32 outputs)."""
        torch = self.torch
        dev = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.inputs}
        outs = self.run_torch(dev)
        return {n: t.float().cpu().numpy() for n, t in outs.items()}


def check_tensorrt_parity(plan_path: str | os.PathLike, onnx_path: str | os.PathLike, n: int = 512,
                          atol: float | None = None, *, seed: int = 0,
                          details: dict | None = None) -> float:
    """Max |TensorRT - ONNX Runtime (CPU)| over all four outputs on one random batch of ``n``.

    ``details`` (a dict) receives per-output max abs and max relative differences. With ``atol``
    a larger difference raises AssertionError (FP16: ~1e-2; INT8: looser, check the risks
    end-to-end instead)."""
    import onnxruntime as ort
    n_features, hidden = onnx_dims(onnx_path)
    feeds = random_inputs(n, n_features, hidden, _n_event_types(onnx_path) or 1, seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), feeds)))
    got = TensorRTStep(plan_path).run(feeds)
    worst = 0.0
    for name in OUTPUT_NAMES:
        diff = np.abs(got[name].astype(np.float64) - ref[name].astype(np.float64))
        d = float(diff.max()) if diff.size else 0.0
        worst = max(worst, d)
        if details is not None:
            rel = diff / np.maximum(np.abs(ref[name]), 1e-3)
            details[name] = {"max_abs": d, "max_rel": float(rel.max()) if rel.size else 0.0}
    if atol is not None and not worst <= atol:
        raise AssertionError(f"TensorRT vs ONNX Runtime: max abs diff {worst:.3g} > atol {atol:g} "
                             f"({details or ''})")
    return worst


def time_tensorrt(plan_path: str | os.PathLike, n_features: int, hidden: int,
                  batches: Iterable[int] = (1, 256, 4096), iters: int = 200) -> list[tuple[int, float]]:
    """[(batch, mean ms per launch)] with device-resident inputs (no host copies)."""
    step = TensorRTStep(plan_path)
    torch = step.torch
    rows = []
    for b in batches:
        feeds = {k: torch.from_numpy(v).to(step.device)
                 for k, v in random_inputs(b, n_features, hidden).items()}
        for _ in range(10):
            step.run_torch(feeds)
        start = time.perf_counter()
        for _ in range(iters):
            step.run_torch(feeds)
        rows.append((b, (time.perf_counter() - start) * 1000 / iters))
    return rows


# ------------------------------------------------------------------- checking and publishing a plan
def _tensorrt_checks(plan: Path, onnx_path: Path, n_features: int, hidden: int, int8: bool) -> bool:
    """Print parity and timing of ``plan``; False if parity is outside the precision's limit."""
    details: dict = {}
    diff = check_tensorrt_parity(plan, onnx_path, n=512, details=details)
    _log(f"parity vs ONNX Runtime CPU (512 random rows): max abs diff {diff:.2e}")
    for name, d in details.items():
        _log(f"  {name:10s} max abs {d['max_abs']:.2e}  max rel {d['max_rel']:.2e}")
    limit = 5e-2 if int8 else 1e-2
    if diff > limit:
        _log(f"NOT published: max abs diff {diff:.2e} > {limit:g} (try without --int8, or compare "
             "risks end-to-end before serving it)")
        return False
    for b, ms in time_tensorrt(plan, n_features, hidden):
        _log(f"  batch {b:5d}: {ms:.3f} ms/launch  {b / ms * 1000:,.0f} events/s (device-resident I/O)")
    return True


def publish_tensorrt(art, repository: Path, version: int, instances: int, int8: bool,
                     calib_features: str | None, plan: str | None = None,
                     max_batch: int = 4096) -> int:
    """Build (or take ``plan``, e.g. from trtexec), check, and publish the TensorRT entry."""
    n_features, hidden = onnx_dims(art.onnx_path)
    model_dir = repository / TRT_MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_plan = model_dir / f".build-{version}-{os.getpid()}.plan"
    try:
        if plan is not None:
            shutil.copyfile(plan, tmp_plan)
            _log(f"using prebuilt plan {plan} ({tmp_plan.stat().st_size / 1e6:.1f} MB; its profile "
                 f"max batch must be >= {max_batch})")
            try:
                ok = _tensorrt_checks(tmp_plan, art.onnx_path, n_features, hidden, int8)
            except TensorRTUnavailable as exc:
                _log(f"warning: parity NOT checked ({exc})")
                ok = True
        else:
            trt = import_tensorrt()
            if _trt_major(trt) < 10:
                raise TensorRTUnavailable(
                    f"TensorRT {trt.__version__} has no INT64 tensors: the plan's event_type would be "
                    f"INT32 but the gateway sends INT64. Use TensorRT >= 10 ({TRT_PIP}); see {GPU_DOC}.")
            training = art.metadata.get("training", {})
            stats = None
            if training.get("feature_mean") and training.get("feature_std"):
                stats = (training["feature_mean"], training["feature_std"])
            t0 = time.time()
            build_tensorrt_engine(art.onnx_path, tmp_plan, fp16=True, int8=int8,
                                  calib_data=calib_features, max_batch=max_batch,
                                  n_event_types=int(art.metadata["encoder"]["n_types"]),
                                  feature_stats=stats)
            _log(f"built {'INT8+FP16' if int8 else 'FP16'} plan with TensorRT {trt.__version__}: "
                 f"{tmp_plan.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f}s "
                 f"(batch profile 1/256/{max_batch})")
            ok = _tensorrt_checks(tmp_plan, art.onnx_path, n_features, hidden, int8)
        if not ok:
            return 3
        write_tensorrt_repository(repository, tmp_plan, version=version, n_features=n_features,
                                  hidden=hidden, max_batch_size=max_batch, instances=instances,
                                  move=True)
    finally:
        tmp_plan.unlink(missing_ok=True)
        tmp_plan.with_suffix(".calib").unlink(missing_ok=True)
    _log(f"wrote {model_dir / 'config.pbtxt'} (tensorrt_plan, KIND_GPU x{instances}, "
         f"max_batch_size {max_batch})")
    _log(f"wrote {model_dir / str(version) / 'model.plan'}")
    return 0

