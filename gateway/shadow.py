"""Shadow mode: score every applied live event with a candidate artifact too, never changing the live answer.

The engine hands each applied batch (events, the live featuriser's rows, the live encoder's
outputs and risks) to `ShadowScorer.submit`, which only queues it; one worker scores the batches
in order on its own thread and event loop with its own Redis and Triton clients, so the live path
pays a queue append and nothing else: no extra Redis round trip, no Triton wait, no exception, and
no shadow coroutine step ever holds up the live event loop (on the live loop, the worker's steps
delayed live Redis reads past their timeout). A shadow failure is counted
(seqguard_shadow_events{result="failed"}), a full queue drops the batch (result="dropped").

The candidate must featurise the same way (same schema, featuriser version and feature names;
its vocabulary may differ, type ids are re-mapped). Two cases:

* same encoder (identical model.onnx, e.g. a detector-only retrain): the candidate's detector runs
  on the live embeddings; no Triton call, and per user only the detector's session average
  (when the candidate has that stage) at sg:sh:<hmac(user)>.
* another encoder: the candidate's Triton version (metadata triton.model_version, loaded beside the
  live one by the `latest: { num_versions: 2 }` policy) steps each user's candidate LSTM state, kept
  at sg:sh:<hmac(user)> (TTL = state_ttl_s), in waves like the live engine. The candidate's
  sequence state starts when shadow mode first sees the user.

Each scored event is appended to the sg:shadow stream (MAXLEN ~shadow_stream_max):
user = hmac(user id), event = hmac(event id) (the same pseudonyms as sg:u: keys and sg:outcomes,
so labels join), live / shadow risk and action, live_mv / shadow_mv; and candidate minus live risk
feeds seqguard_shadow_risk_diff. The candidate state is written without compare-and-set: with
several gateways an update of one user on two gateways at the same instant can lose a shadow step
(the live state is unaffected).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS
from seqguard.encoding import lockstep_rows
from seqguard.schema import Event

from .aio import cancel_and_wait
from .stepping import step_in_waves

log = logging.getLogger("seqguard.gateway")

class ShadowIncompatible(ValueError):
    """The candidate does not featurise like the live model, so 'same inputs' would not hold."""


def check_compatible(live: ModelArtifact, candidate: ModelArtifact) -> None:
    a, b = live.featurizer.spec(), candidate.featurizer.spec()
    for k in ("schema_version", "featurizer_version", "feature_names"):
        if a[k] != b[k]:
            raise ShadowIncompatible(f"shadow candidate {candidate.model_version} has another {k} than the live "
                                     f"model {live.model_version}; shadow mode needs the same featurised inputs")


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pack_state(model_version: str, h: np.ndarray, c: np.ndarray, session: float = 0.0) -> bytes:
    """Candidate state: version, h, c (float32; empty for a same-encoder candidate) and the
    detector's session average (float64, seqguard/detector.py stage 2)."""
    return (model_version.encode() + b"\0" + np.asarray(h, np.float32).tobytes() + np.asarray(c, np.float32).tobytes()
            + struct.pack("<d", session))


def unpack_state(raw: bytes | None, model_version: str, hidden: int):
    """[h, c, session] stored for this candidate version, or zeros (new user, other candidate, damaged value)."""
    if raw:
        mv, _, rest = raw.partition(b"\0")
        if mv.decode(errors="replace") == model_version and len(rest) == 8 * hidden + 8:
            v = np.frombuffer(rest[:8 * hidden], np.float32)
            return [v[:hidden].copy(), v[hidden:].copy(), struct.unpack("<d", rest[8 * hidden:])[0]]
    return [np.zeros(hidden, np.float32), np.zeros(hidden, np.float32), 0.0]


@dataclass
class _Batch:
    live_version: str
    same_encoder: bool
    events: list[Event]
    type_ids: np.ndarray        # the candidate's vocabulary ids
    feats: np.ndarray
    emb: np.ndarray             # live embeddings (used when the encoder is the same)
    surprise: np.ndarray
    live_risk: np.ndarray
    live_codes: np.ndarray


class ShadowScorer:
    def __init__(self, candidate: ModelArtifact, make_clients, metrics, *, stream_max: int, queue_events: int,
                 ttl_s: int, timeout_s: float):
        """`make_clients()` -> (a RedisStateStore of its own, a TritonStepClient for the candidate's Triton
        version); called on the shadow thread, whose event loop the clients belong to. The Triton client
        is used only when the candidate's encoder differs from the live one."""
        self.candidate = candidate
        self._make_clients, self.metrics = make_clients, metrics
        self.store = self.encoder = None
        self.stream_max, self.queue_events, self.ttl_s, self.timeout_s = stream_max, queue_events, ttl_s, timeout_s
        self.version = candidate.model_version
        self._onnx = _digest(candidate.onnx_path)
        self._vocab = list(candidate.featurizer.vocab.tokens)
        self._plans: dict = {}              # live artifact -> (same encoder, same vocabulary)
        self._lock = threading.Lock()       # counters are touched from the live and the shadow thread
        self.queued = 0                     # events waiting
        self.scored = self.failed = self.dropped = 0
        self.last_error = ""
        self._last_log = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @classmethod
    def from_settings(cls, s, live: ModelArtifact, hasher, metrics) -> "ShadowScorer":
        from .state import RedisStateStore
        from .triton_client import TritonStepClient
        cand = ModelArtifact.load(s.shadow_model_dir, hasher=hasher)
        check_compatible(live, cand)

        def make_clients():
            return (RedisStateStore.from_settings(s, cand.hidden),
                    TritonStepClient(s.triton_url, s.triton_model, cand.triton_model_version, s.triton_timeout_ms))
        scorer = cls(cand, make_clients, metrics, stream_max=s.shadow_stream_max,
                     queue_events=s.shadow_queue_events, ttl_s=s.state_ttl_s,
                     timeout_s=max(s.triton_timeout_ms, s.redis_timeout_ms) / 1000)
        scorer._plan(live)          # hash the live model.onnx now, not on the first live batch
        return scorer

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="seqguard-shadow", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._task is None:
            raise RuntimeError(f"shadow worker did not start: {self.last_error or 'timeout'}")
        log.info("shadow mode: candidate %s (triton version %s)", self.version, self.candidate.triton_model_version)

    def _thread_main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._queue = asyncio.Queue()
            self.store, self.encoder = self._make_clients()
            self._task = loop.create_task(self._run(), name="shadow")
        except Exception as e:  # noqa: BLE001 - reported by start()
            self.last_error = f"{type(e).__name__}: {e}"
        finally:
            self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def drain(self, timeout: float) -> None:
        """Wait until every batch submitted so far has been scored (or failed); for tests."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self._queue.join(), timeout), self._loop))

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (batches still queued are not scored) and close its clients."""
        if self._loop is None or not self._loop.is_running():
            return
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    async def _shutdown(self) -> None:
        await cancel_and_wait(self._task)
        for client in (self.encoder, self.store):
            if client is not None:
                await client.close()

    # ------------------------------------------------------------------ called by the engine (live path)
    def submit(self, engine, events: list[Event], type_ids, feats, encoded, live_risk) -> None:
        """Queue one applied batch; never raises, never waits."""
        n = len(events)
        try:
            with self._lock:
                full = self.queued + n > self.queue_events
                if full:
                    self.dropped += n
                else:
                    self.queued += n
            if full:
                self.metrics.shadow_events.labels("dropped").inc(n)
                return
            same_encoder, same_vocab = self._plan(engine.artifact)
            tids = type_ids if same_vocab else np.array(
                [self.candidate.featurizer.vocab.id(e.event_type) for e in events], np.int64)
            emb, surprise = encoded
            live_risk = np.asarray(live_risk, np.float64)
            batch = _Batch(engine.model_version, same_encoder, events, tids, feats, emb, surprise, live_risk,
                           engine.detector.action_codes(live_risk))
        except Exception as e:  # noqa: BLE001 - shadow mode must never break a live answer
            with self._lock:
                self.queued -= n
            self._failed(n, e)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)   # in order, on the shadow thread
        except Exception as e:  # noqa: BLE001 - e.g. the worker loop is already closed
            with self._lock:
                self.queued -= n
            self._failed(n, e)

    def _plan(self, live: ModelArtifact) -> tuple[bool, bool]:
        key = (str(live.path), live.model_version)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = (_digest(live.onnx_path) == self._onnx,
                                       list(live.featurizer.vocab.tokens) == self._vocab)
        return plan

    def _failed(self, n: int, e: BaseException) -> None:
        with self._lock:
            self.failed += n
            self.last_error = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            say = now - self._last_log > 10
            if say:
                self._last_log = now
        self.metrics.shadow_events.labels("failed").inc(n)
        if say:                                # one line per 10 s, not one per batch
            log.warning("shadow scoring failed (live answers unaffected): %s", self.last_error)

    # ------------------------------------------------------------------ the worker
    async def _run(self) -> None:
        while True:
            b = await self._queue.get()
            try:
                await self._score(b)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - counted; the next batch is tried
                self._failed(len(b.events), e)
            finally:
                with self._lock:
                    self.queued -= len(b.events)
                self._queue.task_done()

    async def _score(self, b: _Batch) -> None:
        cand = self.candidate
        store = self.store
        ukeys = [store.shadow_state_key(e.user_id) for e in b.events]
        det = cand.detector
        states = {}
        if b.same_encoder:
            emb, surprise = b.emb, b.surprise
            if det.has_session:                   # only the session average is kept per user
                states = await self._read_states(ukeys, 0)
        else:
            emb, surprise, states = await self._encode(b, ukeys)
        # on the shadow thread, not the live loop
        if det.has_session:
            a = det.event_tail(emb, surprise, b.feats, b.type_ids)
            c = np.empty(len(a), np.float64)
            for j, k in enumerate(ukeys):         # a user's events in this batch are in their order
                cj, m = det.session_step(a[j:j + 1], np.array([states[k][2]], np.float64))
                c[j], states[k][2] = cj[0], float(m[0])
            risk = det.session_risk(c)
        else:
            risk = det.risk(emb, surprise, b.feats, b.type_ids)
        codes = det.action_codes(risk)
        entries = [{"user": store.user_pseudonym(e.user_id), "event": store.event_pseudonym(e.event_id),
                    "live": repr(float(b.live_risk[j])), "shadow": repr(float(risk[j])),
                    "live_action": ACTIONS[b.live_codes[j]], "shadow_action": ACTIONS[codes[j]],
                    "live_mv": b.live_version, "shadow_mv": self.version} for j, e in enumerate(b.events)]
        states = {k: pack_state(self.version, h, c_, m) for k, (h, c_, m) in states.items()}
        await asyncio.wait_for(store.write_shadow(states, self.ttl_s, entries, self.stream_max), self.timeout_s + 1.0)
        for d in (risk - b.live_risk).tolist():
            self.metrics.shadow_diff.observe(d)
        with self._lock:
            self.scored += len(b.events)
        self.metrics.shadow_events.labels("scored").inc(len(b.events))

    async def _read_states(self, ukeys: list[str], hidden: int) -> dict:
        uniq = list(dict.fromkeys(ukeys))
        raws = await asyncio.wait_for(self.store.read_values(uniq), self.timeout_s + 1.0)
        return {k: unpack_state(raw, self.version, hidden) for k, raw in zip(uniq, raws)}

    async def _encode(self, b: _Batch, ukeys: list[str]):
        """The candidate's LSTM steps: each user's events in order, one Triton request per wave."""
        hidden = self.candidate.hidden
        states = await self._read_states(ukeys, hidden)
        users = list(states)                   # in first-appearance order, like ukeys
        position = {k: i for i, k in enumerate(users)}
        user_idx = np.fromiter((position[k] for k in ukeys), np.int64, len(ukeys))
        h = np.stack([states[k][0] for k in users])
        c = np.stack([states[k][1] for k in users])
        n = len(b.events)
        emb = np.empty((n, hidden), np.float32)
        surprise = np.empty((n, 2), np.float32)
        await step_in_waves(self.encoder, list(lockstep_rows(user_idx, len(users))), user_idx, b.type_ids,
                            b.feats[:, :self.candidate.encoder_features], h, c, emb, surprise,
                            lambda: self.timeout_s)
        for k, key in enumerate(users):
            states[key][0], states[key][1] = h[k], c[k]
        return emb, surprise, states
