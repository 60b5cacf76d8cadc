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
import json
import logging
import random
from dataclasses import dataclass, field

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS
from seqguard.explain import Reason, explain
from seqguard.schema import Event

from .aio import cancel_and_wait
from .state import RedisStateStore, StateConflict, StateUnavailable, ring_entry, unpack_features
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
    sequence: int = 0            # position in the global order events were applied (0: not applied)

    def to_json(self) -> str:
        """What the idempotency window remembers ("seq":0 is filled in by the atomic write)."""
        return json.dumps({"risk": self.risk, "action": self.action, "mv": self.model_version,
                           "reasons": [[r.code, r.message, r.weight, r.event_ids] for r in self.reasons],
                           "st": self.status, "seq": 0}, separators=(",", ":"))

    @classmethod
    def from_json(cls, event_id: str, d: dict) -> "ScoreResult":
        return cls(event_id, d["risk"], d["action"], d["mv"], d.get("st", OK), "duplicate event_id: original result",
                   [Reason(*r) for r in d["reasons"]], d["seq"])


class ScoringEngine:
    MAX_ROWS = 1024          # Triton's max_batch_size for the step model
    MAX_PENDING = 1024       # deferred LSTM steps kept per user while the encoder is down
    MAX_ATTEMPTS = 64        # compare-and-set retries when another gateway wrote the same state
    shadow = None            # gateway.shadow.ShadowScorer when settings.shadow_model_dir is set

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
        self.n_features = len(artifact.featurizer.spec()["feature_names"])
        self.encoder_features = artifact.encoder_features   # Triton gets the first ones; the rest are detector-only
        # surprise that counts as "unusual sequence": the 99.9th percentile seen in training, if known
        self.surprise_cut = float(artifact.metadata.get("training", {}).get("surprise_p999", 8.0))
        self.conflicts = 0
        self.rebuilds = 0            # user states rebuilt from the ring after a model version change

    def degraded(self, events: list[Event], detail: str) -> list[ScoreResult]:
        risk, action = FALLBACKS[self.fallback]
        return [ScoreResult(e.event_id, risk, action, self.model_version, DEGRADED, detail) for e in events]

    async def score(self, events: list[Event], deadline: float | None = None, explain_reasons: bool = True
                    ) -> list[ScoreResult]:
        """Score and apply events in the given order. Never raises for Redis/Triton failures.

        Retries from a fresh read when another writer changed the same users/entities
        (compare-and-set), so concurrent gateways never lose or double an update.
        """
        loop = asyncio.get_running_loop()
        for attempt in range(self.MAX_ATTEMPTS):
            try:
                return await self._attempt(events, deadline, explain_reasons)
            except StateConflict:
                self.conflicts += 1
                if deadline is not None and loop.time() >= deadline:
                    break
                await asyncio.sleep(random.uniform(0, 0.0005 * 2 ** min(attempt, 6)))  # jittered backoff
        return self.degraded(events, f"state kept changing under {self.MAX_ATTEMPTS} attempts; not applied")

    async def _attempt(self, events: list[Event], deadline: float | None, explain_reasons: bool) -> list[ScoreResult]:
        loop = asyncio.get_running_loop()
        remaining = lambda: None if deadline is None else deadline - loop.time()  # noqa: E731
        store, fz = self.store, self.featurizer

        # 1. one read: every user, entity and event id this batch touches
        user_ids = list(dict.fromkeys(e.user_id for e in events))
        ent_keys = [store.entity_keys(e) for e in events]
        uniq_ent = list(dict.fromkeys(k for ks in ent_keys for k in ks if k))
        try:
            users, (entities, raw_entities), answered = await store.load(
                user_ids, uniq_ent, list(dict.fromkeys((e.user_id, e.event_id) for e in events)))
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            return self.degraded(events, f"state store unavailable: {e}")
        for st in users.values():
            if st.existed and (st.model_version != self.model_version or st.h.shape[0] != self.hidden):
                self._rebuild(st)

        # idempotency: a (user, event id) already answered (or repeated in this batch) is not applied again
        fresh, first_of = [], {}
        for i, ev in enumerate(events):
            ref = (ev.user_id, ev.event_id)
            if ref in answered or ref in first_of:
                continue
            first_of[ref] = i
            fresh.append(i)

        # 2. featurise in arrival order (mutates the in-memory contexts)
        n = len(fresh)
        feats = np.empty((n, self.n_features), np.float32)
        type_ids = np.empty(n, np.int64)
        for j, i in enumerate(fresh):
            ev, (kd, ki, kp) = events[i], ent_keys[i]
            t = fz.tokens(ev)
            feats[j] = fz.featurize(t, users[ev.user_id].ctx, entities.get(kd) if kd else None,
                                    entities.get(ki) if ki else None, entities.get(kp) if kp else None)
            type_ids[j] = t.type_id

        # 3. the encoder: each user's deferred steps first, then this batch's events, in waves
        encoded = await self._encode(events, fresh, users, type_ids, feats, remaining) if fresh else None
        out: dict[int, ScoreResult] = {}
        if fresh and encoded is None:
            # Triton unavailable: answer with the fallback, keep the featurised steps for later
            fallback = self.degraded([events[i] for i in fresh],
                                     "encoder unavailable; event featurised and its model step deferred")
            for j, i in enumerate(fresh):
                st = users[events[i].user_id]
                st.pending.append((int(type_ids[j]), feats[j]))
                if len(st.pending) > self.MAX_PENDING:
                    del st.pending[0]      # the oldest step is lost; the state restarts from here on
                self._apply(st, events[i], feats[j])
                out[i] = fallback[j]
        elif fresh:
            # 4. detector, vectorised; 5. reasons + ring
            emb, surprise, waves, steps = encoded
            det = self.detector
            lift = np.zeros(n)
            if det.has_session:
                risk, lift = self._session_risk(users, waves, steps, n)
            else:
                risk = det.risk(emb, surprise, feats, type_ids)
            codes = det.action_codes(risk)
            for j, i in enumerate(fresh):
                ev = events[i]
                st = users[ev.user_id]
                reasons = explain(feats[j], surprise[j], ev.event_id, ev.event_type, st.ring,
                                  self.surprise_cut, session_lift=float(lift[j])) if explain_reasons else []
                self._apply(st, ev, feats[j])
                out[i] = ScoreResult(ev.event_id, float(risk[j]), ACTIONS[codes[j]], self.model_version, OK, "",
                                     reasons)

        # 6. one atomic write (compare-and-set) of users, entities and the answers to remember
        if fresh:
            responses = [((events[i].user_id, events[i].event_id), out[i].to_json()) for i in fresh]
            try:
                last = await store.save([st for st in users.values() if st.dirty],
                                        {k: entities[k] for k in uniq_ent}, raw_entities, responses)
            except StateUnavailable as e:
                log.warning("degraded: %s", e)
                for i in fresh:
                    r = out[i]
                    r.detail = (f"{r.detail}; " if r.detail else "scored, but ") + f"the state update was not saved: {e}"
                    r.status = DEGRADED
            else:
                for k, i in enumerate(fresh):
                    out[i].sequence = last - n + k + 1
                if self.shadow is not None and encoded is not None:   # applied: hand a copy to shadow mode
                    self.shadow.submit(self, [events[i] for i in fresh], type_ids, feats, encoded[:2], risk)
        results = []
        for i, ev in enumerate(events):
            if i in out:
                results.append(out[i])
            elif (ev.user_id, ev.event_id) in answered:
                results.append(ScoreResult.from_json(ev.event_id, answered[(ev.user_id, ev.event_id)]))
            else:                                   # repeated inside this batch
                twin = out[first_of[(ev.user_id, ev.event_id)]]
                results.append(ScoreResult(ev.event_id, twin.risk, twin.action, twin.model_version, twin.status,
                                           "duplicate event_id: original result", twin.reasons, twin.sequence))
        return results

    def _rebuild(self, st) -> None:
        """State written by another model version (or hidden size): rebuild h, c with THIS model.

        The ring keeps the feature rows of the user's last `rebuild_steps` events (features do not
        depend on the model), so h, c restart from zero and those steps run first, as deferred
        steps in the same Triton waves as this batch. The result equals an offline replay of those
        events from a zero state (tests/test_gateway.py::test_state_rebuilt_from_ring_on_model_upgrade);
        older history only survives in the featuriser context. Type ids are re-mapped through
        this model's vocabulary, so a vocabulary change is handled too.
        """
        st.h = np.zeros(self.hidden, np.float32)
        st.c = np.zeros(self.hidden, np.float32)
        st.session = 0.0                                # replayed through the steps below, too
        steps = []
        for e in reversed(st.ring):                     # the newest run of entries that carry features
            if not e.feat:
                break
            steps.append((self.featurizer.vocab.id(e.event_type), unpack_features(e.feat, self.n_features)))
        st.pending = steps[::-1]
        st.model_version = self.model_version
        st.dirty = True
        self.rebuilds += 1

    def _apply(self, st, ev: Event, feats=None) -> None:
        st.ring.append(ring_entry(ev.event_id, ev.event_type, ev.ts, feats))
        del st.ring[:-self.store.ring_size]
        st.n += 1
        st.model_version = self.model_version
        st.dirty = True

    def _session_risk(self, users, waves, steps, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Detector stage 2: every step of this batch (deferred ones included, so each user's
        session average sees the same events as the offline replay), user by user in order.
        Returns the risk of the n fresh events and, per event, the session average that set its
        score (0 where the event itself did)."""
        det = self.detector
        a = det.event_tail(steps.emb, steps.surprise, steps.feats, steps.type_ids)
        c = np.empty(n, np.float64)
        lift = np.zeros(n, np.float64)
        for wave in waves:                     # [(user, step index, fresh row or -1), ...]
            g = np.fromiter((s for _, s, _ in wave), np.int64, len(wave))
            sts = [users[u] for u, _, _ in wave]
            m_prev = np.fromiter((st.session for st in sts), np.float64, len(wave))
            cw, m_new = det.session_step(a[g], m_prev)
            for k, ((_, _, j), st) in enumerate(zip(wave, sts)):
                st.session = float(m_new[k])
                if j >= 0:
                    c[j] = cw[k]
                    if m_prev[k] > a[g[k]]:
                        lift[j] = m_prev[k]
        return det.session_risk(c), lift

    async def _encode(self, events, fresh, users, type_ids, feats, remaining):
        """Run every user's pending steps and new events through Triton; None if it is unavailable.

        Returns (embedding, surprise) of the fresh rows, the waves [(user, step, fresh row or -1)]
        and every step's inputs and outputs (`_Steps`), for the detector's session stage."""
        n = len(fresh)
        # per user: a list of steps (row index into this batch, or a pending (type, feats) pair)
        seqs: dict[str, list] = {}
        for u, st in users.items():
            if st.pending:
                seqs[u] = list(st.pending)
        for j, i in enumerate(fresh):
            seqs.setdefault(events[i].user_id, []).append(j)
        total = sum(len(v) for v in seqs.values())
        steps = _Steps(np.empty(total, np.int64), np.empty((total, self.n_features), np.float32),
                       np.empty((total, self.hidden), np.float32), np.empty((total, 2), np.float32))
        fresh_step = np.empty(n, np.int64)
        index: dict[str, list] = {}            # per user: (step index, fresh row or -1) in order
        g = 0
        for u, seq in seqs.items():
            out = index[u] = []
            for s in seq:
                if isinstance(s, int):
                    steps.type_ids[g], steps.feats[g] = type_ids[s], feats[s]
                    fresh_step[s] = g
                    out.append((g, s))
                else:
                    steps.type_ids[g], steps.feats[g] = s[0], s[1]
                    out.append((g, -1))
                g += 1
        depth = max((len(v) for v in seqs.values()), default=0)
        waves = [[(u, *ix[w]) for u, ix in index.items() if w < len(ix)] for w in range(depth)]
        read_state = {u: (st.h, st.c) for u, st in users.items()}
        try:
            for wave in waves:
                for a in range(0, len(wave), self.MAX_ROWS):
                    chunk = wave[a:a + self.MAX_ROWS]
                    rows = np.fromiter((s for _, s, _ in chunk), np.int64, len(chunk))
                    sts = [users[u] for u, _, _ in chunk]
                    left = remaining()
                    if left is not None and left <= 0:
                        raise EncoderUnavailable("deadline exceeded before the encoder call")
                    h2, c2, e2, s2 = await self.encoder.step(steps.type_ids[rows],
                                                             steps.feats[rows, :self.encoder_features],
                                                             np.stack([s.h for s in sts]),
                                                             np.stack([s.c for s in sts]), timeout_s=left)
                    for k, st in enumerate(sts):
                        st.h, st.c = h2[k], c2[k]
                    steps.emb[rows], steps.surprise[rows] = e2, s2
        except EncoderUnavailable as e:
            log.warning("degraded: %s", e)
            for u, st in users.items():        # undo steps of earlier waves: all of them are deferred
                st.h, st.c = read_state[u]
            return None
        for st in users.values():
            if st.pending:
                st.pending = []
                st.dirty = True             # its deferred steps ran: h, c moved on
        return steps.emb[fresh_step], steps.surprise[fresh_step], waves, steps


@dataclass
class _Steps:
    """Every LSTM step of one batch (deferred and fresh), in the order they were indexed."""
    type_ids: np.ndarray
    feats: np.ndarray
    emb: np.ndarray
    surprise: np.ndarray


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
    batch's Redis and Triton waits overlap another's Python work; with both on the same 2 cores it
    measured worse (smaller batches, more CPU per request), hence the default of 1.
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
                take, size = [], 0
                while self._queue and (not take or size + len(self._queue[0][0]) <= self.max_events):
                    item = self._queue.pop(0)
                    take.append(item)
                    size += len(item[0])
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
        for evs, _, _, fut in take:
            self.in_flight -= len(evs)
            if not fut.done():
                fut.set_result(results[pos:pos + len(evs)])
            pos += len(evs)
