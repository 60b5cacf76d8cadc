"""A small async client for the step encoder on Triton: one persistent gRPC channel, a deadline
per call, and one typed error for every way the call can fail."""
from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from seqguard.step_contract import OUTPUT_NAMES, TRITON_DTYPES, input_arrays


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
        self.client = grpcclient.InferenceServerClient(url=url, channel_args=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        self._outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES]

    async def step(self, type_ids: np.ndarray, feats: np.ndarray, h: np.ndarray, c: np.ndarray,
                   timeout_s: float | None = None):
        """One LSTM step for a batch of users -> (h', c', embedding, surprise)."""
        inputs = []
        for name, arr in input_arrays(type_ids, feats, h, c).items():
            inp = grpcclient.InferInput(name, list(arr.shape), TRITON_DTYPES[name])
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        timeout = self.call_timeout(len(type_ids), timeout_s)
        try:
            res = await self.client.infer(self.model_name, inputs, model_version=self.model_version,
                                          outputs=self._outputs, client_timeout=timeout)
        except InferenceServerException as e:
            raise EncoderUnavailable(f"triton: {e.message() or e}") from None
        except Exception as e:  # grpc.aio errors, cancelled channels, ...
            raise EncoderUnavailable(f"triton: {type(e).__name__}: {e}") from None
        return tuple(res.as_numpy(n) for n in OUTPUT_NAMES)

    def call_timeout(self, rows: int, left: float | None) -> float:
        """Seconds a step of `rows` rows may take: triton_timeout_ms per ROWS_PER_TIMEOUT rows (at
        least once), capped by `left`, the request's remaining deadline (None: no deadline)."""
        cap = self.timeout_s * max(1.0, rows / ROWS_PER_TIMEOUT)
        return cap if left is None else max(0.001, min(cap, left))

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model_name, self.model_version,
                                                         client_timeout=self.timeout_s))
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.close()
