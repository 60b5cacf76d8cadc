"""Shared fixtures: real Redis and real Triton servers on free loopback ports.

* ``redis_server``: one RedisServer for the session (always stopped at the end).
* ``triton_server_factory``: ``start(repo_dir, models=("seqguard_encoder",), **kw)`` starts a
  real TritonServer on free ports, waits until the models are ready and returns it; every
  server it started is stopped at the end of the session (``server.stop()`` earlier is fine).
* ``tiny_step_onnx``: a small step model honouring the ONNX I/O contract (F=8, H=16), for
  tests that need a real model in Triton without training one; ``build_tiny_step_onnx()``
  makes others.

Tests that need a missing program are skipped with the install command as the reason.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from seqguard.services import (  # noqa: E402
    RedisServer, ServiceNotInstalled, TritonServer, find_tritonserver, prepare_backend_dir,
)
from seqguard.step_contract import INPUT_NAMES, OUTPUT_NAMES  # noqa: E402

TINY_F, TINY_H, TINY_EVENT_TYPES = 8, 16, 6


def build_tiny_step_onnx(path, *, n_features: int = TINY_F, hidden: int = TINY_H,
                         n_event_types: int = TINY_EVENT_TYPES, seed: int = 0) -> Path:
    """Export a random-weight step model (Embedding + LSTMCell + linear heads) to ``path``.

    Honours the contract: inputs event_type INT64 [B,1], features FP32 [B,F], h_in/c_in FP32
    [B,H]; outputs h_out, c_out, embedding FP32 [B,H], surprise FP32 [B,2]; batch dynamic.
    An event type >= n_event_types makes ONNX Runtime fail (out-of-range Gather).
    """
    torch = pytest.importorskip("torch", reason="torch needed to export a test model "
                                                "(pip install -e '.[train]')")
    pytest.importorskip("onnx", reason="onnx needed by torch.onnx.export")
    from torch import nn

    class TinyStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(n_event_types, 4)
            self.cell = nn.LSTMCell(4 + n_features, hidden)
            self.head = nn.Linear(hidden, hidden)
            self.surprise = nn.Linear(hidden, 2)

        def forward(self, event_type, features, h_in, c_in):
            x = torch.cat([self.emb(event_type[:, 0]), features], dim=1)
            h, c = self.cell(x, (h_in, c_in))
            return h, c, torch.tanh(self.head(h)), self.surprise(h)

    torch.manual_seed(seed)
    model = TinyStep().eval()
    b = 2
    args = (torch.zeros(b, 1, dtype=torch.int64), torch.zeros(b, n_features),
            torch.zeros(b, hidden), torch.zeros(b, hidden))
    names_in, names_out = list(INPUT_NAMES), list(OUTPUT_NAMES)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the legacy exporter warns
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                          input_names=names_in, output_names=names_out,
                          dynamic_axes={n: {0: "batch"} for n in names_in + names_out})
    return path


@pytest.fixture(scope="session")
def tiny_step_onnx(tmp_path_factory) -> Path:
    return build_tiny_step_onnx(tmp_path_factory.mktemp("tiny_model") / "step.onnx")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    try:
        server = RedisServer(run_dir=tmp_path_factory.mktemp("redis"))
    except ServiceNotInstalled as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        server.wait_ready(timeout=15)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_install():
    try:
        return find_tritonserver()
    except ServiceNotInstalled as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def triton_backend_dir(triton_install, tmp_path_factory) -> Path:
    return prepare_backend_dir(tmp_path_factory.mktemp("triton_backends"), triton_install)


@pytest.fixture(scope="session")
def triton_server_factory(triton_install, triton_backend_dir, tmp_path_factory):
    started: list[TritonServer] = []

    def start(repo_dir, models=("seqguard_encoder",), timeout: float = 60.0,
              **kwargs) -> TritonServer:
        server = TritonServer(repo_dir, models=models, install=triton_install,
                              backend_dir=triton_backend_dir,
                              run_dir=tmp_path_factory.mktemp("triton_run"), **kwargs)
        started.append(server)
        server.start()
        try:
            server.wait_ready(timeout=timeout)
        except BaseException:
            server.stop()
            raise
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


# ------------------------------------------------------------------ a small trained model
@pytest.fixture(scope="session")
def small_log(tmp_path_factory):
    """A generated labelled log (400 users, 10 days) written as JSONL: (events path, labels path, events)."""
    from seqguard.training.generate import generate, write_events, write_labels
    d = tmp_path_factory.mktemp("log")
    events, labels = generate(400, seed=11, days=10)
    write_events(events, d / "events.jsonl")
    write_labels(labels, d / "labels.jsonl")
    return d / "events.jsonl", d / "labels.jsonl", events


@pytest.fixture(scope="session")
def small_model(small_log, tmp_path_factory) -> Path:
    """A model trained on small_log in seconds (tiny encoder, few trees); same code path as `seqguard train`."""
    from seqguard.training.train import TrainConfig, train
    out = tmp_path_factory.mktemp("model")
    cfg = TrainConfig(hidden=32, epochs=1, n_estimators=60, max_samples=256, seed=3, threads=2)
    train(str(small_log[0]), str(out), cfg, log=lambda m: None)
    return out


# ------------------------------------------------------------------ a gateway in a background event loop
class GatewayThread:
    """Runs gateway.server.Gateway in its own thread + event loop so tests can use the sync grpc client."""

    def __init__(self, settings):
        import asyncio
        import threading
        from seqguard.gateway.server import Gateway
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway(settings)
        self.port = self.call(self.gateway.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout=60):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        if not self.loop.is_running():   # stopped already (by the test); waiting on a dead loop took 60 s
            return
        try:
            self.call(self.gateway.stop(grace=2))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def triton(small_model, triton_server_factory):
    """A real tritonserver serving the small model, one per test module (a module may define its own)."""
    return triton_server_factory(small_model / "model_repository")


@pytest.fixture()
def stub(gateway):
    """A RiskScoring client of the module's `gateway` fixture."""
    import grpc

    from seqguard.gateway.proto import risk_pb2_grpc
    with grpc.insecure_channel(gateway.address) as ch:
        yield risk_pb2_grpc.RiskScoringStub(ch)


@pytest.fixture(scope="session")
def gateway_factory():
    """start(**settings) -> GatewayThread on a free port; all stopped at the end."""
    from seqguard.gateway.settings import Settings
    from seqguard.services import free_port
    started = []

    def start(**overrides):
        overrides.setdefault("port", free_port())
        overrides.setdefault("pseudonym_key", "test-pseudonym-key-0123456789")
        # every test gateway lives in the pytest process: freezing its heap would keep each test's
        # garbage cycles forever (test_gateway.py::test_serving_heap_is_frozen turns it on)
        overrides.setdefault("gc_freeze", False)
        # the production 50 ms Redis timeout is about outages; in a busy pytest process on 2 cores (a
        # garbage collection of the whole test process stalls the in-process gateway's loop) it turned
        # a healthy Redis answer DEGRADED now and then. Tests about timeouts pass their own value.
        overrides.setdefault("redis_timeout_ms", 1000)
        gw = GatewayThread(Settings.load(**overrides))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        try:
            gw.stop()
        except Exception:  # noqa: BLE001 - already stopped
            pass
