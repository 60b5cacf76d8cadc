"""The baseline a team writes first: one grpc.aio process, everything per request, in the handler.

Per Score request:
  1. validate the event, append it to the user's last N=64 events (a Python dict of deques);
  2. featurise the whole window with the shared featuriser (seqguard.featurizer), from fresh
     contexts: the window *is* the user's history here (no Redis, so no cross-user entity
     state beyond the window: cheaper than the real thing, which flatters the baseline);
  3. run the torch SequenceEncoder (encoder.pt) over the full window [1, T, F];
  4. take the last step's embedding and surprise, project them (PCA from the artifact), build
     the forest input with artifact.detector.inputs(...) and call scikit-learn's
     IsolationForest.score_samples (isolation_forest.joblib); calibrate to a risk, pick an
     action, explain.
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

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS, apply_floors
from seqguard.explain import explain
from seqguard.featurizer import EntityContext, UserContext
from seqguard.schema import SchemaError, validate_event

from .procs import announce, log, wait_for_signal

_OPTIONAL = ("item_id", "category", "amount", "device_id", "ip", "country", "session_id")


class NaiveScorer:
    def __init__(self, model_dir: str, window: int = 64, threads: int = 1):
        import joblib
        import torch

        from seqguard.training.model import EncoderConfig, SequenceEncoder

        torch.set_num_threads(threads)
        self.torch = torch
        path = Path(model_dir)
        self.artifact = ModelArtifact.load(path)
        ckpt = torch.load(path / "encoder.pt", map_location="cpu")
        self.encoder = SequenceEncoder(EncoderConfig(**ckpt["config"]))
        self.encoder.load_state_dict(ckpt["state_dict"])
        self.encoder.eval()
        self.forest = joblib.load(path / "isolation_forest.joblib")
        twins = path / "isolation_forest_tail_scaled.joblib"
        self.tail_forest = joblib.load(twins) if twins.exists() else None
        self.window = window
        self.windows: dict[str, deque] = {}
        self.surprise_cut = float(self.artifact.metadata.get("training", {}).get("surprise_p999", 8.0))

    def score(self, ev):
        win = self.windows.get(ev.user_id)
        if win is None:
            win = self.windows[ev.user_id] = deque(maxlen=self.window)
        win.append(ev)
        fz = self.artifact.featurizer
        user = UserContext()
        ents: dict[tuple[str, int], EntityContext] = {}

        def ent(kind, h):
            if not h:
                return None
            e = ents.get((kind, h))
            if e is None:
                e = ents[(kind, h)] = EntityContext()
            return e

        rows, types = [], []
        for e in win:
            t = fz.tokens(e)
            rows.append(fz.featurize(t, user, ent("d", t.device), ent("i", t.ip), ent("p", t.prefix)))
            types.append(t.type_id)
        torch = self.torch
        with torch.inference_mode():
            enc_rows = [r[:self.artifact.encoder_features] for r in rows]   # the rest are detector-only
            h_seq, surprise, _ = self.encoder(torch.tensor([types], dtype=torch.int64),
                                              torch.tensor([enc_rows], dtype=torch.float32))
        emb = h_seq[0, -1:].numpy()
        sur = surprise[0, -1:].numpy()
        feats = np.asarray(rows[-1:], np.float32)
        det = self.artifact.detector
        X = det.inputs(det.project(emb), sur, feats, np.array(types[-1:]))
        w = det.n_forest_inputs                                 # then the floors' columns, then the rules view's
        X, floor_cols = X[:, :w], X[:, w:w + len(det.floors)]
        g = int(det.groups(np.array(types[-1:]))[0])          # the sklearn forest of this event's type group
        anomaly = -self.forest[g].score_samples(X.astype(np.float32))
        if det.tail_views is not None:                          # + the sklearn twin on tail-scaled inputs
            v = det.tail_views[g]
            twin = -self.tail_forest[g].score_samples(v.tails.transform(X).astype(np.float32))
            anomaly = v.combine(anomaly, twin)
        anomaly = apply_floors(det.floors, g, anomaly, floor_cols)
        risk = float(det.calibrators[g].risk(anomaly)[0])
        action = ACTIONS[int(det.action_codes(np.array([risk]))[0])]
        recent = [[x.event_id, x.event_type, x.ts] for x in list(win)[-9:-1]]
        reasons = explain(feats[0], sur[0], ev.event_id, ev.event_type, recent, self.surprise_cut)
        return risk, action, reasons


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
