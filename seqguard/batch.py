"""Offline scoring of whole event logs with the exact arithmetic of the online gateway.

Events are replayed in global (ts, file position) order through the shared featuriser
(cross-user entity counters need global order), then every user's history runs through the
exported step model, all users in lock-step batches, then the detector.

Two ways: `score_events` holds the whole log (any order); `StreamScorer` takes a log that is
already in time order chunk by chunk and carries only per-user and per-entity state between
chunks (featuriser contexts, the step model's h and c, the session average), so its memory
grows with users and entities, not with events. Both give the same bits (test_score_stream.py).
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .artifact import ModelArtifact
from .detector import ACTIONS
from .encoding import OrtStep, encode_sequences
from .featurizer import ContextStore, Featurizer, TokenHasher, Vocabulary, featurize_log
from .rules import RuleInputs, RuleOutcome, RuleSet
from .schema import Event


@dataclass
class EncodedLog:
    """Everything the detector needs, per event, in replay order."""
    order: np.ndarray          # replay position -> index in the input list
    user_idx: np.ndarray       # dense user index per replayed event
    users: list                # dense index -> user_id
    type_ids: np.ndarray
    feats: np.ndarray
    emb: np.ndarray            # projected embedding (or the full one when no projection)
    surprise: np.ndarray


def one_blas_thread():
    """A context in which numpy's BLAS (OpenBLAS) runs on the calling thread only.

    Batch scoring calls BLAS for small products (the detector's projection of each lock-step wave,
    ~100 rows x 128 x 64): OpenBLAS splits those over its threads, which then spin waiting for the
    next call while ONNX Runtime, the forest threads and the log reader want the same cores
    (score-file on 2 cores: 4 s of its 38 s CPU was system time, most of it these threads).
    OpenBLAS splits a product by rows and columns of the result, never along the summed dimension,
    so every number is the same on one thread (score-file's CSV is byte-identical)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                     # (installed with scikit-learn)
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def dense_user_index(events: list[Event], order: np.ndarray) -> tuple[np.ndarray, list]:
    index: dict[str, int] = {}
    out = np.empty(len(order), np.int64)
    for k, i in enumerate(order):
        u = events[i].user_id
        j = index.get(u)
        if j is None:
            j = index[u] = len(index)
        out[k] = j
    return out, list(index)


def encode_log(artifact_or_featurizer, events: list[Event], onnx_path=None, reduce=None,
               progress: bool = False, threads: int = 0, order=None) -> EncodedLog:
    if isinstance(artifact_or_featurizer, ModelArtifact):
        featurizer = artifact_or_featurizer.featurizer
        onnx_path = onnx_path or artifact_or_featurizer.onnx_path
    else:
        featurizer = artifact_or_featurizer
    order, type_ids, feats = featurize_log(featurizer, events, ContextStore(), progress=progress, order=order)
    user_idx, users = dense_user_index(events, order)
    step = OrtStep(str(onnx_path), threads=threads)
    emb, surprise, _, _ = encode_sequences(step, user_idx, type_ids, feats, len(users), reduce=reduce,
                                           progress=progress)
    return EncodedLog(order, user_idx, users, type_ids, feats, emb, surprise)


def score_events(artifact: ModelArtifact, events: list[Event], progress: bool = False,
                 chunk: int = 8192, order=None) -> tuple[np.ndarray, np.ndarray, EncodedLog]:
    """Risk and action code right after each event, in INPUT order (replayed in `order` if given).

    `chunk`: rows per detector call. The flattened forest walks rows x trees index arrays per
    level; 8192 rows keep them in cache (larger chunks are slower; per-row results are
    independent of the chunking, so the output is identical).
    """
    det = artifact.detector
    enc = encode_log(artifact, events, reduce=det.project, progress=progress, order=order)
    risk_replay = detector_risk(det, enc.emb, enc.surprise, enc.feats, enc.type_ids, chunk,
                                user_idx=enc.user_idx, n_users=len(enc.users))
    risk = np.empty_like(risk_replay)
    risk[enc.order] = risk_replay
    return risk, det.action_codes(risk), enc


def stage1_scores(det, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray, type_ids: np.ndarray,
                  tail: bool = False, chunk: int = 8192) -> np.ndarray:
    """Detector stage 1 per row (emb already projected): the group quantile, or with `tail` its
    -log(1 - q) scale. `chunk` rows per detector call (rows are independent: any chunking gives the
    same bits)."""
    score = det.tail_from_inputs if tail else det.risk_from_inputs
    out = np.empty(len(type_ids), np.float64)
    for a in range(0, len(type_ids), chunk):
        sl = slice(a, a + chunk)
        out[sl] = score(det.inputs(emb[sl], surprise[sl], feats[sl], type_ids[sl]), type_ids[sl])
    return out


def detector_risk(det, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray, type_ids: np.ndarray,
                  chunk: int = 8192, user_idx: np.ndarray | None = None, n_users: int = 0) -> np.ndarray:
    """Risk per row of a replayed log (emb already projected), as the gateway serves it.

    With a session stage, `user_idx` (dense user per row, each user's rows in order) is required:
    every user's session average starts at zero at the log's first event.
    """
    return detector_risk_and_lift(det, emb, surprise, feats, type_ids, chunk, user_idx, n_users)[0]


def detector_risk_and_lift(det, emb: np.ndarray, surprise: np.ndarray, feats: np.ndarray, type_ids: np.ndarray,
                           chunk: int = 8192, user_idx: np.ndarray | None = None,
                           n_users: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`detector_risk` and, per row, the session average that set the score (0 where the event
    itself did): the gateway's `session_lift`, which the RISKY_SESSION reason reads."""
    if not det.has_session:
        return stage1_scores(det, emb, surprise, feats, type_ids, chunk=chunk), np.zeros(len(type_ids))
    if user_idx is None:
        raise ValueError("this detector has a session stage: detector_risk needs user_idx")
    a = stage1_scores(det, emb, surprise, feats, type_ids, tail=True, chunk=chunk)
    c, _ = det.session_scan(a, user_idx, n_users or (int(np.max(user_idx)) + 1 if len(a) else 0))
    # c = max(a, m_prev): where the session average is strictly larger it set the score
    return det.session_risk(c), np.where(c > a, c, 0.0)


def surprise_cut(artifact: ModelArtifact) -> float:
    """The encoder surprise that counts as an unusual sequence (its training 99.9th percentile)."""
    return float(artifact.metadata.get("training", {}).get("surprise_p999", 8.0))


def _to_input_order(order: np.ndarray, replayed: np.ndarray) -> np.ndarray:
    out = np.empty_like(replayed)
    out[order] = replayed
    return out


def model_rule_inputs(artifact: ModelArtifact, events: list[Event], progress: bool = False,
                      chunk: int = 8192) -> tuple[RuleInputs, np.ndarray]:
    """The whole log through the model, as rule inputs (INPUT order), and the model's action codes.

    The rules see what the gateway gives them: the featuriser row, the risk, the encoder surprise
    and the session lift of the same replay; the model's action is the floor of the final action.
    """
    det = artifact.detector
    enc = encode_log(artifact, events, reduce=det.project, progress=progress)
    risk_r, lift_r = detector_risk_and_lift(det, enc.emb, enc.surprise, enc.feats, enc.type_ids, chunk,
                                            user_idx=enc.user_idx, n_users=len(enc.users))
    risk = _to_input_order(enc.order, risk_r)
    x = RuleInputs(events, _to_input_order(enc.order, enc.feats), risk=risk,
                   surprise=_to_input_order(enc.order, enc.surprise), session_lift=_to_input_order(enc.order, lift_r),
                   surprise_cut=surprise_cut(artifact))
    return x, det.action_codes(risk)


def rule_inputs_from_encoded(artifact: ModelArtifact, events: list[Event], enc: EncodedLog, risk: np.ndarray,
                             rules: RuleSet, chunk: int = 8192) -> RuleInputs:
    """Rule inputs from a log `score_events` already encoded (`risk` in input order). The session
    lift costs a second detector pass, so it is computed only when a rule reads RISKY_SESSION."""
    det = artifact.detector
    lift = None
    if "RISKY_SESSION" in rules.reason_codes:
        _, lift_r = detector_risk_and_lift(det, enc.emb, enc.surprise, enc.feats, enc.type_ids, chunk,
                                           user_idx=enc.user_idx, n_users=len(enc.users))
        lift = _to_input_order(enc.order, lift_r)
    return RuleInputs(events, _to_input_order(enc.order, enc.feats), risk=risk,
                      surprise=_to_input_order(enc.order, enc.surprise), session_lift=lift,
                      surprise_cut=surprise_cut(artifact))


def score_events_with_rules(artifact: ModelArtifact, events: list[Event], rules: RuleSet, progress: bool = False,
                            chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, RuleOutcome]:
    """`score_events` plus the rules on every event, INPUT order: (risk, model action codes, rule outcome)."""
    x, actions = model_rule_inputs(artifact, events, progress, chunk)
    return x.risk, actions, rules.evaluate(x, actions)


def featurize_for_rules(events: list[Event], progress: bool = False) -> RuleInputs:
    """Featuriser rows for model-free rules (no artifact needed): the vocabulary is learned from
    the log itself, which changes type ids only, never a feature value."""
    featurizer = Featurizer(Vocabulary.learn((e.event_type for e in events), 1), TokenHasher())
    order, _, feats = featurize_log(featurizer, events, ContextStore(), progress=progress)
    return RuleInputs(events, _to_input_order(order, feats))


def write_scores_csv(path: str, events: list[Event], risk: np.ndarray, actions: np.ndarray,
                     model_version: str, rules: RuleOutcome | None = None, rules_version: str = "",
                     holds: tuple[list[str], list[str]] | None = None) -> None:
    """One row per event. With `rules`, four columns more: the summed rule score, the rules that
    fired (";"-joined), the final action (never below `action`, the model's) and the rules version.
    With `holds` (per event: the final action after the holds, and the holds' actions ";"-joined),
    the final action is that one and a `holds` column follows."""
    tmp = f"{path}.tmp"
    head = ["event_id", "user_id", "risk", "action", "model_version"]
    n = len(events)
    final = (holds[0] if holds is not None else
             [ACTIONS[a] for a in rules.action.tolist()] if rules is not None else None)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head + (["rule_score", "rules_fired"] if rules is not None else [])
                   + (["final_action"] if final is not None else [])
                   + (["rules_version"] if rules is not None else []) + (["holds"] if holds is not None else []))
        scores = rules.score.tolist() if rules is not None else [0.0] * n
        fired = rules.fired_lists() if rules is not None else [()] * n
        for k, (ev, r, a) in enumerate(zip(events, risk.tolist(), actions.tolist())):
            row = [ev.event_id, ev.user_id, f"{r:.8f}", ACTIONS[a], model_version]
            if rules is not None:
                row += [f"{scores[k]:g}", ";".join(fired[k])]
            if final is not None:
                row.append(final[k])
            if rules is not None:
                row.append(rules_version)
            if holds is not None:
                row.append(holds[1][k])
            w.writerow(row)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- streaming

class NotInTimeOrder(ValueError):
    """A streamed log went back in time: it cannot be replayed chunk by chunk (score it whole)."""

    def __init__(self, position: int, ts: int, previous: int):
        super().__init__(f"event {position} (ts {ts}) is earlier than an event before it (ts {previous})")
        self.position = position


class StreamScorer:
    """Scores a time-ordered log chunk by chunk with the bits of `score_events` on the whole log.

    Replay order is (ts, position); a log whose timestamps never decrease is already in it, so
    each chunk is featurised, encoded and judged as it comes, and only per-user / per-entity
    state survives between chunks. A decreasing timestamp raises NotInTimeOrder before anything
    of that chunk is scored (the caller falls back to `score_events`).
    """

    def __init__(self, artifact: ModelArtifact, threads: int = 0, max_batch: int = 8192):
        self.det = artifact.detector
        self.featurizer = artifact.featurizer
        self.step = OrtStep(str(artifact.onnx_path), threads=threads)
        self.max_batch = max_batch          # rows per step-model call, as encode_sequences
        self.contexts = ContextStore()
        self.user_index: dict[str, int] = {}   # user_id -> row of h, c, session_avg (as dense_user_index: by id)
        H = self.step.hidden
        self.h = np.zeros((1024, H), np.float32)
        self.c = np.zeros((1024, H), np.float32)
        self.session_avg = np.zeros(1024, np.float64)   # the session stage's running average m per user
        self.last_ts = -1
        self.seen = 0

    def score(self, events: list[Event]) -> tuple[np.ndarray, np.ndarray]:
        """(risk float64, action code int8) right after each event of the next chunk, in its order."""
        ev = self.featurizer.event_arrays(events)
        self._check_order(ev.ts)
        feats = self.contexts.featurize(ev)
        idx = self._user_rows(events)
        users, local = np.unique(idx, return_inverse=True)
        emb, surprise = self._encode(users, local, ev.type_id, feats)
        det = self.det
        if det.has_session:
            a = stage1_scores(det, emb, surprise, feats, ev.type_id, tail=True)
            c, self.session_avg[users] = det.session_scan(a, local, len(users), m0=self.session_avg[users])
            risk = det.session_risk(c)
        else:
            risk = stage1_scores(det, emb, surprise, feats, ev.type_id)
        self.seen += len(events)
        return risk, det.action_codes(risk)

    def _check_order(self, ts: np.ndarray) -> None:
        if not len(ts):
            return
        prev = np.maximum.accumulate(np.concatenate([[self.last_ts], ts]))[:-1]
        back = np.flatnonzero(ts < prev)
        if len(back):
            k = int(back[0])
            raise NotInTimeOrder(self.seen + k, int(ts[k]), int(prev[k]))
        self.last_ts = int(ts[-1])

    def _user_rows(self, events: list[Event]) -> np.ndarray:
        index = self.user_index
        idx = np.fromiter((index.setdefault(e.user_id, len(index)) for e in events), np.int64, len(events))
        if len(index) > len(self.session_avg):             # grow the per-user rows (new users start at zero)
            n = max(2 * len(self.session_avg), len(index))
            for name in ("h", "c", "session_avg"):
                old = getattr(self, name)
                new = np.zeros((n,) + old.shape[1:], old.dtype)
                new[:len(old)] = old
                setattr(self, name, new)
        return idx

    def _encode(self, users: np.ndarray, local: np.ndarray, type_ids: np.ndarray, feats: np.ndarray):
        """The chunk's events through the step model from each user's carried (h, c), all users in
        lock-step (per-row bits do not depend on the batch: encoding.py)."""
        kept, surprise, self.h[users], self.c[users] = encode_sequences(
            self.step, local, type_ids, feats, len(users), reduce=self.det.project, max_batch=self.max_batch,
            h0=self.h[users], c0=self.c[users])
        return kept, surprise


def chunks_of(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for ev in events:
        chunk.append(ev)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefetched(chunks: Iterator[list[Event]], depth: int = 1, poll_s: float = 0.1) -> Iterator[list[Event]]:
    """`chunks`, read by a background thread at most `depth` chunks ahead: parsing the log (Python,
    holds the GIL) overlaps the step model and detector (ONNX Runtime, releases it). A reader error
    is raised here, in order; when the consumer stops early the reader stops too."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=poll_s)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(done)
        except BaseException as e:          # noqa: BLE001  (re-raised in the consumer)
            put(e)

    t = threading.Thread(target=read, name="score-file-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=30)


def stream_scores_csv(artifact: ModelArtifact, events: Iterable[Event], path: str, chunk_events: int = 65536,
                      progress: bool = False) -> int:
    """Score a time-ordered event stream chunk by chunk into the CSV `write_scores_csv` writes (same
    bytes); memory is bounded by the chunk and the number of users/entities. Returns events scored.
    Raises NotInTimeOrder (nothing left at `path`) if the stream goes back in time."""
    # one ONNX Runtime thread for the step model: a chunk's lock-step waves are small (~100 rows), so
    # intra-op threads mostly spin, and the reader thread and the forest use the other core
    # (per-row bits do not depend on the thread count, so the bytes are the same)
    scorer = StreamScorer(artifact, threads=1)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="score", unit="ev", mininterval=1.0, leave=False)
    tmp = f"{path}.tmp"
    try:
        with one_blas_thread(), open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["event_id", "user_id", "risk", "action", "model_version"])
            mv = artifact.model_version
            for chunk in prefetched(chunks_of(events, chunk_events)):
                risk, actions = scorer.score(chunk)
                w.writerows([ev.event_id, ev.user_id, f"{r:.8f}", ACTIONS[a], mv]
                             for ev, r, a in zip(chunk, risk.tolist(), actions.tolist()))
                if bar is not None:
                    bar.update(len(chunk))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    os.replace(tmp, path)
    return scorer.seen
