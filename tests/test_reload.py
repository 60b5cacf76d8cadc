"""Hot model reload under load, with real Redis and a real Triton polling its repository.

A second model version is published while client threads send Scores continuously: the
gateway notices the flipped `current` pointer, waits for Triton to serve version 2, warms it
and switches between batches. No request may fail or degrade, and answers move from the old
model_version to the new one, never back.
"""
import gc
import json
import os
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.services import free_port
from seqguard.triton_repo import prune_versions, publish_version, versions

pytestmark = pytest.mark.slow


def flip(link, target) -> None:
    """Atomically point `link` at `target` (what a release job does to artifacts/current)."""
    tmp = f"{link}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, link)


@pytest.fixture()
def two_versions(small_model, tmp_path):
    """artifacts/{v1,v2} (same weights, v2 renamed + Triton version 2), current -> v1; repository serving 2 versions."""
    repo = tmp_path / "repository"
    shutil.copytree(small_model / "model_repository", repo)
    # the default policy keeps the newest 2 versions loaded: old + new live during the roll
    assert "version_policy: { latest: { num_versions: 2 } }" in (repo / "seqguard_encoder" / "config.pbtxt").read_text()
    arts = tmp_path / "artifacts"
    ignore = shutil.ignore_patterns("model_repository", "encoder.pt", "isolation_forest*.joblib")
    shutil.copytree(small_model, arts / "v1", ignore=ignore)
    shutil.copytree(small_model, arts / "v2", ignore=ignore)
    meta = json.loads((arts / "v2" / "metadata.json").read_text())
    v1_name = meta["model_version"]
    meta["model_version"] = v1_name + "-v2"
    meta["triton"]["model_version"] = 2
    (arts / "v2" / "metadata.json").write_text(json.dumps(meta))
    flip(arts / "current", "v1")
    return repo, arts, v1_name, meta["model_version"]


def test_hot_reload_under_load_fails_no_request(two_versions, redis_server, triton_server_factory, gateway_factory):
    repo, arts, v1, v2 = two_versions
    tri = triton_server_factory(repo, model_control_mode="poll", extra_args=["--repository-poll-secs=1"])
    # generous Redis/Triton timeouts: this test is about the model switch; a 50 ms Redis timeout on a busy
    # 2-core machine turned one answer DEGRADED (a Redis write timeout, not the reload)
    gw = gateway_factory(model_dir=str(arts / "current"), redis_port=redis_server.port, triton_url=tri.grpc_url,
                         deadline_ms=5000, triton_timeout_ms=5000, redis_timeout_ms=1000, model_poll_s=0.2,
                         metrics_port=free_port(), gc_freeze=True)   # as in production: the reload re-freezes
    try:
        _reload_under_load(gw, repo, arts, v1, v2, tri)
    finally:
        gc.unfreeze()                   # the rest of the test process collects as before


def _reload_under_load(gw, repo, arts, v1, v2, tri) -> None:
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client(k: int):
        with grpc.insecure_channel(gw.address) as ch:
            stub = risk_pb2_grpc.RiskScoringStub(ch)
            i = 0
            while not stop.is_set():
                ev = risk_pb2.Event(event_id=f"r{k}-{i}", user_id=f"reload-user-{k}-{i % 5}",
                                    event_type=("page_view", "add_to_cart", "payment")[i % 3],
                                    ts=1767225600000 + i * 1000, amount=12.5, device_id=f"dev-{k}", ip="10.1.2.3",
                                    country="DE")
                try:
                    r = stub.Score(risk_pb2.ScoreRequest(event=ev), timeout=10)
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                else:
                    if r.status != risk_pb2.OK:
                        failures.append(f"status {r.status}: {r.status_detail}")
                    seen[k].append(r.model_version)
                i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    # release: Triton version 2 (same files, as a release job would copy them), then flip `current`
    src = repo / "seqguard_encoder" / "1"
    publish_version(repo / "seqguard_encoder", 2, {"model.py": src / "model.py", "model.onnx": src / "model.onnx"},
                    (repo / "seqguard_encoder" / "config.pbtxt").read_text())
    t_flip = time.monotonic()
    flip(arts / "current", "v2")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(s and s[-1] == v2 for s in seen):
        time.sleep(0.1)
    switched_after = time.monotonic() - t_flip
    time.sleep(1.0)
    # the next release (version 3) pushes version 1 out of the newest-2 window: Triton unloads it, the
    # export prunes its directory, and the gateway (pinned to version 2) keeps answering OK
    publish_version(repo / "seqguard_encoder", 3, {"model.py": src / "model.py", "model.onnx": src / "model.onnx"},
                    (repo / "seqguard_encoder" / "config.pbtxt").read_text())
    assert prune_versions(repo / "seqguard_encoder") == [1] and versions(repo / "seqguard_encoder") == [2, 3]
    end = time.monotonic() + 30
    while time.monotonic() < end and not (tri.is_model_ready("seqguard_encoder", 3)
                                          and not tri.is_model_ready("seqguard_encoder", 1)):
        time.sleep(0.2)
    unloaded = (tri.is_model_ready("seqguard_encoder", 3), tri.is_model_ready("seqguard_encoder", 2),
                tri.is_model_ready("seqguard_encoder", 1))
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(15)

    total = sum(len(s) for s in seen)
    n_degraded = sum(f.startswith("status") for f in failures)
    print(f"reload: {total} Scores, switched {switched_after:.2f} s after the flip, failed {len(failures) - n_degraded}, "
          f"degraded {n_degraded} "
          f"(ready v3/v2/v1 after publishing v3: {unloaded})")
    assert not failures, failures[:5]
    assert unloaded == (True, True, False)      # v3 loaded, v2 (live) kept, v1 unloaded
    for s in seen:
        assert s[0] == v1 and s[-1] == v2, (s[0], s[-1])
        k = s.index(v2)                                   # once on the new model, never back
        assert set(s[:k]) == {v1} and set(s[k:]) == {v2}
    assert gw.gateway.reloader.reloads == 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{gw.gateway.metrics_port}/metrics", timeout=5).read().decode()
    assert 'seqguard_model_reloads_total{result="ok"} 1.0' in text
    assert f'seqguard_model_info{{model_version="{v2}",triton_version="2"}} 1.0' in text
    assert "seqguard_degraded_events_total 0.0" in text
    # after its grace period the old model's clients close and the heap is collected and frozen again
    end = time.monotonic() + 30
    while time.monotonic() < end and not all(t.done() for t in gw.gateway._retired):
        time.sleep(0.2)
    assert gw.gateway._retired and all(t.done() and t.exception() is None for t in gw.gateway._retired)
    assert gc.get_freeze_count() > 0


def test_broken_artifact_keeps_old_model(two_versions, redis_server, triton_server_factory, gateway_factory):
    """`current` flipped to a directory that is not a model: reload fails, the old model keeps answering OK."""
    repo, arts, v1, _ = two_versions
    tri = triton_server_factory(repo)
    gw = gateway_factory(model_dir=str(arts / "current"), redis_port=redis_server.port, triton_url=tri.grpc_url,
                         deadline_ms=5000, triton_timeout_ms=5000)
    (arts / "broken").mkdir()
    flip(arts / "current", "broken")
    assert gw.call(gw.gateway.reloader.check()) is False
    assert "not a seqguard model directory" in gw.gateway.reloader.last_error
    with grpc.insecure_channel(gw.address) as ch:
        r = risk_pb2_grpc.RiskScoringStub(ch).Score(risk_pb2.ScoreRequest(event=risk_pb2.Event(
            event_id="b-1", user_id="b-user", event_type="login", ts=1767225600000)), timeout=10)
    assert r.status == risk_pb2.OK and r.model_version == v1
