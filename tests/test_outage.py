"""Triton outages with real Redis and real Triton (issue #18 parts 2 and 3, issue #22 part 4).

* With the local encoder as standby (the default), an outage gives full scores: every answer OK and
  equal to the offline replay, before, during and after.
* Without it (Triton only), a busy user deferred through a long outage: its backlog is bounded by the
  loss rule, drained off the request path after recovery, never degrades another user's batch, and
  the scores afterwards equal an offline replay of the kept steps from a zero state.
"""
import time

import grpc
import numpy as np
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.batch import detector_risk, score_events
from seqguard.encoding import OrtStep, encode_sequences
from seqguard.featurizer import featurize_log
from seqguard.schema import read_events
from seqguard.services import free_port

pytestmark = pytest.mark.slow


def to_proto(ev) -> risk_pb2.Event:
    return risk_pb2.Event(**{k: v for k, v in ev._asdict().items() if v is not None})


def _engine(gw):
    return gw.gateway.coalescer.engine


def _user_history(small_log, n, tag):
    """n events of one synthetic user (the busiest user's event types and features, repeated), no shared
    entities, 30 s apart: a self-contained replay."""
    events = list(read_events(str(small_log[0])))
    user = max({e.user_id for e in events}, key=lambda u: sum(e.user_id == u for e in events))
    mine = sorted([e for e in events if e.user_id == user], key=lambda e: e.ts)
    t0 = mine[0].ts
    return [mine[k % len(mine)]._replace(event_id=f"{tag}-{k}", user_id=f"{tag}-user", device_id=None, ip=None,
                                         ts=t0 + 30_000 * k) for k in range(n)]


def test_triton_outage_with_local_standby_keeps_scoring(small_model, small_log, redis_server,
                                                        triton_server_factory, gateway_factory):
    tri = triton_server_factory(small_model / "model_repository")
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=tri.grpc_url,
                         deadline_ms=1000, triton_timeout_ms=300, local_encoder_retry_ms=200)
    mine = _user_history(small_log, 45, "standby")
    offline, _, _ = score_events(ModelArtifact.load(small_model), mine)
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        got = [stub.Score(risk_pb2.ScoreRequest(event=to_proto(e)), timeout=5) for e in mine[:15]]
        tri.stop()
        got += [stub.Score(risk_pb2.ScoreRequest(event=to_proto(e)), timeout=5) for e in mine[15:30]]
        assert _engine(gw).encoder.failover_steps >= 15        # the standby computed them
        triton_server_factory(small_model / "model_repository", grpc_port=tri.grpc_port,
                              http_port=tri.http_port, metrics_port=tri.metrics_port)
        deadline = time.time() + 30
        while not gw.call(gw.gateway.encoder.ready()) and time.time() < deadline:
            time.sleep(0.1)
        got += [stub.Score(risk_pb2.ScoreRequest(event=to_proto(e)), timeout=5) for e in mine[30:]]
    assert [r.status for r in got] == [risk_pb2.OK] * len(mine), [r.status_detail for r in got if r.status != 1]
    assert np.abs(np.array([r.risk for r in got]) - offline).max() <= 1e-5
    assert _engine(gw).deferred_steps == 0


def test_long_outage_backlog_is_bounded_drained_and_isolated(small_model, small_log, redis_server,
                                                             triton_server_factory, gateway_factory):
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port,
                         triton_url=f"127.0.0.1:{ports['grpc_port']}", deadline_ms=1000, triton_timeout_ms=300,
                         local_encoder_fallback=False)
    engine = _engine(gw)
    n_out = 3 * engine.MAX_PENDING            # ~30 minutes of a user clicking every few seconds
    busy = _user_history(small_log, n_out + 2, "busy")
    other = _user_history(small_log, 40, "other")
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for a in range(0, n_out, 100):        # Triton is down: all deferred
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[to_proto(e) for e in busy[a:min(a + 100, n_out)]]),
                                  timeout=10)
            assert all(r.status == risk_pb2.DEGRADED for r in rep.results)
        assert engine.backlog_resets > 0      # the loss rule bounded the backlog
        raw = redis_server.client().get(engine.store.user_key(busy[0].user_id))
        assert len(raw) < 80_000              # bounded state: MAX_PENDING steps of ~190 B, the ring, h and c
        triton_server_factory(small_model / "model_repository", **ports)
        deadline = time.time() + 30
        while not gw.call(gw.gateway.encoder.ready()) and time.time() < deadline:
            time.sleep(0.1)
        # another user's events in the same batches as the backlogged user's: never degraded by it
        rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[to_proto(busy[n_out])] +
                                                         [to_proto(e) for e in other[:20]]), timeout=10)
        assert rep.results[0].status == risk_pb2.DEGRADED and "catching up" in rep.results[0].status_detail
        assert all(r.status == risk_pb2.OK for r in rep.results[1:])
        deadline = time.time() + 60
        while engine.backlog_users and time.time() < deadline:      # drained off the request path
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[to_proto(e) for e in other[20:21]]), timeout=10)
            time.sleep(0.2)
        assert engine.backlog_users == 0 and engine.caught_up_steps >= engine.MAX_PENDING
        last = stub.Score(risk_pb2.ScoreRequest(event=to_proto(busy[n_out + 1])), timeout=5)
        assert last.status == risk_pb2.OK, last.status_detail
        retried = stub.Score(risk_pb2.ScoreRequest(event=to_proto(busy[n_out - 1])), timeout=5)
        assert retried.status == risk_pb2.OK                 # its deferred step ran: the real score
        st = stub.GetUserState(risk_pb2.UserStateRequest(user_id=busy[0].user_id), timeout=5)
        assert st.n_events == n_out + 2                      # nothing lost from the featuriser context

    # the documented loss rule: the score equals a replay of the newest steps from a zero state
    art = ModelArtifact.load(small_model)
    kept = engine.MAX_PENDING
    _, types, feats = featurize_log(art.featurizer, busy)
    steps = list(range(n_out + 1 - kept, n_out + 2))
    emb, sur, _, _ = encode_sequences(OrtStep(str(art.onnx_path)), np.zeros(len(steps), np.int64), types[steps],
                                      feats[steps], 1, reduce=art.detector.project)
    replay = detector_risk(art.detector, emb, sur, feats[steps], types[steps],
                           user_idx=np.zeros(len(steps), np.int64), n_users=1)
    assert abs(last.risk - replay[-1]) <= 1e-5
    assert abs(retried.risk - replay[-3]) <= 1e-5
