"""Gathers concurrent gRPC requests into engine batches (gateway/engine.py scores one batch)."""
from __future__ import annotations

import asyncio
import logging

from seqguard.schema import Event

from .aio import cancel_and_wait
from .engine import ScoringEngine
from .result import ScoreResult

log = logging.getLogger("seqguard.gateway")


class Overloaded(RuntimeError):
    """More events in flight than the configured bound: answer RESOURCE_EXHAUSTED, do not queue."""


class Coalescer:
    """Gathers concurrent requests into engine batches.

    Adaptive: while batches run, new requests queue; the next batch takes everything queued (up
    to max_events), so batches grow with load and a lone request waits for nobody.

    Up to `max_concurrent` batches run at once, but only batches with nothing in common: a batch
    starts while others run only if it touches none of their users, devices, IPs, IP prefixes or
    event ids; otherwise it waits for them. Dispatch is first-in first-out (a waiting batch holds
    back every later one), so a user's events, an entity's updates and a retried event id are
    applied in arrival order, never from state an earlier batch is still writing. (Two gateway
    processes are kept apart by the compare-and-set write instead.) Overlapping batches lets one
    batch's Redis and Triton waits overlap another's Python work; where the gateway shares its cores
    with them, it only splits the queue into smaller batches that cost more CPU per request, hence
    the default of 1 (settings.coalesce_max_concurrent).

    Two lanes, never in one batch: online requests (Score, deadline_ms) and bulk ones (ScoreBatch,
    Ingest; bulk_deadline_ms, seconds). A batch runs under the tightest deadline of its requests,
    so a merged Score would hand its few hundred ms to hundreds of bulk events (answered DEGRADED,
    steps deferred, though applied) and they would make its batch and Triton waves bigger. A batch
    is therefore cut where the lane of the queue's next request changes. That is the whole rule:
    dispatch stays first-in first-out across both lanes (a Score queued behind a bulk batch waits
    for it, as it would for any earlier batch), so per-user order needs nothing more; per-item
    deadlines inside one batch would have needed the engine to split its waves and commit by item.
    """

    def __init__(self, engine: ScoringEngine, max_events: int = 256, max_wait_us: int = 0,
                 max_in_flight: int = 2048, max_concurrent: int = 1):
        self.engine = engine
        self.max_events = max_events
        self.max_wait_s = max_wait_us / 1e6
        self.max_in_flight = max_in_flight
        self.max_concurrent = max(1, max_concurrent)
        self.in_flight = 0
        self._queue: list = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, frozenset] = {}     # batch task -> the keys it touches
        self.batches = 0
        self.batched_events = 0
        self.overlapped = 0          # batches started while another was running

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="coalescer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for t in list(self._running):
            await cancel_and_wait(t)
        await self.engine.stop()

    async def submit(self, events: list[Event], deadline: float | None, explain_reasons: bool = True,
                     bulk: bool = False) -> list[ScoreResult]:
        if self.in_flight + len(events) > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} events in flight (limit {self.max_in_flight})")
        fut = asyncio.get_running_loop().create_future()
        self.in_flight += len(events)
        self._queue.append((events, deadline, explain_reasons, fut, bulk))
        self._wake.set()
        try:
            return await asyncio.shield(fut)
        finally:
            if not fut.done():
                # the caller gave up (deadline); the batch still applies the events to state
                fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    def _keys(self, events: list[Event]) -> frozenset:
        """Everything a batch reads and writes: user ids, entity keys and event ids (raw ids stay in memory)."""
        store = self.engine.store
        keys = set()
        for e in events:
            keys.add(("u", e.user_id))
            keys.add(("e", e.user_id, e.event_id))
            if e.device_id or e.ip:
                keys.update(k for k in store.entity_keys(e) if k)
        return frozenset(keys)

    async def _run(self) -> None:
        pending = None                   # (take, events, keys): formed but waiting for a clash to finish
        while True:
            if pending is None:
                await self._wake.wait()
                if self.max_wait_s and sum(len(q[0]) for q in self._queue) < self.max_events:
                    await asyncio.sleep(self.max_wait_s)
                take = self._take()
                if not self._queue:
                    self._wake.clear()
                if not take:
                    continue
                events = [e for item in take for e in item[0]]
                keys = self._keys(events) if self.max_concurrent > 1 else frozenset()
                pending = (take, events, keys)
            take, events, keys = pending
            busy = len(self._running) >= self.max_concurrent or any(
                not keys.isdisjoint(k) for k in self._running.values())
            if busy:                     # wait for any running batch to end, then look again
                await asyncio.wait(list(self._running), return_when=asyncio.FIRST_COMPLETED)
                continue
            pending = None
            if self._running:
                self.overlapped += 1
            task = asyncio.get_running_loop().create_task(self._batch(take, events), name="batch")
            self._running[task] = keys
            task.add_done_callback(self._running.pop)

    def _take(self) -> list:
        """The next batch: queued requests from the head, up to max_events (at least one request),
        all of the head's lane (online or bulk, see the class docstring)."""
        take, size = [], 0
        while self._queue and (not take or (size + len(self._queue[0][0]) <= self.max_events
                                            and self._queue[0][4] == take[0][4])):
            item = self._queue.pop(0)
            take.append(item)
            size += len(item[0])
        return take

    async def _batch(self, take: list, events: list[Event]) -> None:
        deadlines = [item[1] for item in take if item[1] is not None]
        try:
            results = await self.engine.score(events, min(deadlines) if deadlines else None,
                                              any(item[2] for item in take))
        except Exception as e:  # a bug must not wedge every later request
            log.exception("batch failed")
            results = self.engine.degraded(events, f"internal error: {type(e).__name__}")
        self.batches += 1
        self.batched_events += len(events)
        pos = 0
        for evs, _, _, fut, _ in take:
            self.in_flight -= len(evs)
            if not fut.done():
                fut.set_result(results[pos:pos + len(evs)])
            pos += len(evs)
