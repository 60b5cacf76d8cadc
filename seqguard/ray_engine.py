"""`seqguard score-file --engine ray`: the same batch scoring, spread over a Ray cluster.

Why two passes. A user's features need the user's own events in order (partition by user), but
the cross-user entity counters (accounts / failures per device, IP and IP prefix) need every
user's events on that entity in global (ts, position) order. The kernel's `touch_entity` depends
only on the entity's own events plus two per-event flags (is this the user's first event, is it
a failed login), so:

  pass 0  tokenise chunks of the log in parallel (the keyed hashes everything is grouped by)
          and shuffle each chunk's events into user partitions inside Ray's object store;
  pass 1  partition (device | IP | prefix) events by entity hash; each task replays its
          entities in global order with the SAME compiled kernel (`featurize_kernel.touch_entities`)
          and returns per-event values, which the driver joins back onto the events (a windowed
          aggregation by key);
  pass 2  partition events by user hash; each task runs the user half of the same kernel
          (`featurize_kernel.featurize_users`) with the joined entity values, the ONNX step model
          and the detector for its users, and returns the risk per event.

Every number is produced by the functions the single-machine path calls, so the CSV is
identical to `--engine local` (tests/test_ray_engine.py checks it byte for byte). Partitions
are keyed by the featuriser's own 32-bit token hashes, so even hash-colliding identifiers group
exactly as in the sequential replay. Ray is imported only here, only for `--engine ray`.

Limits: the driver still reads the whole log and writes the CSV (it holds O(events) arrays);
the nodes of a remote cluster must run the same seqguard install (same container image). The
model files travel through Ray's object store, so no shared filesystem is needed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import DETECTOR_FILE, METADATA, ONNX_FILE, ModelArtifact
from . import featurize_kernel as K
from .featurizer import ENTITY_KINDS, N_ENTITY_FEATURES, N_FEATURES, Featurizer
from .schema import Event

N_ENTITY = N_ENTITY_FEATURES          # 9 cross-user features


def _entity_columns() -> tuple:
    """(kind, picks of touch_entity's outputs, columns of the 9 entity features) per entity kind."""
    cols = tuple((kind, picks, list(columns)) for kind, picks, columns in ENTITY_KINDS)
    assert sorted(c for _, _, cs in cols for c in cs) == list(range(N_ENTITY))
    return cols


_ENTITY_COLS = _entity_columns()


class RayUnavailable(RuntimeError):
    """--engine ray was asked for but Ray is not installed (it is the optional `scale` extra)."""


@dataclass
class RayConfig:
    address: str | None = None   # None: start a private local Ray on this machine (all its CPUs)
    partitions: int = 0          # 0: one per CPU of the cluster
    chunk: int = 8192            # rows per detector call, as in batch.score_events


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--engine ray needs Ray, the optional `scale` extra: "
                             ".venv/bin/pip install -c constraints.txt -e '.[scale]'") from None
    return ray


# --------------------------------------------------------------------------- the model on workers

def pack_artifact(path) -> dict[str, bytes]:
    """The files a scorer loads, as bytes: they go through the object store, not a shared disk."""
    return {f: (Path(path) / f).read_bytes() for f in (METADATA, ONNX_FILE, DETECTOR_FILE)}


_LOADED: dict[str, tuple] = {}


def _scorer(files: dict[str, bytes]):
    """(detector, ONNX step) of the shipped artifact, loaded once per worker process, one thread
    each (Ray gives a task one CPU); the temporary copy is removed once loaded."""
    key = hashlib.sha256(b"".join(files[f] for f in sorted(files))).hexdigest()
    loaded = _LOADED.get(key)
    if loaded is None:
        from .encoding import OrtStep
        os.environ.setdefault("SEQGUARD_FOREST_THREADS", "1")
        d = Path(tempfile.mkdtemp(prefix="seqguard-model-"))
        try:
            for name, data in files.items():
                (d / name).write_bytes(data)
            art = ModelArtifact.load(d)
            loaded = _LOADED[key] = (art.detector, OrtStep(str(art.onnx_path), threads=1))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return loaded


# --------------------------------------------------------------------------- task bodies

TOKEN_COLS = ("user", "device", "ip", "prefix", "failed", "ts")     # what pass 0 gives the driver
_INT_FIELDS = ("ts", "type_id", "flags", "user", "device", "ip", "prefix", "country", "session")


def map_chunk(featurizer: Featurizer, events: list[Event], start: int, parts: int) -> tuple:
    """Pass 0 on one chunk of the log (input positions start..).

    Returns ([n, 6] int64 TOKEN_COLS for the driver, then one block per user partition): each
    block holds its events' `Featurizer.event_arrays` columns (numpy, cheap to ship) plus user
    ids, and goes to pass 2 through Ray's object store, not through the driver (a map/shuffle).
    """
    ev = featurizer.event_arrays(events)
    ints = np.column_stack([getattr(ev, f) for f in _INT_FIELDS]) if len(events) else \
        np.empty((0, len(_INT_FIELDS)), np.int64)
    failed = (ev.flags & K.FLAG_LOGIN_FAILED != 0).astype(np.int64)
    out = np.column_stack([ev.user, ev.device, ev.ip, ev.prefix, failed, ev.ts]) if len(events) else \
        np.empty((0, len(TOKEN_COLS)), np.int64)
    upart = ev.user % parts
    blocks = []
    for p in range(parts):
        j = np.flatnonzero(upart == p)
        blocks.append({"pos": j + start, "ints": ints[j], "amount": ev.amount[j],
                       "user_id": [events[i].user_id for i in j.tolist()]})
    return (out, *blocks)


def _local_rows(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense rows 0..m-1 for the distinct keys (one context each), and m."""
    uniq, rows = np.unique(keys, return_inverse=True)
    return rows.astype(np.int64), len(uniq)


def replay_entities(kind_inputs: list) -> list[np.ndarray]:
    """Pass 1 body: per entity kind, (keys, ts, users, is_new, failed) in global replay order ->
    [n, picks] float64 of that kind's features, from the same kernel as the featuriser."""
    outs = []
    for (_, picks, _), (keys, ts, users, is_new, failed) in zip(_ENTITY_COLS, kind_inputs):
        rows, m = _local_rows(keys)
        EI, EF = K.new_entity_rows(m)
        five = np.empty((len(keys), 5), np.float64)
        K.touch_entities(rows, np.asarray(ts, np.int64), np.asarray(users, np.int64), np.asarray(is_new, np.bool_),
                         np.asarray(failed, np.bool_), EI, EF, five)
        outs.append(np.ascontiguousarray(five[:, list(picks)]))
    return outs


def score_users(featurizer: Featurizer, files: dict[str, bytes], idx: np.ndarray, entity: np.ndarray, chunk: int,
                *blocks) -> np.ndarray:
    """Pass 2 on one user partition: `idx` = its events' input positions in replay order, `entity`
    their joined cross-user features, `blocks` its events from every pass-0 chunk. User half of
    the featuriser kernel + step model + detector, as `batch.score_events` does; returns risk per idx."""
    from .batch import detector_risk
    from .encoding import encode_sequences
    pos = np.concatenate([b["pos"] for b in blocks])
    s = np.argsort(pos, kind="stable")
    where = s[np.searchsorted(pos[s], idx)] if len(pos) == len(idx) else None
    if where is None or not np.array_equal(pos[where], idx):
        raise RuntimeError("ray engine: partition events do not match the driver's index (bug)")
    ints = np.concatenate([b["ints"] for b in blocks])[where]
    amount = np.concatenate([b["amount"] for b in blocks])[where]
    user_ids = [u for b in blocks for u in b["user_id"]]
    det, step = _scorer(files)
    n = len(idx)
    col = {f: np.ascontiguousarray(ints[:, k]) for k, f in enumerate(_INT_FIELDS)}
    rows, m = _local_rows(col["user"])
    UI, UF = K.new_user_rows(m)
    feats = np.empty((n, N_FEATURES), np.float32)
    K.featurize_users(col["ts"], col["type_id"], col["flags"], amount, col["device"], col["country"], col["prefix"],
                      col["session"], rows, np.ascontiguousarray(entity, np.float64), UI, UF, feats)
    type_ids = col["type_id"]
    dense: dict[str, int] = {}                                # as batch.dense_user_index: by user_id
    user_idx = np.fromiter((dense.setdefault(user_ids[w], len(dense)) for w in where.tolist()), np.int64, n)
    emb, surprise, _, _ = encode_sequences(step, user_idx, type_ids, feats, len(dense), reduce=det.project)
    return detector_risk(det, emb, surprise, feats, type_ids, chunk, user_idx=user_idx, n_users=len(dense))


# --------------------------------------------------------------------------- driver

def _partitions(ray, cfg: RayConfig) -> int:
    return cfg.partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _map(ray, featurizer: Featurizer, events: list[Event], parts: int):
    """Pass 0: ([N, 6] tokens in input order, per chunk its per-user-partition block refs, featuriser ref)."""
    task = ray.remote(num_cpus=1, num_returns=parts + 1)(map_chunk)
    fz_ref = ray.put(featurizer)
    step = max(1, -(-len(events) // parts))
    refs = [task.remote(fz_ref, events[a:a + step], a, parts) for a in range(0, len(events), step)]
    tokens = (np.concatenate(ray.get([r[0] for r in refs])) if refs
              else np.empty((0, len(TOKEN_COLS)), np.int64))
    return tokens, [r[1:] for r in refs], fz_ref


def _entity_pass(ray, tokens: np.ndarray, parts: int):
    """Pass 1: (order, user hash per replayed event, [N, 9] float64 cross-user features in replay order)."""
    n = len(tokens)
    order = np.lexsort((np.arange(n), tokens[:, 5]))          # global (ts, position), as featurize_log
    tok = tokens[order]
    user, failed, ts = tok[:, 0], tok[:, 4].astype(bool), tok[:, 5]
    is_new = np.zeros(n, bool)
    is_new[np.unique(user, return_index=True)[1]] = True    # the user's first event in replay order
    per_part: list[list] = [[] for _ in range(parts)]
    positions: list[list] = [[] for _ in range(parts)]
    for col in range(len(ENTITY_KINDS)):
        keys = tok[:, 1 + col]
        has = np.flatnonzero(keys != 0)                       # no device / IP: features stay 0.0
        part = keys[has] % parts
        for p in range(parts):
            sel = has[part == p]                              # ascending: global order kept
            per_part[p].append((keys[sel], ts[sel], user[sel], is_new[sel], failed[sel]))
            positions[p].append(sel)
    task = ray.remote(num_cpus=1)(replay_entities)
    refs = [task.remote(per_part[p]) for p in range(parts)]
    entity = np.zeros((n, N_ENTITY), np.float64)
    for p, outs in enumerate(ray.get(refs)):                  # join back per event
        for (_, _, cols), sel, res in zip(_ENTITY_COLS, positions[p], outs):
            entity[sel[:, None], cols] = res
    return order, user, entity


def distributed_entity_features(ray, featurizer: Featurizer, events: list[Event], parts: int):
    """Passes 0 + 1 alone: (order, user hash per replayed event, [N, 9] float64 entity features in
    replay order). Needs a connected Ray; the values equal the sequential replay's bit for bit."""
    tokens, _, _ = _map(ray, featurizer, events, parts)
    return _entity_pass(ray, tokens, parts)


def score_events_ray(model: ModelArtifact, events: list[Event], cfg: RayConfig | None = None,
                     log=None) -> tuple[np.ndarray, np.ndarray]:
    """Risk and action code right after each event, in INPUT order; identical to `batch.score_events`.

    Uses the connected Ray if `ray.init` was called already, else starts (and stops) one per cfg.
    """
    cfg = cfg or RayConfig()
    if cfg.partitions < 0:
        raise ValueError(f"--partitions must be >= 0, got {cfg.partitions}")
    log = log or (lambda m: None)
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        t = time.time()
        if cfg.address:
            ray.init(address=cfg.address, logging_level="WARNING")
        else:
            ray.init(include_dashboard=False, logging_level="WARNING")
        log(f"ray: {'connected to ' + cfg.address if cfg.address else 'started a local cluster'} "
            f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs) in {time.time() - t:.1f}s")
    try:
        parts = _partitions(ray, cfg)
        risk = np.empty(len(events), np.float64)
        t0 = time.time()
        tokens, blocks, fz_ref = _map(ray, model.featurizer, events, parts)
        t1 = time.time()
        order, user, entity = _entity_pass(ray, tokens, parts)
        t2 = time.time()
        files = ray.put(pack_artifact(model.path))
        task = ray.remote(num_cpus=1)(score_users)
        upart = user % parts
        idxs, refs = [], []
        for p in range(parts):
            sel = np.flatnonzero(upart == p)                  # replay positions of these users' events
            if len(sel):
                idxs.append(order[sel])
                refs.append(task.remote(fz_ref, files, order[sel], entity[sel], cfg.chunk, *[b[p] for b in blocks]))
        for idx, r in zip(idxs, ray.get(refs)):
            risk[idx] = r
        t3 = time.time()
        log(f"ray: {parts} partitions; tokenise/shuffle {t1 - t0:.1f}s, entity pass {t2 - t1:.1f}s, "
            f"user pass {t3 - t2:.1f}s")
        return risk, model.detector.action_codes(risk)
    finally:
        if started:
            ray.shutdown()
