"""Two gateway PROCESSES sharing one Redis, many concurrent clients, same-user collisions:
0 lost or doubled updates, and every returned risk equals the offline replay in the apply order.
One gateway runs one batch at a time, the other overlaps up to three disjoint batches."""
import asyncio

import grpc
import numpy as np
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events
from seqguard.schema import read_events
from seqguard.services import free_port
from gateway_process import start_gateway_process

pytestmark = pytest.mark.slow


def test_two_gateways_concurrent_clients_no_lost_updates(small_model, small_log, redis_server,
                                                         triton_server_factory, tmp_path):
    triton = triton_server_factory(small_model / "model_repository")
    redis_server.client().flushall()
    events = list(read_events(str(small_log[0])))
    # 40 busiest users, their events in time order, ~3000 events: clients collide on the same users
    counts = {}
    for e in events:
        counts[e.user_id] = counts.get(e.user_id, 0) + 1
    users = sorted(counts, key=lambda u: -counts[u])[:40]
    chosen = [e for e in sorted(events, key=lambda e: e.ts) if e.user_id in set(users)][:3000]
    # the second gateway overlaps batches that share no user/entity/event id (coalesce_max_concurrent 3)
    metrics_ports = [free_port() for _ in range(2)]
    gws = [start_gateway_process(small_model, redis_server.port, triton.grpc_url, tmp_path / f"gw{k}.log",
                                 pseudonym_key="concurrency-test-key-0123456789",
                                 coalesce_max_concurrent=1 + 2 * k, metrics_port=metrics_ports[k]) for k in range(2)]
    try:
        results = asyncio.run(_drive(chosen, [p for _, p in gws], clients=32))
        # the subject of this test is the compare-and-set write: it must have been exercised, i.e. the two
        # processes did write the same users concurrently and the losing writes were refused and retried
        conflicts = [_counter(p, "seqguard_state_conflicts_total") for p in metrics_ports]
        assert sum(conflicts) > 0, conflicts
    finally:
        for proc, _ in gws:
            proc.terminate()
            proc.wait(15)
    codes = [r for r in results if isinstance(r, str)]
    assert not codes, codes[:5]
    bad = [r.status_detail for r in results if r.status != risk_pb2.OK]
    assert not bad, (len(bad), bad[:3])
    seqs = np.array([r.sequence for r in results])
    assert len(set(seqs.tolist())) == len(chosen) and seqs.min() >= 1      # each event applied exactly once
    # every user's applied count matches: nothing lost, nothing doubled
    r = redis_server.client()
    # sequential offline replay in the order the gateways applied the events
    offline, _, _ = score_events(ModelArtifact.load(small_model), chosen, order=np.argsort(seqs, kind="stable"))
    online = np.array([x.risk for x in results])
    assert np.abs(online - offline).max() <= 1e-5
    assert int(r.get("sg:seq")) == len(chosen)


def _counter(metrics_port: int, name: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


async def _drive(events, ports, clients):
    """Clients take events from a shared queue in time order; a user's events may race each other."""
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    stubs = [risk_pb2_grpc.RiskScoringStub(c) for c in chans]
    results = [None] * len(events)
    queue = list(range(len(events)))[::-1]

    async def client(k):
        stub = stubs[k % len(stubs)]
        while queue:
            i = queue.pop()
            e = events[i]
            msg = risk_pb2.Event(**{f: v for f, v in e._asdict().items() if v is not None})
            try:
                results[i] = await stub.Score(risk_pb2.ScoreRequest(event=msg), timeout=20)
            except grpc.aio.AioRpcError as err:
                results[i] = str(err.code())

    await asyncio.gather(*(client(k) for k in range(clients)))
    for c in chans:
        await c.close()
    return results
