"""The baseline a team writes first: one grpc.aio process, everything per request, in the handler.

Naive about SERVING, not about the math: every request recomputes the user's whole recent
history instead of keeping state, and nothing is batched; the scoring itself is the product's
(the shared featuriser, the trained encoder, the core detector and explanations). Per Score request:
  1. validate the event, append it to the user's last N=64 events (a Python dict of deques);
  2. featurise the whole window with the shared featuriser from fresh contexts: the window *is*
     the user's history here (no Redis, so no cross-user entity state beyond the window: cheaper
     than the real thing, which flatters the baseline);
  3. run the torch SequenceEncoder (encoder.pt) over the full window [1, T, F];
  4. score the window's events with the core detector (seqguard.batch.detector_risk_and_lift: the
     same stage 1, session stage, calibration as score-file) and answer for the last one:
     its risk, action and reasons.
No Redis, no Triton, no batching, no thread pool: the model runs on the event loop.

    python -m bench.naive_service --model DIR --port 50062 [--window 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import deque
from pathlib import Path

import grpc
import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.batch import detector_risk_and_lift, surprise_cut
from seqguard.detector import ACTIONS
from seqguard.explain import explain
from seqguard.featurizer import EntityContext, UserContext
from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.schema import SchemaError, validate_event

from .procs import announce, log, wait_for_signal

_OPTIONAL = ("item_id", "category", "amount", "device_id", "ip", "country", "session_id")


class NaiveScorer:
    def __init__(self, model_dir: str, window: int = 64, threads: int = 1):
        import torch

        from seqguard.training.model import EncoderConfig, SequenceEncoder

        torch.set_num_threads(threads)
        self.torch = torch
        path = Path(model_dir)
        self.artifact = ModelArtifact.load(path)
        checkpoint = torch.load(path / "encoder.pt", map_location="cpu")
        self.encoder = SequenceEncoder(EncoderConfig(**checkpoint["config"]))
        self.encoder.load_state_dict(checkpoint["state_dict"])
        self.encoder.eval()
        self.window = window
        self.windows: dict[str, deque] = {}
        self.surprise_cut = surprise_cut(self.artifact)

    def _featurise_window(self, window) -> tuple[np.ndarray, np.ndarray]:
        """(feature rows [T, F] float32, type ids [T]) of the window, from fresh contexts."""
        featurizer = self.artifact.featurizer
        user = UserContext()
        entities: dict[tuple[str, int], EntityContext] = {}

        def entity(kind, key):
            if not key:
                return None
            return entities.setdefault((kind, key), EntityContext())

        rows, types = [], []
        for event in window:
            tokens = featurizer.tokens(event)
            rows.append(featurizer.featurize(tokens, user, entity("d", tokens.device), entity("i", tokens.ip),
                                             entity("p", tokens.prefix)))
            types.append(tokens.type_id)
        return np.asarray(rows, np.float32), np.asarray(types, np.int64)

    def score(self, ev):
        window = self.windows.setdefault(ev.user_id, deque(maxlen=self.window))
        window.append(ev)
        feats, type_ids = self._featurise_window(window)
        torch = self.torch
        with torch.inference_mode():
            encoder_feats = feats[:, :self.artifact.encoder_features]   # the rest are detector-only
            h_seq, surprise, _ = self.encoder(torch.from_numpy(type_ids[None]), torch.from_numpy(encoder_feats[None]))
        emb, surprise = h_seq[0].numpy(), surprise[0].numpy()
        detector = self.artifact.detector
        risk, lift = detector_risk_and_lift(detector, detector.project(emb), surprise, feats, type_ids,
                                            user_idx=np.zeros(len(type_ids), np.int64), n_users=1)
        action = ACTIONS[int(detector.action_codes(risk[-1:])[0])]
        recent = [[x.event_id, x.event_type, x.ts] for x in list(window)[-9:-1]]
        reasons = explain(feats[-1], surprise[-1], ev.event_id, ev.event_type, recent, self.surprise_cut,
                          session_lift=float(lift[-1]))
        return float(risk[-1]), action, reasons


def event_from_proto(msg):
    raw = {"event_id": msg.event_id, "user_id": msg.user_id, "event_type": msg.event_type,
           "ts": msg.ts if msg.ts else None}
    for name in _OPTIONAL:
        if msg.HasField(name):
            raw[name] = getattr(msg, name)
    if "amount" in raw and not math.isfinite(raw["amount"]):
        raise SchemaError("amount", "must be a finite number >= 0")
    return validate_event(raw)


class NaiveService(risk_pb2_grpc.RiskScoringServicer):
    def __init__(self, scorer: NaiveScorer):
        self.scorer = scorer
        self.version = scorer.artifact.model_version

    def _one(self, ev):
        risk, action, reasons = self.scorer.score(ev)
        return risk_pb2.ScoreResponse(
            event_id=ev.event_id, risk=risk, action=risk_pb2.Action.Value(action),
            reasons=[risk_pb2.Reason(code=r.code, message=r.message, weight=r.weight, event_ids=r.event_ids)
                     for r in reasons],
            model_version=self.version, status=risk_pb2.OK)

    async def Score(self, request, context):
        try:
            ev = event_from_proto(request.event)
        except SchemaError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"event.{e.field}: {e.reason}")
        return self._one(ev)

    async def ScoreBatch(self, request, context):
        try:
            events = [event_from_proto(m) for m in request.events]
        except SchemaError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return risk_pb2.ScoreBatchResponse(results=[self._one(ev) for ev in events])


async def serve(model_dir: str, host: str, port: int, window: int, threads: int) -> None:
    scorer = NaiveScorer(model_dir, window, threads)
    scorer.artifact.featurizer.warm_up()     # compile (or load) the featuriser before the first request
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    risk_pb2_grpc.add_RiskScoringServicer_to_server(NaiveService(scorer), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise SystemExit(f"cannot bind {host}:{port}")
    await server.start()
    log(f"naive service on {host}:{bound} (window {window}, torch threads {threads})")
    announce({"port": bound, "system": "naive", "model_version": scorer.artifact.model_version})
    await wait_for_signal()
    await server.stop(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory written by `seqguard train`")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--window", type=int, default=64, help="events per user kept and re-encoded (N)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = ap.parse_args(argv)
    asyncio.run(serve(a.model, a.host, a.port, a.window, a.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
