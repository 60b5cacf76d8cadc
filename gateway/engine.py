"""The online scoring pipeline for a batch of events (one coalesced window of requests).

    Redis (1 round trip: users + entities) -> shared featuriser, in arrival order
    -> Triton step encoder (1 request per "wave": the k-th event of each user in the batch)
    -> detector (one vectorised call) -> rules (one vectorised call) -> reasons -> Redis (1 round trip)
    -> results

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
import time
from dataclasses import dataclass, field

import numpy as np

from seqguard.artifact import ModelArtifact
from seqguard.detector import ACTIONS
from seqguard.explain import Reason, explain
from seqguard.rules import RuleInputs
from seqguard.schema import Event

from .aio import cancel_and_wait
from .alerts import AlertRecord
from .holds import HOLD_REASON, HoldStore, apply_holds
from .reload import LiveRules
from .state import (NO_ANSWER, RedisStateStore, StateConflict, StateUnavailable, alert_fields, ring_entry,
                    unpack_features)
from .triton_client import EncoderUnavailable, TritonStepClient

log = logging.getLogger("seqguard.gateway")

OK, DEGRADED = "OK", "DEGRADED"
MAX_REASONS = 3              # reason codes per answer, strongest first (README, "The gRPC API")
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
    rules: list[str] = field(default_factory=list)   # names of the rules that fired (settings.rules_path)

    def to_json(self) -> str:
        """What the idempotency window remembers ("seq":0 is filled in by the atomic write). The
        reasons' event ids are left out: no raw caller identifier is stored in Redis in the clear
        (the ring, which names them, is sealed: gateway/state.py RingCipher)."""
        d = {"risk": self.risk, "action": self.action, "mv": self.model_version,
             "reasons": [[r.code, r.message, r.weight, []] for r in self.reasons],
             "st": self.status, "seq": 0}
        if self.rules:
            d["rules"] = self.rules
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, event_id: str, d: dict) -> "ScoreResult":
        return cls(event_id, d["risk"], d["action"], d["mv"], d.get("st", OK), "duplicate event_id: original result",
                   [Reason(*r) for r in d["reasons"]], d["seq"], list(d.get("rules", ())))


class ScoringEngine:
    MAX_ROWS = 1024          # Triton's max_batch_size for the step model
    MAX_ATTEMPTS = 64        # compare-and-set retries when another gateway wrote the same state
    # Deferred LSTM steps (encoder unavailable). Up to MAX_INLINE_CATCHUP of a user's deferred steps
    # run inside the next batch that touches the user (one encoder call per step, in waves); a deeper
    # backlog would not fit a request's deadline, so it is drained off the request path in chunks of
    # CATCH_UP_CHUNK steps while the user's new events are deferred behind it. Beyond MAX_PENDING the
    # loss rule applies: h, c and the session average restart from zero with the newest MAX_PENDING
    # steps, exactly as a rebuild does (an offline replay of those steps from zero gives the same
    # scores), which bounds a user's record (~190 B per step).
    MAX_INLINE_CATCHUP = 32
    CATCH_UP_CHUNK = 256
    MAX_PENDING = 256
    shadow = None            # gateway.shadow.ShadowScorer when settings.shadow_model_dir is set

    def __init__(self, artifact: ModelArtifact, store: RedisStateStore, encoder: TritonStepClient,
                 fallback: str = "fail_open", holds: HoldStore | None = None, alerts_include_raw_ids: bool = False,
                 rules: LiveRules | None = None):
        self.artifact = artifact
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
        return self.degraded(events, f"state kept changing under {self.MAX_ATTEMPTS} attempts; not applied")

    async def _attempt(self, events: list[Event], deadline: float | None, explain_reasons: bool) -> list[ScoreResult]:
        loop = asyncio.get_running_loop()
        remaining = lambda: None if deadline is None else deadline - loop.time()  # noqa: E731
        store = self.store

        # 1. one read: every user, entity, (user, event id) and hold this batch touches
        ent_keys = [store.entity_keys(e) for e in events]
        uniq_ent = list(dict.fromkeys(k for ks in ent_keys for k in ks if k))
        hold_keys = [self.holds.keys_for(e) for e in events] if self.holds else [[] for _ in events]
        uniq_holds = list(dict.fromkeys(k for ks in hold_keys for k in ks))
        try:
            read = await store.load(list(dict.fromkeys(e.user_id for e in events)), uniq_ent,
                                    list(dict.fromkeys((e.user_id, e.event_id) for e in events)), uniq_holds)
        except StateUnavailable as e:
            log.warning("degraded: %s", e)
            return self.degraded(events, f"state store unavailable: {e}")
        users, entities, raw_entities, answered = read.users, read.entities, read.raw_entities, read.answered
        held = self.holds.parse(uniq_holds, read.extra) if self.holds else {}
        for st in users.values():
            if st.existed and (st.model_version != self.model_version or st.h.shape[0] != self.hidden):
                self._rebuild(st)
        fresh, first_of = self._dedupe(events, answered)

        # 2. featurise in arrival order (mutates the in-memory contexts)
        type_ids, feats = self._featurise([events[i] for i in fresh], ent_keys, fresh, users, entities)

        # 3. the encoder: each user's deferred steps first, then this batch's events, in waves. A user
        # with a deep backlog is left out: its new events queue behind the backlog (the catch-up task)
        behind = {u for u, st in users.items() if len(st.pending) > self.MAX_INLINE_CATCHUP}
        stepped = {u: st for u, st in users.items() if u not in behind}
        rows = [j for j, i in enumerate(fresh) if events[i].user_id not in behind]
        encoded = None
        if rows or any(st.pending for st in stepped.values()):
            encoded = await self._encode([events[fresh[j]].user_id for j in rows], rows, stepped,
                                         type_ids, feats, remaining)
        out, rewrites, risk = self._answers(events, fresh, users, type_ids, feats, rows, encoded, behind,
                                            explain_reasons)
        for u in behind:
            self._schedule_catch_up(u)
        if held:
            self._enforce_holds([out[i] for i in fresh], [[held[k] for k in hold_keys[i] if k in held] for i in fresh])

        # 4. one atomic write (compare-and-set) of users, entities and the answers to remember
        changed = [st for st in users.values() if st.dirty]
        if changed:
            responses = [((events[i].user_id, events[i].event_id), out[i].to_json()) for i in fresh]
            alerts = [self._alert(events[i], out[i]) for i in fresh]
            try:
                last = await store.save(changed, {k: entities[k] for k in uniq_ent}, raw_entities, responses,
                                        [(ref, r.to_json()) for ref, r in rewrites.items()], alerts)
            except StateUnavailable as e:
                log.warning("degraded: %s", e)
                self.refused_writes += 1
                for i in fresh:
                    r = out[i]
                    r.detail = (f"{r.detail}; " if r.detail else "scored, but ") + f"the state update was not saved: {e}"
                    r.status = DEGRADED
            else:
                for k, i in enumerate(fresh):
                    out[i].sequence = last - len(fresh) + k + 1
                self.caught_up_steps += encoded.caught_up if encoded is not None else 0
                if self.shadow is not None and encoded is not None and rows:   # applied: hand a copy to shadow mode
                    self.shadow.submit(self, [events[fresh[j]] for j in rows], type_ids[rows], feats[rows],
                                       (encoded.emb[encoded.fresh_step], encoded.surprise[encoded.fresh_step]),
                                       risk)
        return self._in_request_order(events, out, answered, rewrites, first_of)

    @staticmethod
    def _enforce_holds(results: list[ScoreResult], holds_per_event: list[list]) -> None:
        """Every event of a held user, device or IP gets at least the hold's action, DEGRADED answers
        too, with the HOLD reasons first (gateway/holds.py apply_holds is the one rule)."""
        actions, hold_reasons = apply_holds([r.action for r in results], holds_per_event)
        for r, action, reasons in zip(results, actions, hold_reasons):
            if reasons:
                r.action = action
                r.reasons = (reasons + r.reasons)[:MAX_REASONS]

    def _alert(self, ev: Event, r: ScoreResult) -> str:
        """The alert of an applied decision ("" for none): REVIEW / CHALLENGE / BLOCK from the model or a
        hold. A fallback answer (DEGRADED, no hold) is not a finding about the event, so it raises none."""
        if (r.action == "ALLOW" and not r.rules) or (r.status != OK and not any(x.code == HOLD_REASON
                                                                                for x in r.reasons)):
            return ""
        p = self.store.p
        record = AlertRecord("0", p("event", ev.event_id), p("user", ev.user_id), r.risk, r.action,
                             tuple(x.code for x in r.reasons), tuple(r.rules), r.model_version, ev.ts, int(time.time() * 1000),
                             ev.user_id if self.alerts_include_raw_ids else None)
        return alert_fields(record.to_fields())

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

    def _featurise(self, batch: list[Event], ent_keys: list, fresh: list[int], users: dict, entities: dict):
        """(type ids, feature rows) of the batch's fresh events in arrival order: one call of the compiled
        featuriser kernel, which updates the user and entity contexts in place."""
        if not batch:
            return np.empty(0, np.int64), np.empty((0, self.n_features), np.float32)
        ents = [tuple(entities.get(k) if k else None for k in ent_keys[i]) for i in fresh]
        return self.featurizer.featurize_batch(batch, [users[ev.user_id].ctx for ev in batch], ents)

    def _answers(self, events, fresh, users, type_ids, feats, rows, encoded, behind, explain_reasons):
        """Per applied event its answer; per deferred step that just ran, the real score that replaces
        its remembered DEGRADED answer (by answer key); and the risk of the encoded rows."""
        out: dict[int, ScoreResult] = {}
        rewrites: dict[str, ScoreResult] = {}
        risk = np.zeros(0)
        if encoded is not None:
            step_risk, lift = self._step_risk(users, encoded)
            risk = step_risk[encoded.fresh_step]
            codes = self.detector.action_codes(step_risk)
            for g, ref in encoded.answered_steps:
                rewrites[ref] = ScoreResult("", float(step_risk[g]), ACTIONS[codes[g]], self.model_version, OK,
                                            "scored when its deferred model step ran")
            final, fired = (self._apply_rules([events[fresh[j]] for j in rows], feats[rows], encoded, step_risk,
                                              lift, codes) if rows else ([], []))
            view_rules = self.detector.rules_reasons(feats[rows], type_ids[rows]) if explain_reasons and rows else []
            for k, j in enumerate(rows):
                ev, g = events[fresh[j]], int(encoded.fresh_step[k])
                st = users[ev.user_id]
                reasons = explain(feats[j], encoded.surprise[g], ev.event_id, ev.event_type, st.ring,
                                  self.surprise_cut, session_lift=float(lift[g]),
                                  view_rules=view_rules[k]) if explain_reasons else []
                self._apply(st, ev, feats[j])
                out[fresh[j]] = ScoreResult(ev.event_id, float(step_risk[g]), ACTIONS[final[k]], self.model_version,
                                            OK, "", reasons, rules=fired[k])
        encoded_rows = set(rows) if encoded is not None else set()
        for j, i in enumerate(fresh):
            if j in encoded_rows:
                continue
            ev = events[i]
            st = users[ev.user_id]
            self._defer(st, int(type_ids[j]), feats[j], self.store.answer_ref(ev.user_id, ev.event_id))
            self._apply(st, ev, feats[j])
            detail = (f"catching up on {len(st.pending)} deferred model steps; event featurised and its step deferred"
                      if ev.user_id in behind else "encoder unavailable; event featurised and its model step deferred")
            out[i] = self.degraded([ev], detail)[0]
        return out, rewrites, risk

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

    def _in_request_order(self, events, out, answered, rewrites, first_of) -> list[ScoreResult]:
        results = []
        for i, ev in enumerate(events):
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
                twin = out[first_of[ref]]
                results.append(ScoreResult(ev.event_id, twin.risk, twin.action, twin.model_version, twin.status,
                                           "duplicate event_id: original result", twin.reasons, twin.sequence,
                                           twin.rules))
        return results

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

    def _apply(self, st, ev: Event, feats=None) -> None:
        st.ring.append(ring_entry(ev.event_id, ev.event_type, ev.ts, feats))
        del st.ring[:-self.store.ring_size]
        st.n += 1
        st.model_version = self.model_version
        st.dirty = True

    def _step_risk(self, users, enc: "_Steps") -> tuple[np.ndarray, np.ndarray]:
        """The detector over every step of the batch (deferred ones too). With the session stage
        (stage 2) users are walked step by step in order, so each user's session average sees the
        same events as the offline replay. Returns per step its risk and the session average that
        set its score (0 where the event itself did)."""
        det = self.detector
        if not det.has_session:
            return det.risk(enc.emb, enc.surprise, enc.feats, enc.type_ids), np.zeros(len(enc.type_ids))
        a = det.event_tail(enc.emb, enc.surprise, enc.feats, enc.type_ids)
        c = np.empty(len(a), np.float64)
        lift = np.zeros(len(a), np.float64)
        for wave in enc.waves:                 # [(user, step index), ...]
            g = np.fromiter((s for _, s in wave), np.int64, len(wave))
            sts = [users[u] for u, _ in wave]
            m_prev = np.fromiter((st.session for st in sts), np.float64, len(wave))
            cw, m_new = det.session_step(a[g], m_prev)
            c[g] = cw
            lift[g] = np.where(m_prev > a[g], m_prev, 0.0)
            for k, st in enumerate(sts):
                st.session = float(m_new[k])
        return det.session_risk(c), lift

    async def _encode(self, row_users: list[str], rows: list[int], users: dict, type_ids, feats, remaining):
        """Run the given users' deferred steps, then the given fresh rows, through the encoder in waves
        (the k-th step of every user at once). None if the encoder is unavailable: then nothing moved."""
        seqs: dict[str, list] = {u: list(st.pending) for u, st in users.items() if st.pending}
        for u, j in zip(row_users, rows):
            seqs.setdefault(u, []).append(j)
        total = sum(len(v) for v in seqs.values())
        steps = _Steps(np.empty(total, np.int64), np.empty((total, self.n_features), np.float32),
                       np.empty((total, self.hidden), np.float32), np.empty((total, 2), np.float32))
        fresh_step = {}
        index: dict[str, list] = {}            # per user: its step indices in order
        g = 0
        for u, seq in seqs.items():
            index[u] = []
            for s in seq:
                if isinstance(s, int):
                    steps.type_ids[g], steps.feats[g] = type_ids[s], feats[s]
                    fresh_step[s] = g
                else:
                    steps.type_ids[g], steps.feats[g] = s[0], s[1]
                    if s[2]:
                        steps.answered_steps.append((g, s[2]))
                    steps.caught_up += 1
                index[u].append(g)
                g += 1
        steps.waves = [[(u, ix[w]) for u, ix in index.items() if w < len(ix)]
                       for w in range(max((len(v) for v in index.values()), default=0))]
        steps.fresh_step = np.fromiter((fresh_step[j] for j in rows), np.int64, len(rows))
        read_state = {u: (users[u].h, users[u].c) for u in seqs}
        try:
            for wave in steps.waves:
                await self._step_wave(wave, steps, users, remaining)
        except EncoderUnavailable as e:
            log.warning("degraded: %s", e)
            for u, (h, c) in read_state.items():   # undo steps of earlier waves: all of them stay deferred
                users[u].h, users[u].c = h, c
            return None
        for u in seqs:
            st = users[u]
            if st.pending:
                st.pending = []
                st.dirty = True                    # its deferred steps ran: h, c moved on
        return steps

    async def _step_wave(self, wave: list, steps: "_Steps", users: dict, remaining) -> None:
        for a in range(0, len(wave), self.MAX_ROWS):
            chunk = wave[a:a + self.MAX_ROWS]
            rows = np.fromiter((s for _, s in chunk), np.int64, len(chunk))
            sts = [users[u] for u, _ in chunk]
            left = remaining()
            if left is not None and left <= 0:
                raise EncoderUnavailable("deadline exceeded before the encoder call")
            h2, c2, e2, s2 = await self.encoder.step(steps.type_ids[rows], steps.feats[rows, :self.encoder_features],
                                                     np.stack([s.h for s in sts]), np.stack([s.c for s in sts]),
                                                     timeout_s=left)
            for k, st in enumerate(sts):
                st.h, st.c = h2[k], c2[k]
            steps.emb[rows], steps.surprise[rows] = e2, s2

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
                _, rewrites, _ = self._answers([], [], users, None, None, [], encoded, set(), False)
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


@dataclass
class _Steps:
    """Every LSTM step of one batch (deferred and fresh), in the order they were indexed."""
    type_ids: np.ndarray
    feats: np.ndarray
    emb: np.ndarray
    surprise: np.ndarray
    waves: list = field(default_factory=list)           # [[(user, step index), ...], ...]
    fresh_step: np.ndarray = None                       # per encoded fresh row, its step index
    answered_steps: list = field(default_factory=list)  # [(step index, answer key)] of deferred events
    caught_up: int = 0                                  # deferred steps among them


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
        await self.engine.stop()

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
