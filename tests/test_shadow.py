"""Shadow mode with real Redis and a real Triton serving the live model (version 1) and a candidate (version 2).

The same events go, in the same batches, to a gateway without shadow mode and to gateways with
it: the live answers must be identical, and the sg:shadow stream must hold exactly the risks the
candidate scores offline (seqguard score-file path) for those events. A candidate whose Triton
version is not loaded only counts shadow failures; the live answers stay identical.
"""
import json
import shutil

import grpc
import numpy as np
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.gateway.state import Pseudonymizer
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.schema import read_events
from seqguard.triton_repo import COMMITTED_MODEL_PY, publish_version
from seqguard.training.generate import generate, write_events

pytestmark = pytest.mark.slow
KEY = "test-pseudonym-key-0123456789"     # gateway_factory's default pseudonym key


def _copy_artifact(src, dst, version_suffix: str, triton_version: int):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model_repository", "encoder.pt", "*.joblib"))
    meta = json.loads((dst / "metadata.json").read_text())
    meta["model_version"] += version_suffix
    meta["triton"]["model_version"] = triton_version
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def _perturb_onnx(path) -> None:
    """Another encoder without training one: every float weight of the step model scaled by 1.1."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            init.CopyFrom(numpy_helper.from_array(w * np.float32(1.1), init.name))
    onnx.save(model, str(path))


def _perturb_detector(path) -> None:
    """Another detector on the same encoder: the PCA projection scaled, so every forest sees other inputs."""
    arrays = dict(np.load(path))
    arrays["proj"] = arrays["proj"] * 1.2
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def setup(small_model, tmp_path_factory, triton_server_factory):
    """(live model, candidate with another encoder = Triton v2, candidate whose Triton version is not loaded,
    candidate with the live encoder and another detector, triton serving v1 + v2)."""
    d = tmp_path_factory.mktemp("shadow")
    cand = _copy_artifact(small_model, d / "cand", "-cand", 2)
    _perturb_onnx(cand / "model.onnx")
    missing = _copy_artifact(cand, d / "missing", "-missing", 7)
    same_enc = _copy_artifact(small_model, d / "same_enc", "-detector", 1)
    _perturb_detector(same_enc / "detector.npz")
    repo = d / "repository"
    shutil.copytree(small_model / "model_repository", repo)
    entry = repo / "seqguard_encoder"
    assert "num_versions: 2" in (entry / "config.pbtxt").read_text()
    publish_version(entry, 2, {"model.py": COMMITTED_MODEL_PY, "model.onnx": cand / "model.onnx"},
                    (entry / "config.pbtxt").read_text())
    tri = triton_server_factory(repo)
    assert tri.is_model_ready("seqguard_encoder", 1) and tri.is_model_ready("seqguard_encoder", 2)
    return small_model, cand, missing, same_enc, tri


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    path = tmp_path_factory.mktemp("shadow_log") / "events.jsonl"
    write_events(generate(40, seed=41, days=2)[0], path)
    evs = list(read_events(str(path)))
    return [evs[i] for i in sorted(range(len(evs)), key=lambda i: (evs[i].ts, i))]   # arrival order


def _send(gw, events) -> list[tuple]:
    out = []
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for a in range(0, len(events), 100):
            batch = [risk_pb2.Event(**{k: v for k, v in e._asdict().items() if v is not None})
                     for e in events[a:a + 100]]
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=batch), timeout=30)
            out += [(r.event_id, r.risk, r.action, r.model_version, r.status, r.status_detail, r.sequence,
                     [(x.code, x.message, x.weight, list(x.event_ids)) for x in r.reasons]) for r in rep.results]
    return out


def _gateway(gateway_factory, redis_server, tri, model, db, shadow=None):
    redis_server.client(db=db).flushdb()
    # generous timeouts: the comparison is exact, so a Redis read timing out on a busy 2-core test machine
    # (a DEGRADED answer in one run only) must not be mistaken for an effect of shadow mode
    return gateway_factory(model_dir=str(model), redis_port=redis_server.port, redis_db=db, triton_url=tri.grpc_url,
                           deadline_ms=5000, triton_timeout_ms=5000, redis_timeout_ms=1000,
                           shadow_model_dir=str(shadow or ""))


def _stream(redis_server, db) -> dict:
    entries = redis_server.client(db=db).xrange("sg:shadow")
    return {f[b"event"].decode(): {k.decode(): v.decode() for k, v in f.items()} for _, f in entries}


def test_shadow_mode_same_live_answers_and_offline_candidate_risks(setup, events, redis_server, gateway_factory):
    live, cand, missing, same_enc, tri = setup
    pseudo = Pseudonymizer(KEY.encode())
    plain = _send(_gateway(gateway_factory, redis_server, tri, live, 11), events)
    assert all(r[4] == risk_pb2.OK for r in plain)

    for db, candidate in ((12, cand), (14, same_enc)):
        gw = _gateway(gateway_factory, redis_server, tri, live, db, shadow=candidate)
        assert _send(gw, events) == plain                      # live answers bit-identical with shadow on
        sh = gw.gateway.shadow
        gw.call(sh.drain(60))
        assert (sh.scored, sh.failed, sh.dropped) == (len(events), 0, 0), sh.last_error
        stream = _stream(redis_server, db)
        assert len(stream) == len(events)
        offline, actions, _ = score_events(ModelArtifact.load(candidate), events)
        art = ModelArtifact.load(candidate)
        got = np.array([float(stream[pseudo("event", e.event_id)]["shadow"]) for e in events])
        diff = np.abs(got - offline).max()
        print(f"shadow {art.model_version}: {len(events)} events, max |online shadow - offline candidate| {diff:.2e}, "
              f"mean candidate-live {np.mean(got - np.array([r[1] for r in plain])):+.4f}")
        assert diff <= 1e-5
        for e, r in zip(events, plain):
            rec = stream[pseudo("event", e.event_id)]
            assert rec["user"] == pseudo("user", e.user_id)
            assert float(rec["live"]) == pytest.approx(r[1], abs=1e-12) and rec["live_action"] == risk_pb2.Action.Name(r[2])
            assert rec["live_mv"] == r[3] and rec["shadow_mv"] == art.model_version
        assert [stream[pseudo("event", e.event_id)]["shadow_action"] for e in events] == \
            [["ALLOW", "REVIEW", "CHALLENGE", "BLOCK"][a] for a in actions]
        reg = gw.gateway.metrics.registry
        assert reg.get_sample_value("seqguard_shadow_risk_diff_count") == len(events)
        assert reg.get_sample_value("seqguard_shadow_events_total", {"result": "scored"}) == len(events)
        n_state = len(list(redis_server.client(db=db).scan_iter("sg:sh:*")))
        keeps_state = candidate is cand or art.detector.has_session   # own LSTM state / session average only
        assert n_state == (len({e.user_id for e in events}) if keeps_state else 0)
        if candidate is same_enc:                              # the session average alone: no h, c bytes
            raw = redis_server.client(db=db).get(next(redis_server.client(db=db).scan_iter("sg:sh:*")))
            assert len(raw) == len(art.model_version) + 1 + 8

    # a candidate Triton does not serve: every shadow step fails, is counted, and nothing else changes
    gw = _gateway(gateway_factory, redis_server, tri, live, 13, shadow=missing)
    assert _send(gw, events) == plain
    gw.call(gw.gateway.shadow.drain(60))
    assert gw.gateway.shadow.failed == len(events) and gw.gateway.shadow.scored == 0
    assert "triton" in gw.gateway.shadow.last_error
    assert gw.gateway.metrics.registry.get_sample_value("seqguard_shadow_events_total",
                                                        {"result": "failed"}) == len(events)
    assert _stream(redis_server, 13) == {}
    gw.call(gw.gateway.shadow.stop())          # the worker thread ends; the gateway keeps answering
    assert not gw.gateway.shadow._thread.is_alive()
    assert [r[:5] for r in _send(gw, events[:100])] == [r[:5] for r in plain[:100]]   # remembered answers


def test_incompatible_candidate_is_refused(setup, tmp_path, redis_server, gateway_factory):
    live, cand, _, _, tri = setup
    bad = tmp_path / "bad"
    shutil.copytree(cand, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["featurizer"]["feature_names"] = meta["featurizer"]["feature_names"][::-1]
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="feature|featur|schema"):
        _gateway(gateway_factory, redis_server, tri, live, 15, shadow=bad)


def test_shadow_settings_from_environment(monkeypatch):
    from seqguard.gateway.settings import Settings
    monkeypatch.setenv("SEQGUARD_SHADOW_MODEL_DIR", "/models/artifacts/candidate")
    monkeypatch.setenv("SEQGUARD_SHADOW_STREAM_MAX", "5000")
    s = Settings.load(pseudonym_key=KEY)
    assert (s.shadow_model_dir, s.shadow_stream_max) == ("/models/artifacts/candidate", 5000)
    assert Settings().shadow_model_dir == ""                                   # off by default
    with pytest.raises(ValueError, match="shadow_queue_events"):
        Settings.load(pseudonym_key=KEY, shadow_queue_events=0)


def test_full_shadow_queue_drops_and_counts_without_touching_the_caller(small_model):
    """Over shadow_queue_events waiting, a batch is dropped and counted; submit never raises or waits."""
    from types import SimpleNamespace

    from seqguard.gateway.metrics import GatewayMetrics
    from seqguard.gateway.shadow import ShadowScorer
    art = ModelArtifact.load(small_model)
    metrics = GatewayMetrics()
    sh = ShadowScorer(art, lambda: (None, None), metrics, stream_max=100, queue_events=10, ttl_s=60, timeout_s=1)
    engine = SimpleNamespace(artifact=art, model_version=art.model_version, detector=art.detector)
    evs = [SimpleNamespace(event_type="login", user_id="u", event_id=f"e{i}") for i in range(20)]
    z = np.zeros((20, 1), np.float32)
    sh.submit(engine, evs, np.zeros(20, np.int64), z, (z, z), np.zeros(20))   # 20 > 10: dropped
    assert (sh.dropped, sh.queued, sh.failed) == (20, 0, 0)
    assert metrics.registry.get_sample_value("seqguard_shadow_events_total", {"result": "dropped"}) == 20
    sh.submit(engine, evs[:5], np.zeros(5, np.int64), z[:5], (z[:5], z[:5]), np.zeros(5))  # no worker loop
    assert (sh.failed, sh.queued) == (5, 0)                                   # counted, not raised
