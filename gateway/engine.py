"""The online scoring pipeline for a batch of events (one coalesced window of requests).

    load      Redis (1 round trip: users, entities, answered events, holds); dedupe
    featurise the shared featuriser, in arrival order
    encode    Triton step encoder (1 request per "wave": the k-th event of each user in the batch)
    detect    detector (one vectorised call) -> rules (one vectorised call) -> reasons -> holds
    commit    Redis (1 round trip, compare-and-set) -> results in request order

Features depend only on the featuriser contexts, never on the LSTM state, so the whole batch
is featurised first in arrival order (two events of one user, or of one shared device, see
each other's updates exactly as in the offline replay); only the encoder needs waves, so two
events of one user are never stepped from the same stale state.

Each stage is a method that takes the batch's working set (`Batch`) and returns or fills in its
own part, so one can be run alone on a batch built in memory (tests/test_engine_stages.py).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS
from seqguard.encoding import lockstep_rows
from seqguard.explain import explain
from seqguard.rules import RuleInputs
from seqguard.schema import Event

from .aio import cancel_and_wait
from .alerts import AlertRecord
from .holds import HOLD_REASON, HoldStore, apply_holds
from .observer import PipelineObserver
from .reload import LiveRules
from .result import DEGRADED, MAX_REASONS, OK, ScoreResult
from .stepping import step_in_waves
from .codec import NO_ANSWER, ring_entry, unpack_features
from .state import BatchRead, RedisStateStore, StateConflict, StateUnavailable, alert_fields
from .triton_client import EncoderUnavailable, TritonStepClient

log = logging.getLogger("seqguard.gateway")

FALLBACKS = {"fail_open": (0.0, "ALLOW"), "fail_closed": (1.0, "CHALLENGE")}


@dataclass
class Batch:
    """One attempt's working set. `load` fills the first part; each later stage adds its own."""
    events: list[Event]
    entity_keys: list[tuple]            # per event: its device, IP and IP-prefix keys (None where absent)
    hold_keys: list[list[str]]          # per event: the hold keys that could apply to it
    read: BatchRead
    held: dict                          # hold key -> Hold, for the holds in force
    fresh: list[int]                    # indices of the events to apply, in arrival order
    first_of: dict                      # (user id, event id) -> index of its first occurrence
    # featurise: per fresh event (position j in `fresh`)
    type_ids: np.ndarray | None = None
    feats: np.ndarray | None = None
    # encode
    behind: set = field(default_factory=set)    # users left to the catch-up task (deep backlog)
    rows: list[int] = field(default_factory=list)   # positions j whose model step runs now
    encoded: "_Steps | None" = None     # None: the encoder did not run (unavailable, or nothing to step)

    @property
    def users(self) -> dict:
        return self.read.users


@dataclass
class Decisions:
    """What detect produced: the answers of applied events and the rewrites of remembered ones."""
    out: dict[int, ScoreResult]         # event index -> its answer
    rewrites: dict[str, ScoreResult]    # answer key of a deferred step that just ran -> its real score
    risk: np.ndarray                    # risk of the encoded fresh rows (batch.rows), for shadow mode


class ScoringEngine:
    MAX_ATTEMPTS = 64        # compare-and-set retries when another gateway wrote the same state
    # Deferred LSTM steps (encoder unavailable). Up to MAX_INLINE_CATCHUP of a user's deferred steps
    # run inside the next batch that touches the user (one encoder call per step, in waves); a deeper
    # backlog would not fit a request's deadline, so it is drained off the request path in chunks of
    # CATCH_UP_CHUNK steps while the user's new events are deferred behind it. Beyond MAX_PENDING the
    # loss rule applies: h, c and the session average restart from zero with the newest MAX_PENDING
    # steps, exactly as a rebuild does (an offline replay of those steps from zero gives the same
    # scores), which bounds a user's record (a deferred step is 8 + 4 x features + 16 bytes).
    MAX_INLINE_CATCHUP = 32
    CATCH_UP_CHUNK = 256
    MAX_PENDING = 256
    shadow = None            # gateway.shadow.ShadowScorer when settings.shadow_model_dir is set

    def __init__(self, artifact: ModelArtifact, store: RedisStateStore, encoder: TritonStepClient,
                 fallback: str = "fail_open", holds: HoldStore | None = None, alerts_include_raw_ids: bool = False,
                 rules: LiveRules | None = None, observer: PipelineObserver | None = None):
        self.artifact = artifact
        self.observer = observer             # metrics hooks (gateway/observer.py); None: not observed
        self.rules = rules or LiveRules()    # shared with the gateway: a rules reload swaps what it holds
        self.holds = holds                   # read in the batch's one MGET; None: holds not enforced
        self.alerts_include_raw_ids = alerts_include_raw_ids
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
        self.conflicts = 0           # compare-and-set writes refused (another writer got there first)
        self.rebuilds = 0            # user states rebuilt from the ring after a model version change
        self.deferred_steps = 0      # LSTM steps deferred (encoder unavailable or the user catching up)
        self.caught_up_steps = 0     # deferred steps run later (inline or by the catch-up task)
        self.backlog_resets = 0      # users whose backlog passed MAX_PENDING (the loss rule applied)
        self.refused_writes = 0      # batches not applied: Redis failed or the state kept changing
        self._catch_up: dict[str, asyncio.Task] = {}

    def degraded(self, events: list[Event], detail: str) -> list[ScoreResult]:
        """Fallback answers for events that were not scored (a caller's deadline, an internal error)."""
        results = self._fallback(events, detail)
        if self.observer is not None:
            self.observer.fallback_answers(len(results))
        return results

    def _fallback(self, events: list[Event], detail: str) -> list[ScoreResult]:
        risk, action = FALLBACKS[self.fallback]
        return [ScoreResult(e.event_id, risk, action, self.model_version, DEGRADED, detail) for e in events]

    @property
    def backlog_users(self) -> int:
        """Users whose deferred steps are being drained off the request path now."""
        return len(self._catch_up)

    async def score(self, events: list[Event], deadline: float | None = None, explain_reasons: bool = True
                    ) -> list[ScoreResult]:
        """Score and apply events in the given order. Never raises for Redis/Triton failures.

        Retries from a fresh read when another writer changed the same users/entities
        (compare-and-set), so concurrent gateways never lose or double an update.
        """
        results = await self._score(events, deadline, explain_reasons)
        if self.observer is not None:
            self.observer.batch_scored(len(events), results)
        return results

    async def _score(self, events: list[Event], deadline: float | None, explain_reasons: bool) -> list[ScoreResult]:
        loop = asyncio.get_running_loop()
        for attempt in range(self.MAX_ATTEMPTS):
            try:
                return await self._attempt(events, deadline, explain_reasons)
            except StateConflict:
                self.conflicts += 1
                if deadline is not None and loop.time() >= deadline:
                    break
                await asyncio.sleep(random.uniform(0, 0.0005 * 2 ** min(attempt, 6)))  # jittered backoff
        self.refused_writes += 1
        return self._fallback(events, f"state kept changing under {self.MAX_ATTEMPTS} attempts; not applied")

    async def _attempt(self, events: list[Event], deadline: float | None, explain_reasons: bool) -> list[ScoreResult]:
        try:
            batch = await self.load(events)
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            return self._fallback(events, f"state store unavailable: {e}")
        self.featurise(batch)
        await self.encode(batch, _time_left(deadline))
        decided = self.detect(batch, explain_reasons)
        await self.commit(batch, decided)
        return self._in_request_order(batch, decided)

    # ------------------------------------------------------------------ stage 1: load
    async def load(self, events: list[Event]) -> Batch:
        """One read of every user, entity, (user, event id) and hold the batch touches, then `prepare`.
        Raises StateUnavailable."""
        store = self.store
        ent_keys = [store.entity_keys(e) for e in events]
        hold_keys = [self.holds.keys_for(e) for e in events] if self.holds else [[] for _ in events]
        uniq_holds = list(dict.fromkeys(k for ks in hold_keys for k in ks))
        read = await store.load(list(dict.fromkeys(e.user_id for e in events)),
                                list(dict.fromkeys(k for ks in ent_keys for k in ks if k)),
                                list(dict.fromkeys((e.user_id, e.event_id) for e in events)), uniq_holds)
        held = self.holds.parse(uniq_holds, read.extra) if self.holds else {}
        return self.prepare(events, ent_keys, hold_keys, read, held)

    def prepare(self, events: list[Event], ent_keys: list, hold_keys: list, read: BatchRead, held: dict) -> Batch:
        """The batch over what was read: users written by another model version are rebuilt, events
        already answered are left out."""
        for st in read.users.values():
            if st.existed and (st.model_version != self.model_version or st.h.shape[0] != self.hidden):
                self._rebuild(st)
        fresh, first_of = self._dedupe(events, read.answered)
        return Batch(events, ent_keys, hold_keys, read, held, fresh, first_of)

    def _dedupe(self, events: list[Event], answered: dict) -> tuple[list[int], dict]:
        """Indices of the events to apply: a (user, event id) already answered or repeated in this
        batch is not applied again. Also returns the first index of each (user, event id)."""
        fresh, first_of = [], {}
        for i, ev in enumerate(events):
            ref = (ev.user_id, ev.event_id)
            if ref in answered or ref in first_of:
                continue
            first_of[ref] = i
            fresh.append(i)
        return fresh, first_of

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
            if not len(e.feat):
                break
            steps.append((self.featurizer.vocab.id(e.event_type), unpack_features(e.feat, self.n_features), NO_ANSWER))
        st.pending = steps[::-1]
        st.model_version = self.model_version
        st.dirty = True
        self.rebuilds += 1

    # ------------------------------------------------------------------ stage 2: featurise
    def featurise(self, batch: Batch) -> None:
        """Type ids and feature rows of the batch's fresh events in arrival order: one call of the
        compiled featuriser kernel, which updates the user and entity contexts in place."""
        if not batch.fresh:
            batch.type_ids, batch.feats = np.empty(0, np.int64), np.empty((0, self.n_features), np.float32)
            return
        events, entities, users = batch.events, batch.read.entities, batch.users
        todo = [events[i] for i in batch.fresh]
        ents = [tuple(entities.get(k) if k else None for k in batch.entity_keys[i]) for i in batch.fresh]
        batch.type_ids, batch.feats = self.featurizer.featurize_batch(todo, [users[ev.user_id].ctx for ev in todo],
                                                                      ents)

    # ------------------------------------------------------------------ stage 3: encode
    async def encode(self, batch: Batch, remaining: Callable[[], float | None]) -> None:
        """Each user's deferred steps first, then this batch's events, through the encoder in waves.
        A user with a deep backlog is left out: its new events queue behind the backlog, which the
        catch-up task drains off the request path. `remaining()`: seconds left (None: no deadline)."""
        users, events = batch.users, batch.events
        batch.behind = {u for u, st in users.items() if len(st.pending) > self.MAX_INLINE_CATCHUP}
        stepped = {u: st for u, st in users.items() if u not in batch.behind}
        batch.rows = [j for j, i in enumerate(batch.fresh) if events[i].user_id not in batch.behind]
        if batch.rows or any(st.pending for st in stepped.values()):
            batch.encoded = await self._encode([events[batch.fresh[j]].user_id for j in batch.rows], batch.rows,
                                               stepped, batch.type_ids, batch.feats, remaining)
        for u in batch.behind:
            self._schedule_catch_up(u)

    async def _encode(self, row_users: list[str], rows: list[int], users: dict, type_ids, feats, remaining):
        """Run the given users' deferred steps, then the given fresh rows, through the encoder in waves
        (the k-th step of every user at once). None if the encoder is unavailable: then nothing moved."""
        seqs: dict[str, list] = {u: list(st.pending) for u, st in users.items() if st.pending}
        for u, j in zip(row_users, rows):
            seqs.setdefault(u, []).append(j)
        steps = self._lay_out(seqs, rows, type_ids, feats)
        h = np.stack([users[u].h for u in steps.users]) if steps.users else np.empty((0, self.hidden), np.float32)
        c = np.stack([users[u].c for u in steps.users]) if steps.users else np.empty((0, self.hidden), np.float32)
        try:
            await step_in_waves(self.encoder, steps.waves, steps.user_idx, steps.type_ids,
                                steps.feats[:, :self.encoder_features], h, c, steps.emb, steps.surprise, remaining,
                                self.observer.encoder_request if self.observer is not None else None)
        except EncoderUnavailable as e:
            log.warning("degraded: %s", e)     # h, c stay as read: every step stays deferred
            return None
        for k, u in enumerate(steps.users):
            st = users[u]
            st.h, st.c = h[k], c[k]
            if st.pending:
                st.pending = []
                st.dirty = True                    # its deferred steps ran: h, c moved on
        return steps

    def _lay_out(self, seqs: dict[str, list], rows: list[int], type_ids, feats) -> "_Steps":
        """Every user's steps one after the other (deferred ones as (type id, features, answer key),
        fresh ones as their row position in the batch), with the waves that run them."""
        total = sum(len(v) for v in seqs.values())
        steps = _Steps(np.empty(total, np.int64), np.empty((total, self.n_features), np.float32),
                       np.empty((total, self.hidden), np.float32), np.empty((total, 2), np.float32),
                       list(seqs), np.repeat(np.arange(len(seqs)), [len(v) for v in seqs.values()]))
        fresh_step = {}
        g = 0
        for seq in seqs.values():
            for s in seq:
                if isinstance(s, int):
                    steps.type_ids[g], steps.feats[g] = type_ids[s], feats[s]
                    fresh_step[s] = g
                else:
                    steps.type_ids[g], steps.feats[g] = s[0], s[1]
                    if s[2]:
                        steps.answered_steps.append((g, s[2]))
                    steps.caught_up += 1
                g += 1
        steps.waves = list(lockstep_rows(steps.user_idx, len(seqs)))
        steps.fresh_step = np.fromiter((fresh_step[j] for j in rows), np.int64, len(rows))
        return steps

    # ------------------------------------------------------------------ stage 4: detect
    def detect(self, batch: Batch, explain_reasons: bool = True) -> Decisions:
        """Per fresh event its answer (model-scored, or DEGRADED with its step deferred), the real
        scores of deferred steps that just ran, and the holds in force on top; applies each event
        to its user's in-memory state (ring, n)."""
        out: dict[int, ScoreResult] = {}
        rewrites: dict[str, ScoreResult] = {}
        risk = np.zeros(0)
        enc = batch.encoded
        if enc is not None:
            step_risk, lift, codes = self._score_steps(batch.users, enc)
            risk = step_risk[enc.fresh_step]
            rewrites = self._rewrites(enc, step_risk, codes)
            out = self._scored_answers(batch, step_risk, lift, codes, explain_reasons)
        out.update(self._deferred_answers(batch))
        if batch.held:
            fresh = batch.fresh
            self._enforce_holds([out[i] for i in fresh],
                                [[batch.held[k] for k in batch.hold_keys[i] if k in batch.held] for i in fresh])
        return Decisions(out, rewrites, risk)

    def _score_steps(self, users: dict, enc: "_Steps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The detector over every step of the batch (deferred ones too): per step its risk, the
        session average that set its score (0 where the event itself did) and its action code."""
        step_risk, lift = self._step_risk(users, enc)
        return step_risk, lift, self.detector.action_codes(step_risk)

    def _rewrites(self, enc: "_Steps", step_risk: np.ndarray, codes: np.ndarray) -> dict[str, ScoreResult]:
        """Per deferred step that just ran, the real score that replaces its remembered DEGRADED answer."""
        return {ref: ScoreResult("", float(step_risk[g]), ACTIONS[codes[g]], self.model_version, OK,
                                 "scored when its deferred model step ran")
                for g, ref in enc.answered_steps}

    def _scored_answers(self, batch: Batch, step_risk, lift, codes, explain_reasons: bool) -> dict[int, ScoreResult]:
        """Answers of the fresh events the encoder stepped: the model's risk, the rules' action, reasons."""
        rows, enc, fresh, feats = batch.rows, batch.encoded, batch.fresh, batch.feats
        if not rows:
            return {}
        events = [batch.events[fresh[j]] for j in rows]
        final, fired = self._apply_rules(events, feats[rows], enc, step_risk, lift, codes)
        view_rules = self.detector.rules_reasons(
            None if enc.rule_score is None else enc.rule_score[enc.fresh_step],
            feats[rows], batch.type_ids[rows]) if explain_reasons else []
        out = {}
        for k, (j, ev) in enumerate(zip(rows, events)):
            g = int(enc.fresh_step[k])
            st = batch.users[ev.user_id]
            reasons = explain(feats[j], enc.surprise[g], ev.event_id, ev.event_type, st.ring,
                              self.surprise_cut, session_lift=float(lift[g]),
                              view_rules=view_rules[k]) if explain_reasons else []
            self._apply(st, ev, feats[j])
            out[fresh[j]] = ScoreResult(ev.event_id, float(step_risk[g]), ACTIONS[final[k]], self.model_version,
                                        OK, "", reasons, rules=fired[k])
        return out

    def _deferred_answers(self, batch: Batch) -> dict[int, ScoreResult]:
        """Answers of the fresh events whose model step did not run: featurised and applied, the step
        deferred, the fallback answered (DEGRADED)."""
        stepped = set(batch.rows) if batch.encoded is not None else set()
        out = {}
        for j, i in enumerate(batch.fresh):
            if j in stepped:
                continue
            ev = batch.events[i]
            st = batch.users[ev.user_id]
            self._defer(st, int(batch.type_ids[j]), batch.feats[j], self.store.answer_ref(ev.user_id, ev.event_id))
            self._apply(st, ev, batch.feats[j])
            detail = (f"catching up on {len(st.pending)} deferred model steps; event featurised and its step deferred"
                      if ev.user_id in batch.behind else
                      "encoder unavailable; event featurised and its model step deferred")
            out[i] = self._fallback([ev], detail)[0]
        return out

    def _step_risk(self, users, enc: "_Steps") -> tuple[np.ndarray, np.ndarray]:
        """The detector over every step of the batch (deferred ones too). With the session stage
        (stage 2) users are walked step by step in order, so each user's session average sees the
        same events as the offline replay. Returns per step its risk and the session average that
        set its score (0 where the event itself did)."""
        det = self.detector
        X = det.inputs(det.project(enc.emb), enc.surprise, enc.feats, enc.type_ids)
        enc.rule_score = det.rule_scores(X)          # the reasons read it: the pack runs once per batch
        if not det.has_session:
            return det.risk_from_inputs(X, enc.type_ids), np.zeros(len(enc.type_ids))
        a = det.tail_from_inputs(X, enc.type_ids)
        c = np.empty(len(a), np.float64)
        lift = np.zeros(len(a), np.float64)
        session = np.fromiter((users[u].session for u in enc.users), np.float64, len(enc.users))
        for g in enc.waves:                    # step indices, one per user
            u = enc.user_idx[g]
            m_prev = session[u]
            c[g], session[u] = det.session_step(a[g], m_prev)
            lift[g] = np.where(m_prev > a[g], m_prev, 0.0)
        for k, u in enumerate(enc.users):
            users[u].session = float(session[k])
        return det.session_risk(c), lift

    def _apply_rules(self, batch: list[Event], feats: np.ndarray, encoded, step_risk, lift, codes):
        """The rules in force on the model-scored rows (seqguard.rules, the function score-file runs):
        per row the final action code (never below the model's) and the names of the rules that fired.
        The rules object is read once, so a reload lands between batches. Answers without a model
        score (DEGRADED fallbacks, a deferred step's later rewrite) carry no rules: offline replay
        has no counterpart for them, and the fallback setting decides those actions."""
        g = np.asarray(encoded.fresh_step, np.int64)
        rules = self.rules.current
        if rules is None or not len(batch):
            return codes[g], [[] for _ in batch]
        x = RuleInputs(batch, feats, risk=step_risk[g], surprise=encoded.surprise[g], session_lift=lift[g],
                       surprise_cut=self.surprise_cut)
        outcome = rules.evaluate(x, codes[g])
        return outcome.action, outcome.fired_lists()

    @staticmethod
    def _enforce_holds(results: list[ScoreResult], holds_per_event: list[list]) -> None:
        """Every event of a held user, device or IP gets at least the hold's action, DEGRADED answers
        too, with the HOLD reasons first (gateway/holds.py apply_holds is the one rule)."""
        actions, hold_reasons = apply_holds([r.action for r in results], holds_per_event)
        for r, action, reasons in zip(results, actions, hold_reasons):
            if reasons:
                r.action = action
                r.reasons = (reasons + r.reasons)[:MAX_REASONS]

    def _defer(self, st, type_id: int, feats: np.ndarray, ref: str) -> None:
        """Keep an event's model step for later (see MAX_PENDING for the loss rule)."""
        st.pending.append((type_id, feats, ref))
        self.deferred_steps += 1
        if len(st.pending) > self.MAX_PENDING:
            del st.pending[:-self.MAX_PENDING]
            st.h = np.zeros(self.hidden, np.float32)
            st.c = np.zeros(self.hidden, np.float32)
            st.session = 0.0
            self.backlog_resets += 1
        st.dirty = True

    def _apply(self, st, ev: Event, feats=None) -> None:
        st.ring.append(ring_entry(ev.event_id, ev.event_type, ev.ts, feats))
        del st.ring[:-self.store.ring_size]
        st.n += 1
        st.model_version = self.model_version
        st.dirty = True

    # ------------------------------------------------------------------ stage 5: commit
    async def commit(self, batch: Batch, decided: Decisions) -> None:
        """One atomic write (compare-and-set) of the changed users, the entities and the answers to
        remember, with their alerts; then each answer gets its apply sequence number and shadow mode a
        copy. Raises StateConflict (the caller retries); a Redis failure marks the answers DEGRADED."""
        changed = [st for st in batch.users.values() if st.dirty]
        if not changed:
            return
        events, fresh, out = batch.events, batch.fresh, decided.out
        responses = [((events[i].user_id, events[i].event_id), out[i].to_json()) for i in fresh]
        alerts = [self._alert(events[i], out[i]) for i in fresh]
        try:
            last = await self.store.save(changed, batch.read.entities, batch.read.raw_entities,
                                         responses, [(ref, r.to_json()) for ref, r in decided.rewrites.items()],
                                         alerts)
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            self.refused_writes += 1
            for i in fresh:
                r = out[i]
                r.detail = (f"{r.detail}; " if r.detail else "scored, but ") + f"the state update was not saved: {e}"
                r.status = DEGRADED
            return
        for k, i in enumerate(fresh):
            out[i].sequence = last - len(fresh) + k + 1
        enc = batch.encoded
        self.caught_up_steps += enc.caught_up if enc is not None else 0
        if self.shadow is not None and enc is not None and batch.rows:   # applied: hand a copy to shadow mode
            rows = batch.rows
            self.shadow.submit(self, [events[fresh[j]] for j in rows], batch.type_ids[rows], batch.feats[rows],
                               (enc.emb[enc.fresh_step], enc.surprise[enc.fresh_step]), decided.risk)

    def _alert(self, ev: Event, r: ScoreResult) -> str:
        """The alert of an applied decision ("" for none): REVIEW / CHALLENGE / BLOCK from the model or a
        hold. A fallback answer (DEGRADED, no hold) is not a finding about the event, so it raises none."""
        if (r.action == "ALLOW" and not r.rules) or (r.status != OK and not any(x.code == HOLD_REASON
                                                                                for x in r.reasons)):
            return ""
        store = self.store
        record = AlertRecord("0", store.event_pseudonym(ev.event_id), store.user_pseudonym(ev.user_id), r.risk, r.action,
                             tuple(x.code for x in r.reasons), tuple(r.rules), r.model_version, ev.ts, int(time.time() * 1000),
                             ev.user_id if self.alerts_include_raw_ids else None)
        return alert_fields(record.to_fields())

    def _in_request_order(self, batch: Batch, decided: Decisions) -> list[ScoreResult]:
        """One answer per event in request order: its own, the remembered one for an event answered
        before (updated if its deferred step ran in this batch), its twin's for a repeat in the batch."""
        out, rewrites, answered = decided.out, decided.rewrites, batch.read.answered
        results = []
        for i, ev in enumerate(batch.events):
            ref = (ev.user_id, ev.event_id)
            if i in out:
                results.append(out[i])
                continue
            if ref in answered:
                again = rewrites.get(self.store.answer_ref(*ref))
                earlier = ScoreResult.from_json(ev.event_id, answered[ref])
                if again is not None:          # its deferred step ran in this very batch
                    earlier.risk, earlier.action, earlier.status = again.risk, again.action, again.status
                    earlier.model_version, earlier.reasons = again.model_version, []
                    earlier.detail = "duplicate event_id: " + again.detail
                results.append(earlier)
            else:                              # repeated inside this batch
                twin = out[batch.first_of[ref]]
                results.append(ScoreResult(ev.event_id, twin.risk, twin.action, twin.model_version, twin.status,
                                           "duplicate event_id: original result", twin.reasons, twin.sequence,
                                           twin.rules))
        return results

    # ------------------------------------------------------------------ backlogs, off the request path
    def _schedule_catch_up(self, user_id: str) -> None:
        if user_id not in self._catch_up:
            task = asyncio.get_running_loop().create_task(self._drain(user_id), name="catch-up")
            self._catch_up[user_id] = task
            task.add_done_callback(lambda _t, u=user_id: self._catch_up.pop(u, None))

    async def _drain(self, user_id: str, budget_s: float = 30.0) -> None:
        try:
            await self._drain_chunks(user_id, budget_s)
        except Exception:  # noqa: BLE001 - a background task must not die silently
            log.exception("catch-up of a user's deferred steps failed; the next request that finds the "
                          "backlog schedules it again")

    async def _drain_chunks(self, user_id: str, budget_s: float) -> None:
        """Run one user's deferred steps in chunks of CATCH_UP_CHUNK, each its own compare-and-set
        write, until at most MAX_INLINE_CATCHUP remain (the next request takes those) or the
        budget is spent (the next request that finds the backlog schedules another drain)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget_s
        while loop.time() < end:
            try:
                users = (await self.store.load([user_id], [])).users
                st = users[user_id]
                if len(st.pending) <= self.MAX_INLINE_CATCHUP:
                    return
                rest, st.pending = st.pending[self.CATCH_UP_CHUNK:], st.pending[:self.CATCH_UP_CHUNK]
                encoded = await self._encode([], [], {user_id: st}, None, None, lambda: end - loop.time())
                if encoded is None:
                    await asyncio.sleep(0.5)       # the encoder is still down: try again shortly
                    continue
                st.pending = rest
                step_risk, _, codes = self._score_steps(users, encoded)
                rewrites = self._rewrites(encoded, step_risk, codes)
                await self.store.save([st], {}, {}, [], [(ref, r.to_json()) for ref, r in rewrites.items()])
                self.caught_up_steps += encoded.caught_up
            except StateConflict:
                self.conflicts += 1                # the user's own events arrived: read again
            except StateUnavailable as e:
                log.warning("catch-up of a user's deferred steps paused: %s", e)
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        for task in list(self._catch_up.values()):
            await cancel_and_wait(task)


def _time_left(deadline: float | None) -> Callable[[], float | None]:
    """Seconds left until a loop-time deadline, asked at each encoder call (None: no deadline)."""
    if deadline is None:
        return lambda: None
    loop = asyncio.get_running_loop()
    return lambda: deadline - loop.time()


@dataclass
class _Steps:
    """Every LSTM step of one batch (deferred and fresh), each user's steps one after the other."""
    type_ids: np.ndarray
    feats: np.ndarray
    emb: np.ndarray
    surprise: np.ndarray
    users: list[str]                                    # the users stepped, in layout order
    user_idx: np.ndarray                                # per step, its user's position in `users`
    waves: list = field(default_factory=list)           # [step indices of the k-th step of each user, ...]
    fresh_step: np.ndarray = None                       # per encoded fresh row, its step index
    answered_steps: list = field(default_factory=list)  # [(step index, answer key)] of deferred events
    caught_up: int = 0                                  # deferred steps among them
    rule_score: np.ndarray | None = None                # per step the rules view's score (detect stage), for reasons
