"""The step encoder without Triton: the artifact's model.onnx run by ONNX Runtime in the gateway.

Two uses (settings.encoder, settings.local_encoder_fallback):
* `encoder = "local"`: CPU-only nodes score with no Triton at all.
* the standby of `FailoverEncoder`: while Triton is unavailable the same model keeps scoring in
  process, so an outage gives full scores instead of DEGRADED answers and deferred steps.

Both run the very model.onnx that Triton serves through ONNX Runtime, whose CPU kernels give every
row the same bits whatever the batch (the offline parity of seqguard.batch rests on the same
fact), so a score does not depend on which encoder computed it.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from seqguard.encoding import OrtStep

from .triton_client import EncoderUnavailable

log = logging.getLogger("seqguard.gateway")


class LocalStepEncoder:
    """Same interface as TritonStepClient: async step(), ready(), close(), model_version."""

    model_version = "local"

    def __init__(self, onnx_path: str, threads: int = 1):
        # one thread: the gateway's event loop shares the node's cores with it, and one step is
        # too small to gain from more
        self.model = OrtStep(onnx_path, threads=threads)

    async def step(self, type_ids: np.ndarray, feats: np.ndarray, h: np.ndarray, c: np.ndarray,
                   timeout_s: float | None = None):
        try:
            return self.model(type_ids, feats, h, c)
        except Exception as e:  # an input the graph rejects (e.g. an out-of-range type id)
            raise EncoderUnavailable(f"local encoder: {type(e).__name__}: {e}") from None

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class FailoverEncoder:
    """Triton first; while it fails, the local encoder, retrying Triton every `retry_after_s`.

    After a failure the next calls go straight to the standby instead of each waiting for its own
    Triton timeout; one call per `retry_after_s` probes Triton again.
    """

    def __init__(self, primary, standby: LocalStepEncoder, retry_after_s: float = 1.0):
        self.primary, self.standby = primary, standby
        self.retry_after_s = retry_after_s
        self.model_version = primary.model_version
        self._primary_down_until = 0.0
        self.failover_steps = 0          # steps the standby computed

    async def step(self, type_ids, feats, h, c, timeout_s: float | None = None):
        if time.monotonic() >= self._primary_down_until:
            try:
                out = await self.primary.step(type_ids, feats, h, c, timeout_s=timeout_s)
            except EncoderUnavailable as e:
                if not self._primary_down_until:
                    log.warning("triton unavailable, scoring with the local encoder: %s", e)
                self._primary_down_until = time.monotonic() + self.retry_after_s
            else:
                if self._primary_down_until:
                    log.warning("triton is back; the local encoder stands by again")
                    self._primary_down_until = 0.0
                return out
        self.failover_steps += len(type_ids)
        return await self.standby.step(type_ids, feats, h, c)

    async def ready(self) -> bool:
        return await self.primary.ready()

    async def close(self) -> None:
        await self.primary.close()
        await self.standby.close()
