"""The online scoring pipeline for a batch of events (one coalesced window of requests).

    Redis (1 round trip: users + entities) -> shared featuriser, in arrival order
    -> Triton step encoder (1 request per "wave": the k-th event of each user in the batch)
    -> detector (one vectorised call) -> reasons -> Redis (1 round trip) -> results

Features depend only on the featuriser contexts, never on the LSTM state, so the whole batch
is featurised first in arrival order (two events of one user, or of one shared device, see
each other's updates exactly as in the offline replay); only the encoder needs waves, so two
events of one user are never stepped from the same stale state.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS
from seqguard.explain import Reason, explain
from seqguard.featurizer import EntityContext
from seqguard.schema import Event

from .state import RedisStateStore, StateUnavailable
from .triton_client import EncoderUnavailable, TritonStepClient

log = logging.getLogger("seqguard.gateway")

OK, DEGRADED = "OK", "DEGRADED"
FALLBACKS = {"fail_open": (0.0, "ALLOW"), "fail_closed": (1.0, "CHALLENGE")}


@dataclass
class ScoreResult:
    event_id: str
    risk: float
    action: str
    model_version: str
    status: str = OK
    detail: str = ""
    reasons: list[Reason] = field(default_factory=list)


class ScoringEngine:
    MAX_ROWS = 1024          # Triton's max_batch_size for the step model

    def __init__(self, artifact: ModelArtifact, store: RedisStateStore, encoder: TritonStepClient,
                 fallback: str = "fail_open"):
        self.artifact = artifact
        self.featurizer = artifact.featurizer
        self.detector = artifact.detector
        self.store = store
        self.encoder = encoder
        self.fallback = fallback
        self.model_version = artifact.model_version
        self.hidden = artifact.hidden
        # surprise that counts as "unusual sequence": the 99.9th percentile seen in training, if known
        self.surprise_cut = float(artifact.metadata.get("training", {}).get("surprise_p999", 8.0))

    def degraded(self, events: list[Event], detail: str) -> list[ScoreResult]:
        risk, action = FALLBACKS[self.fallback]
        return [ScoreResult(e.event_id, risk, action, self.model_version, DEGRADED, detail) for e in events]

    async def score(self, events: list[Event], deadline: float | None = None, explain_reasons: bool = True
                    ) -> list[ScoreResult]:
        """Score and apply events in the given order. Never raises for Redis/Triton failures."""
        loop = asyncio.get_running_loop()
        remaining = lambda: None if deadline is None else deadline - loop.time()  # noqa: E731
        store, fz = self.store, self.featurizer

        # 1. one read: every user and entity this batch touches
        user_ids = list(dict.fromkeys(e.user_id for e in events))
        ent_keys = [store.entity_keys(e) for e in events]
        uniq_ent = list(dict.fromkeys(k for ks in ent_keys for k in ks if k))
        try:
            users, entities = await store.load(user_ids, uniq_ent)
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            return self.degraded(events, f"state store unavailable: {e}")
        for st in users.values():
            if st.existed and (st.model_version != self.model_version or st.h.shape[0] != self.hidden):
                # state of another model version: restart its sequence state, keep the featuriser context
                st.h = np.zeros(self.hidden, np.float32)
                st.c = np.zeros(self.hidden, np.float32)

        # 2. featurise in arrival order (mutates the in-memory contexts)
        n = len(events)
        feats = np.empty((n, len(fz.spec()["feature_names"])), np.float32)
        type_ids = np.empty(n, np.int64)
        wave = np.empty(n, np.int64)
        seen: dict[str, int] = {}
        for i, (ev, (kd, ki, kp)) in enumerate(zip(events, ent_keys)):
            t = fz.tokens(ev)
            st = users[ev.user_id]
            feats[i] = fz.featurize(t, st.ctx, entities.get(kd) if kd else None,
                                    entities.get(ki) if ki else None, entities.get(kp) if kp else None)
            type_ids[i] = t.type_id
            wave[i] = seen.get(ev.user_id, 0)
            seen[ev.user_id] = wave[i] + 1

        # 3. the encoder, one Triton request per wave
        emb = np.empty((n, self.hidden), np.float32)
        surprise = np.empty((n, 2), np.float32)
        try:
            waves = [np.flatnonzero(wave == w) for w in range(int(wave.max()) + 1 if n else 0)]
            for rows in (r[a:a + self.MAX_ROWS] for r in waves for a in range(0, len(r), self.MAX_ROWS)):
                sts = [users[events[i].user_id] for i in rows]
                left = remaining()
                if left is not None and left <= 0:
                    raise EncoderUnavailable("deadline exceeded before the encoder call")
                h2, c2, e2, s2 = await self.encoder.step(type_ids[rows], feats[rows],
                                                         np.stack([s.h for s in sts]), np.stack([s.c for s in sts]),
                                                         timeout_s=left)
                for j, s in enumerate(sts):
                    s.h, s.c = h2[j], c2[j]
                emb[rows], surprise[rows] = e2, s2
        except EncoderUnavailable as e:
            log.warning("degraded: %s", e)
            # nothing is written: the user's state does not advance past an event it could not encode
            return self.degraded(events, f"encoder unavailable: {e}")

        # 4. detector, vectorised
        det = self.detector
        risk = det.risk(emb, surprise, feats)
        codes = det.action_codes(risk)

        # 5. reasons + ring, then one write
        results = []
        for i, ev in enumerate(events):
            st = users[ev.user_id]
            reasons = explain(feats[i], surprise[i], ev.event_id, ev.event_type, st.ring,
                              self.surprise_cut) if explain_reasons else []
            st.ring.append([ev.event_id, ev.event_type, ev.ts])
            del st.ring[:-store.ring_size]
            st.n += 1
            st.model_version = self.model_version
            results.append(ScoreResult(ev.event_id, float(risk[i]), ACTIONS[codes[i]], self.model_version,
                                       OK, "", reasons))
        try:
            await store.save(list(users.values()), {k: entities[k] for k in uniq_ent})
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            for r in results:
                r.status, r.detail = DEGRADED, f"scored, but the state update was not saved: {e}"
        return results


class Overloaded(RuntimeError):
    """More events in flight than the configured bound: answer RESOURCE_EXHAUSTED, do not queue."""


class Coalescer:
    """Gathers concurrent requests into one engine batch at a time.

    Adaptive: while one batch runs, new requests queue; the next batch takes everything queued
    (up to max_events), so batches grow with load and a lone request waits for nobody.
    Batches run one after another, so a batch never reads state an earlier one is still writing.
    """

    def __init__(self, engine: ScoringEngine, max_events: int = 256, max_wait_us: int = 0,
                 max_in_flight: int = 2048):
        self.engine = engine
        self.max_events = max_events
        self.max_wait_s = max_wait_us / 1e6
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._queue: list = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.batched_events = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="coalescer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, events: list[Event], deadline: float | None, explain_reasons: bool = True
                     ) -> list[ScoreResult]:
        if self.in_flight + len(events) > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} events in flight (limit {self.max_in_flight})")
        fut = asyncio.get_running_loop().create_future()
        self.in_flight += len(events)
        self._queue.append((events, deadline, explain_reasons, fut))
        self._wake.set()
        try:
            return await asyncio.shield(fut)
        finally:
            if not fut.done():
                # the caller gave up (deadline); the batch still applies the events to state
                fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.max_wait_s and sum(len(q[0]) for q in self._queue) < self.max_events:
                await asyncio.sleep(self.max_wait_s)
            take, size = [], 0
            while self._queue and (not take or size + len(self._queue[0][0]) <= self.max_events):
                item = self._queue.pop(0)
                take.append(item)
                size += len(item[0])
            if not self._queue:
                self._wake.clear()
            events = [e for item in take for e in item[0]]
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
            for evs, _, _, fut in take:
                self.in_flight -= len(evs)
                if not fut.done():
                    fut.set_result(results[pos:pos + len(evs)])
                pos += len(evs)
