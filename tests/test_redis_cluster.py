"""The gateway on a real 3-node Redis Cluster (cluster-mode Redis, e.g. a managed cluster offering).

Keys carry the hash tag "{sg}:", so one batch's atomic compare-and-set script still sees all its
keys in one slot; scores must equal the offline replay exactly as on a single Redis.
"""
import random
import socket
import subprocess
import time

import numpy as np
import pytest
import redis

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.schema import read_events
from seqguard.services import RedisServer

pytestmark = pytest.mark.slow


def _cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too."""
    for _ in range(200):
        p = random.randint(20000, 50000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three cluster-enabled redis-server masters (no replicas), all 16384 slots assigned."""
    base = tmp_path_factory.mktemp("cluster")
    nodes = [RedisServer(_cluster_port(), run_dir=base / f"n{k}", extra_args=["--cluster-enabled", "yes", "--cluster-config-file",
                                                             str(base / f"nodes-{k}.conf"), "--cluster-node-timeout",
                                                             "2000"]) for k in range(3)]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_ready(timeout=15)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                       "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline:
            infos = [redis.Redis(port=n.port).execute_command("CLUSTER", "INFO").decode() for n in nodes]
            if all("cluster_state:ok" in i for i in infos):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"cluster did not become ok: {infos}")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _msg(e):
    return risk_pb2.Event(**{f: v for f, v in e._asdict().items() if v is not None})


def test_gateway_on_redis_cluster_equals_offline(small_model, small_log, redis_cluster, triton_server_factory,
                                                 gateway_factory):
    import grpc

    triton = triton_server_factory(small_model / "model_repository")
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_cluster[0].port, redis_cluster=True,
                         triton_url=triton.grpc_url, redis_timeout_ms=1000, deadline_ms=5000,
                         triton_timeout_ms=5000)
    events = list(read_events(str(small_log[0])))
    users = sorted({e.user_id for e in events})[:40]
    events = [e for e in events if e.user_id in users]
    offline, _, _ = score_events(ModelArtifact.load(small_model), events)
    order = sorted(range(len(events)), key=lambda i: (events[i].ts, i))
    online = np.full(len(events), np.nan)
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        for a in range(0, len(order), 100):
            idx = order[a:a + 100]
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[_msg(events[i]) for i in idx]), timeout=30)
            assert all(r.status == risk_pb2.OK for r in rep.results), [r.status_detail for r in rep.results][:3]
            online[idx] = [r.risk for r in rep.results]
        again = stub.Score(risk_pb2.ScoreRequest(event=_msg(events[order[0]])), timeout=10)   # idempotent
        assert again.risk == online[order[0]]
        ack = stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id=events[order[0]].event_id, label=risk_pb2.FRAUD,
                                                         user_id=events[order[0]].user_id), timeout=10)
        assert ack.scored and ack.risk == online[order[0]]
        st = stub.GetUserState(risk_pb2.UserStateRequest(user_id=users[0]), timeout=10)
        assert st.n_events == sum(e.user_id == users[0] for e in events)
    assert np.abs(online - offline).max() <= 1e-5
    # every seqguard key sits in the "{sg}" slot, on one node; nothing under the plain "sg:" prefix
    slot = redis.Redis(port=redis_cluster[0].port).execute_command("CLUSTER", "KEYSLOT", "{sg}")
    rc = redis.RedisCluster(host="127.0.0.1", port=redis_cluster[0].port)
    keys = list(rc.scan_iter(match="*", count=1000))
    assert keys and all(k.startswith(b"{sg}:") for k in keys)
    assert {rc.keyslot(k) for k in keys} == {slot}
    for kind in (b"u:", b"d:", b"i:", b"e:", b"o:", b"outcomes", b"seq"):
        assert any(k.startswith(b"{sg}:" + kind) for k in keys), kind
    rc.close()
