"""Real services: Triton (Python backend + ONNX Runtime, CPU) and Redis, started and stopped.

Builds a tiny step model honouring the ONNX I/O contract (conftest.build_tiny_step_onnx,
F=8, H=16), writes a model repository with write_model_repository, serves it with a real
tritonserver and checks its answers against ONNX Runtime run locally on the same file.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_EVENT_TYPES, TINY_F, TINY_H
from seqguard.services import (
    ManagedService, RedisServer, ServiceError, ServiceNotInstalled, free_port,
)
from seqguard.step_contract import OUTPUT_NAMES
from seqguard.triton_repo import (
    next_version, render_config, write_model_repository,
)

MODEL = "seqguard_encoder"
COMMITTED_MODEL_DIR = Path(__file__).resolve().parent.parent / "model_repository" / "seqguard_encoder"
OUTPUTS = OUTPUT_NAMES
ATOL = 1e-6


# -- helpers ----------------------------------------------------------------------------------
def make_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "event_type": rng.integers(0, TINY_EVENT_TYPES, size=(n, 1), dtype=np.int64),
        "features": rng.standard_normal((n, TINY_F), dtype=np.float32),
        "h_in": rng.standard_normal((n, TINY_H), dtype=np.float32) * 0.5,
        "c_in": rng.standard_normal((n, TINY_H), dtype=np.float32) * 0.5,
    }


def local_run(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), feeds)))


def infer_inputs(module, feeds: dict[str, np.ndarray]):
    inputs = []
    for name, arr in feeds.items():
        inp = module.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def process_group(pgid: int) -> list[int]:
    """PIDs of live processes in process group ``pgid`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- model repository (no server) -------------------------------------------------------------
def test_committed_config_is_the_rendered_default():
    committed = (COMMITTED_MODEL_DIR / "config.pbtxt").read_text()
    assert committed == render_config(), (
        "model_repository/seqguard_encoder/config.pbtxt differs from render_config(): "
        "re-render it with seqguard.triton_repo.render_config()")


def test_committed_gpu_config_is_the_rendered_default():
    """The GPU variant (TensorRT plan, KIND_GPU) sits next to the CPU one so an SRE sees both; its
    config is what `seqguard export --tensorrt` renders (the plan is built by export on the GPU host)."""
    from seqguard.training.tensorrt import render_tensorrt_config
    committed = (COMMITTED_MODEL_DIR.parent / "seqguard_encoder_trt" / "config.pbtxt").read_text()
    assert committed == render_tensorrt_config(), (
        "model_repository/seqguard_encoder_trt/config.pbtxt differs from render_tensorrt_config(): "
        "re-render it with seqguard.training.tensorrt.render_tensorrt_config()")
    assert 'platform: "tensorrt_plan"' in committed and "kind: KIND_GPU" in committed


@pytest.mark.slow
def test_write_model_repository_layout(tmp_path, tiny_step_onnx):
    repo = tmp_path / "repo"
    assert next_version(repo, MODEL) == 1
    out = write_model_repository(repo, tiny_step_onnx, n_features=TINY_F, hidden=TINY_H,
                                 max_batch_size=64, instances=2, ort_threads=2)
    assert out == repo
    model_dir = repo / MODEL
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx", "model.py"]
    cfg = (model_dir / "config.pbtxt").read_text()
    assert f"dims: [ {TINY_F} ]" in cfg and "max_batch_size: 64" in cfg
    assert "count: 2" in cfg and 'string_value: "2"' in cfg
    assert "preferred_batch_size: [ 16, 64 ]" in cfg   # sizes above max_batch_size dropped
    assert next_version(repo, MODEL) == 2
    write_model_repository(repo, tiny_step_onnx, version=2, n_features=TINY_F, hidden=TINY_H)
    assert next_version(repo, MODEL) == 3
    with pytest.raises(ValueError, match="features"):   # F mismatch caught before Triton
        write_model_repository(tmp_path / "bad", tiny_step_onnx, n_features=40, hidden=TINY_H)


# -- Triton -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory, tiny_step_onnx) -> Path:
    return write_model_repository(tmp_path_factory.mktemp("repo"), tiny_step_onnx,
                                  n_features=TINY_F, hidden=TINY_H)


@pytest.fixture(scope="module")
def triton(triton_server_factory, triton_repo):
    server = triton_server_factory(triton_repo)
    print(f"\ntriton ready in {server.startup_s:.2f} s at {server.grpc_url}")
    return server


@pytest.mark.slow
def test_triton_server_and_model_ready(triton):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL, as_json=True)
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert shapes == {"event_type": ("INT64", [-1, 1]), "features": ("FP32", [-1, TINY_F]),
                      "h_in": ("FP32", [-1, TINY_H]), "c_in": ("FP32", [-1, TINY_H])}
    assert triton.is_model_ready(MODEL, version=1)


@pytest.mark.slow
def test_triton_batch_of_8_matches_local_onnxruntime(triton, tiny_step_onnx):
    import tritonclient.grpc as grpcclient

    feeds = make_inputs(8, seed=1)
    want = local_run(tiny_step_onnx, feeds)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        result = client.infer(MODEL, infer_inputs(grpcclient, feeds),
                              outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == want[name].shape
        assert np.max(np.abs(got - want[name])) <= ATOL, name


@pytest.mark.slow
def test_triton_32_concurrent_aio_requests(triton, tiny_step_onnx):
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

    n = 32
    feeds = make_inputs(n, seed=2)
    want = local_run(tiny_step_onnx, feeds)

    async def run_all():
        client = aioclient.InferenceServerClient(triton.grpc_url)
        try:
            async def one(i):
                row = {k: v[i:i + 1] for k, v in feeds.items()}
                return await client.infer(MODEL, infer_inputs(grpcclient, row))
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert len(results) == n
    for i, result in enumerate(results):
        for name in OUTPUTS:
            got = result.as_numpy(name)
            assert got.shape == (1,) + want[name].shape[1:]
            assert np.max(np.abs(got[0] - want[name][i])) <= ATOL, (i, name)

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    print(f"\ninferences {stats['inference_count']}, executions {stats['execution_count']}")
    assert int(stats["execution_count"]) <= int(stats["inference_count"])


@pytest.mark.slow
def test_triton_bad_request_gets_an_error_and_server_survives(triton, tiny_step_onnx):
    """An out-of-range event type fails its own request only, even when the dynamic batcher
    merges it with good ones (model.py then reruns the requests one by one)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    n = 16
    feeds = make_inputs(n, seed=3)
    feeds["event_type"][5, 0] = TINY_EVENT_TYPES + 100    # out of the embedding's range
    ok = [i for i in range(n) if i != 5]
    want = local_run(tiny_step_onnx, {k: v[ok] for k, v in feeds.items()})

    async def run_all():
        client = aioclient.InferenceServerClient(triton.grpc_url)
        try:
            async def one(i):
                row = {k: v[i:i + 1] for k, v in feeds.items()}
                return await client.infer(MODEL, infer_inputs(grpcclient, row))
            return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert isinstance(results[5], InferenceServerException)
    assert "inference failed" in str(results[5])
    for j, i in enumerate(ok):
        assert not isinstance(results[i], Exception), results[i]
        assert np.max(np.abs(results[i].as_numpy("h_out")[0] - want["h_out"][j])) <= ATOL
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_model_ready(MODEL)


@pytest.mark.slow
def test_triton_death_during_start_raises_with_log(triton_server_factory, tmp_path,
                                                   tiny_step_onnx):
    repo = write_model_repository(tmp_path / "repo", tiny_step_onnx,
                                  n_features=TINY_F, hidden=TINY_H)
    (repo / MODEL / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ServiceError, match="exited with code") as info:
        triton_server_factory(repo, timeout=30)
    message = str(info.value)
    assert "errors in the log" in message and "INVALID_PROTOBUF" in message, message
    assert "failed to load 'seqguard_encoder'" in message


@pytest.mark.slow
def test_triton_stop_leaves_no_process(triton):   # keep last among the Triton tests
    group = process_group(triton.pid)
    assert triton.pid in group and len(group) >= 2, group   # server + Python-backend stub
    ports = (triton.grpc_port, triton.http_port, triton.metrics_port)
    triton.stop()
    assert triton.proc.returncode is not None
    assert process_group(triton.pid) == []
    assert not any(port_open(p) for p in ports)
    assert triton.stop() == triton.proc.returncode   # idempotent


# -- Redis ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_redis_ping_set_get(redis_server):
    client = redis_server.client()
    assert client.ping() is True
    assert client.set("seqguard:test", "42") is True
    assert client.get("seqguard:test") == b"42"
    client.close()


@pytest.mark.slow
def test_redis_stop_leaves_no_process(tmp_path):
    server = RedisServer(free_port(), run_dir=tmp_path, password="s3cret", appendonly=True)
    with server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(b"PING\r\n")                  # no AUTH: refused
            assert s.recv(256).startswith(b"-NOAUTH")
        client = server.client()
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
        assert (server.data_dir / "appendonlydir").is_dir()
        pid = server.pid
    assert server.proc.returncode == 0
    assert process_group(pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not port_open(server.port)


def test_redis_missing_binary_message(tmp_path, monkeypatch):
    import seqguard.services as services

    monkeypatch.setattr(services.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(services, "REDIS_FALLBACK_PATHS", ())
    with pytest.raises(ServiceNotInstalled, match="apt-get install -y redis-server"):
        RedisServer(run_dir=tmp_path)


# -- process management ---------------------------------------------------------------------
class _Stubborn(ManagedService):
    """Ignores SIGTERM and leaves a grandchild in its process group: stop() must SIGKILL both."""
    name = "stubborn"
    stop_timeout = 0.5
    script = ("import signal, subprocess, sys, time, pathlib\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
              "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
              "time.sleep(60)\n")

    def _command(self):
        return [sys.executable, "-c", self.script, str(self.run_dir / "ready")]

    def _is_ready(self):
        return (self.run_dir / "ready").exists()

    @property
    def address(self):
        return "n/a"


def test_stop_kills_a_process_group_that_ignores_sigterm(tmp_path):
    service = _Stubborn(run_dir=tmp_path)
    with service:
        child = int((tmp_path / "ready").read_text())
        assert sorted(process_group(service.pid)) == sorted([service.pid, child])
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    assert service.proc.returncode == -9                # SIGKILLed after the SIGTERM timeout
    deadline = time.monotonic() + 2.0                   # SIGKILL is delivered asynchronously: on a
    while process_group(service.pid) and time.monotonic() < deadline:   # loaded machine the grandchild
        time.sleep(0.02)                                # can take a moment to die
    assert process_group(service.pid) == []             # grandchild gone too
