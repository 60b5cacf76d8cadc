"""The coalescer runs batches that share nothing concurrently and everything else in arrival order.

The engine here is a recorder (it sleeps like a Redis + Triton round trip and notes which
events ran when): what is under test is the coalescer's dispatch, not scoring, which the
end-to-end tests cover with real Redis and Triton (including two gateways and concurrent clients
in tests/test_concurrency.py).
"""
import asyncio

from seqguard.gateway.coalescer import Coalescer
from seqguard.gateway.result import ScoreResult
from seqguard.schema import Event


class _Store:
    def entity_keys(self, e):
        return (f"d:{e.device_id}" if e.device_id else None, f"i:{e.ip}" if e.ip else None,
                f"p:{e.ip.rsplit('.', 1)[0]}" if e.ip else None)


class _RecordingEngine:
    store = _Store()

    def __init__(self, seconds: float = 0.02):
        self.seconds = seconds
        self.running = 0
        self.max_running = 0
        self.spans = []              # (start, end, [event ids])
        self.applied = []            # event ids in the order batches finished applying them

    async def score(self, events, deadline=None, explain_reasons=True):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(self.seconds)
        self.running -= 1
        self.spans.append((t0, loop.time(), [e.event_id for e in events]))
        self.applied += [e.event_id for e in events]
        return [ScoreResult(e.event_id, 0.0, "ALLOW", "test") for e in events]

    def degraded(self, events, detail):
        raise AssertionError(detail)

    async def stop(self):                 # the engine's own background work (none here)
        pass


def _ev(i, user, device=None, ip=None):
    return Event(f"e{i}", user, 1767225600000 + i, "view_item", device_id=device, ip=ip)


def _run(events_per_call, max_concurrent=2):   # the default is 1; 2 is what is under test
    async def main():
        eng = _RecordingEngine()
        co = Coalescer(eng, max_events=1, max_concurrent=max_concurrent)   # one event per batch
        co.start()
        res = await asyncio.gather(*(co.submit([e], None) for e in events_per_call))
        await co.stop()
        return eng, co, res
    return asyncio.run(main())


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_disjoint_batches_overlap():
    evs = [_ev(i, f"u{i}", f"d{i}", f"10.0.{i}.1") for i in range(6)]
    eng, co, res = _run(evs)
    assert [r[0].event_id for r in res] == [e.event_id for e in evs]
    assert eng.max_running == 2 and co.overlapped >= 2
    assert co.batches == 6


def test_same_user_same_entity_or_same_event_id_never_overlap_and_keep_order():
    evs = [_ev(0, "alice"), _ev(1, "alice"), _ev(2, "bob", "shared-phone"), _ev(3, "carol", "shared-phone"),
           _ev(4, "dave", ip="10.1.1.7"), _ev(5, "erin", ip="10.1.1.9"),     # same /24 prefix
           _ev(6, "frank"), _ev(6, "frank")]                                 # a retried event id
    eng, co, _ = _run(evs)
    span = {ids[0]: (t0, t1) for t0, t1, ids in eng.spans if len(ids) == 1}
    pairs = [("e0", "e1"), ("e2", "e3"), ("e4", "e5")]
    for a, b in pairs:
        assert not _overlap(span[a], span[b]), (a, b)
        assert span[a][1] <= span[b][0]                     # and in arrival order
    e6 = [(t0, t1) for t0, t1, ids in eng.spans if ids == ["e6"]]
    assert len(e6) == 2 and not _overlap(*e6)
    assert eng.max_running == 2                             # unrelated batches still overlapped


def test_max_concurrent_one_is_strictly_sequential():
    evs = [_ev(i, f"u{i}") for i in range(5)]
    eng, co, _ = _run(evs, max_concurrent=1)
    assert eng.max_running == 1 and co.overlapped == 0
    assert eng.applied == [e.event_id for e in evs]
