"""A small async client for the step encoder on Triton: one persistent gRPC channel, a deadline
per call, and one typed error for every way the call can fail.

It speaks Triton's gRPC protocol through the stubs tritonclient generates (`service_pb2`), not
through `tritonclient.grpc.aio.InferenceServerClient.infer`: that builds an InferInput object per
tensor and re-validates the request on every call, about a fifth of the client's CPU per call at
batch 1. Here the request is four raw tensors and a template of names, dtypes and requested
outputs made once."""
from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from seqguard.step_contract import DTYPES, INPUT_NAMES, OUTPUT_NAMES, TRITON_DTYPES, input_arrays


# Rows one triton_timeout_ms covers. A 1-row step (a lone online Score) keeps the plain timeout, so
# an outage is still detected within triton_timeout_ms; a wave of a bulk batch (up to one row per
# user of the batch) costs Triton time in proportion to its rows (~0.1-0.25 ms CPU per row on the
# bench's 2 shared cores, BENCHMARKS.md), and a fixed 100 ms timed out waves of a healthy but
# busy Triton, whose steps then ran twice (standby) or were deferred. The caller's remaining
# deadline caps the scaled timeout, so it never outlives the request.
ROWS_PER_TIMEOUT = 64


class EncoderUnavailable(RuntimeError):
    """Triton did not answer in time or answered with an error; the caller degrades explicitly."""


class TritonStepClient:
    def __init__(self, url: str, model_name: str, model_version: str = "", timeout_ms: int = 100):
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.timeout_s = timeout_ms / 1000
        # reconnect quickly after a Triton restart (gRPC's default backoff grows to 120 s); with a
        # "dns:///triton-headless:8001" url, round_robin spreads calls over every Triton pod the name
        # resolves to instead of pinning one (a plain host:port resolves to one address: no change)
        self._channel = grpc.aio.insecure_channel(url, options=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._template = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
        for name in INPUT_NAMES:
            self._template.inputs.add(name=name, datatype=TRITON_DTYPES[name])
        for name in OUTPUT_NAMES:
            self._template.outputs.add(name=name)

    def _request(self, type_ids, feats, h, c) -> service_pb2.ModelInferRequest:
        req = service_pb2.ModelInferRequest()
        req.CopyFrom(self._template)
        for tensor, arr in zip(req.inputs, input_arrays(type_ids, feats, h, c).values()):
            tensor.shape.extend(arr.shape)
            req.raw_input_contents.append(arr.tobytes())
        return req

    async def step(self, type_ids: np.ndarray, feats: np.ndarray, h: np.ndarray, c: np.ndarray,
                   timeout_s: float | None = None):
        """One LSTM step for a batch of users -> (h', c', embedding, surprise)."""
        timeout = self.call_timeout(len(type_ids), timeout_s)
        try:
            res = await self._stub.ModelInfer(self._request(type_ids, feats, h, c), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise EncoderUnavailable(f"triton: {e.code().name}: {e.details()}") from None
        except Exception as e:  # cancelled or closed channels, ...
            raise EncoderUnavailable(f"triton: {type(e).__name__}: {e}") from None
        return _outputs(res)

    def call_timeout(self, rows: int, left: float | None) -> float:
        """Seconds a step of `rows` rows may take: triton_timeout_ms per ROWS_PER_TIMEOUT rows (at
        least once), capped by `left`, the request's remaining deadline (None: no deadline)."""
        cap = self.timeout_s * max(1.0, rows / ROWS_PER_TIMEOUT)
        return cap if left is None else max(0.001, min(cap, left))

    async def ready(self) -> bool:
        try:
            res = await self._stub.ModelReady(service_pb2.ModelReadyRequest(
                name=self.model_name, version=self.model_version), timeout=self.timeout_s)
            return bool(res.ready)
        except Exception:
            return False

    async def close(self) -> None:
        await self._channel.close()


def _outputs(res: service_pb2.ModelInferResponse) -> tuple[np.ndarray, ...]:
    """(h', c', embedding, surprise) from a response's raw tensors, checked against the contract."""
    by_name = {out.name: (out, raw) for out, raw in zip(res.outputs, res.raw_output_contents)}
    missing = [n for n in OUTPUT_NAMES if n not in by_name]
    if missing:
        raise EncoderUnavailable(f"triton: response without {missing}")
    arrays = []
    for name in OUTPUT_NAMES:
        out, raw = by_name[name]
        if out.datatype != TRITON_DTYPES[name]:
            raise EncoderUnavailable(f"triton: {name} is {out.datatype}, expected {TRITON_DTYPES[name]}")
        arrays.append(np.frombuffer(raw, DTYPES[name]).reshape(tuple(out.shape)))
    return tuple(arrays)
