"""The ONE featuriser: events + compact contexts -> (event-type ids, feature rows), contexts updated.

Training, batch scoring (`score-file`, also on Ray) and the online gateway all run the same
compiled kernel (`seqguard.featurize_kernel`, numba) over batches of events with the same
contexts, so an offline score and an online score of the same events are identical. This module
turns events into the kernel's token arrays (keyed hashes, vocabulary ids, type flags) and keeps
the contexts, which serialise to the same bytes as before (the gateway keeps them in Redis):

* UserContext   - one per user: previous timestamp, recently seen devices / countries /
                  IP prefixes, decayed activity and failure counters, amount and timing stats.
* EntityContext - one per device, IP and IP /24 prefix: accounts seen in the last 24 h,
                  accounts with a failed login in the last 7 days, decayed failed logins
                  and events. Shared across users, this is what exposes rings (brushing,
                  promo abuse, credential stuffing). Offline it is replayed in global
                  timestamp order, online it lives in Redis.

The encoder reads the first N_ENCODER_FEATURES features; the ones after it are for the detector
only: adding an input to the encoder means retraining it, and a retrained encoder moves every
score, so a new signal for the detector alone goes after it (docs/results/tail_forest.md).

All counters are exponentially decayed (value, shared last timestamp), so they are exact,
O(1) to update and independent of how the stream is chunked.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from . import featurize_kernel as K
from .featurize_kernel import (DAY_MS, FAILED_ACCOUNTS_WINDOW_MS, GAP_EWMA_ALPHA, HOUR_MS, JITTER_ALPHA,  # noqa: F401
                               JITTER_PRIOR, MAX_COUNTRIES, MAX_DEVICES, MAX_ENTITY_USERS, MAX_PREFIXES, MINUTE_MS)
from .schema import COMMON_EVENT_TYPES, SCHEMA_VERSION, Event

# The features' version (in the model's spec): a model of another version is refused, never silently
# misread. 3: an entity idle for 8 days starts again from empty.
FEATURIZER_VERSION = 3
# The byte layout of stored user and entity contexts (their first byte), apart from the features'
# version: a change of arithmetic that keeps the layout leaves the contexts in Redis readable; a
# context of another layout is refused.
CONTEXT_FORMAT = 2
UNKNOWN_TOKEN = "<unknown>"

# Event-type groups the featuriser reacts to (by name, so team-specific ids do not matter).
ACCOUNT_CHANGES = frozenset({"change_password", "change_email", "change_address", "add_payment_method"})
PAYMENTS = frozenset({"payment", "checkout"})
AMOUNT_STATS_TYPES = frozenset({"payment"})


FEATURE_NAMES = (
    "is_first_event", "log_gap_s", "log_account_age_h", "log_n_events",
    "has_amount", "log_amount", "amount_z", "amount_vs_max",
    "has_device", "new_device", "device_changed", "log_n_devices",
    "has_country", "new_country", "country_changed",
    "has_ip", "new_ip_prefix", "ip_prefix_changed",
    "log_events_1m", "log_events_1h", "log_login_failed_1h", "log_payment_failed_1h",
    "log_payments_24h", "log_amount_24h", "log_coupons_24h",
    "recent_account_change", "gap_mean", "gap_std",
    "review_without_purchase", "review_vs_purchase", "log_session_events", "new_session",
    "log_device_accounts_24h", "log_device_failed_1h", "log_device_new_accounts_24h",
    "log_ip_accounts_24h", "log_ip_failed_1h", "log_ip_events_1h",
    "log_prefix_accounts_24h", "log_prefix_failed_1h",
    # detector-only (after N_ENCODER_FEATURES): OTHER accounts with a failed login on this device in
    # 7 days; how much consecutive log gaps differ, recently (near 0: a machine's cadence)
    "log_device_failed_accounts_7d", "gap_jitter",
)
N_FEATURES = len(FEATURE_NAMES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
N_ENCODER_FEATURES = FEATURE_INDEX["log_device_failed_accounts_7d"]   # 40: what the LSTM step model reads
assert N_FEATURES == K.N_FEATURES and FEATURE_INDEX["log_device_accounts_24h"] == K.ENTITY_FEATURES_START


def event_flags(event_type: str) -> int:
    """The kernel's view of an event type: which of the named groups it belongs to."""
    return ((K.FLAG_LOGIN_FAILED if event_type == "login_failed" else 0)
            | (K.FLAG_PAYMENT_FAILED if event_type == "payment_failed" else 0)
            | (K.FLAG_PAYMENT if event_type in AMOUNT_STATS_TYPES else 0)
            | (K.FLAG_PAYMENTS if event_type in PAYMENTS else 0)
            | (K.FLAG_REVIEW if event_type == "review" else 0)
            | (K.FLAG_ACCOUNT_CHANGE if event_type in ACCOUNT_CHANGES else 0)
            | (K.FLAG_COUPON if event_type == "redeem_coupon" else 0))


# --------------------------------------------------------------------------- tokens

class Vocabulary:
    """Event-type tokens learned from a training log.

    Id 0 is the shared "unknown" token; the common types always have ids; a team's own type
    gets an id when seen at least `min_count` times. An unseen type maps to unknown, never an error.
    """

    def __init__(self, tokens: Iterable[str]):
        self.tokens = [UNKNOWN_TOKEN] + [t for t in tokens if t != UNKNOWN_TOKEN]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def learn(cls, event_types: Iterable[str], min_count: int = 5) -> "Vocabulary":
        counts = Counter(event_types)
        extra = sorted(t for t, n in counts.items() if n >= min_count and t not in COMMON_EVENT_TYPES)
        return cls(list(COMMON_EVENT_TYPES) + extra)

    def id(self, event_type: str) -> int:
        return self.index.get(event_type, 0)

    def __len__(self) -> int:
        return len(self.tokens)


class TokenHasher:
    """Keyed 32-bit hashes of identifiers (devices, IPs, ...) kept inside contexts.

    Contexts only compare hashes for equality, so features do not depend on the key; keying
    keeps raw identifiers (an IPv4 is trivially brute-forced from an unkeyed hash) out of Redis.
    """

    MEMO_SIZE = 1_000_000          # identifiers remembered (then forgotten all at once): ~100 MB at most

    def __init__(self, key: bytes = b"seqguard-context"):
        self._key = key[:64]
        self._memo: dict[str | None, int] = {None: 0}
        self._prefix_memo: dict[str | None, int] = {None: 0}    # ip -> hash of its prefix

    def _hash(self, value: str) -> int:
        d = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=4, key=self._key).digest()
        return int.from_bytes(d, "little") or 1          # 0 means "missing"

    def __call__(self, value: str | None) -> int:
        h = self._memo.get(value)
        if h is None:
            if len(self._memo) > self.MEMO_SIZE:
                self._memo.clear()
                self._memo[None] = 0
            h = self._memo[value] = self._hash(value)
        return h

    def many(self, values: Sequence[str | None]) -> np.ndarray:
        """int64 hashes of a column of identifiers (None -> 0), each distinct value hashed once."""
        return self._column(self._memo, values, self._hash)

    def many_prefixes(self, ips: Sequence[str | None]) -> np.ndarray:
        """int64 hashes of the IP prefix of each IP (None -> 0)."""
        return self._column(self._prefix_memo, ips, lambda ip: self._hash(ip_prefix(ip)))

    def _column(self, memo: dict, values: Sequence[str | None], hash_of) -> np.ndarray:
        new = set(values).difference(memo)
        if len(memo) + len(new) > self.MEMO_SIZE:       # forget all at once (a batch alone may exceed it)
            memo.clear()
            memo[None] = 0
            new = set(values).difference(memo)
        for value in new:
            memo[value] = hash_of(value)
        return np.array(list(map(memo.__getitem__, values)), np.int64)


def ip_prefix(ip: str | None) -> str | None:
    """IPv4 /24 ("1.2.3") or IPv6 /48 (first three hextets): where carrier NAT and rings live."""
    if ip is None:
        return None
    if ":" in ip:
        return ":".join(ip.split(":")[:3]) + "::/48"
    parts = ip.split(".")
    return ".".join(parts[:3]) if len(parts) == 4 else ip


class Tokens(NamedTuple):
    """The hashed, vocabulary-mapped view of one event (the gateway's per-event path)."""
    ts: int
    type_id: int
    event_type: str
    amount: float | None
    user: int
    device: int
    ip: int
    prefix: int
    country: int
    session: int


class EventArrays(NamedTuple):
    """A batch of events as the kernel reads them (all int64 except amount: float64, NaN = none)."""
    ts: np.ndarray
    type_id: np.ndarray
    flags: np.ndarray
    amount: np.ndarray
    user: np.ndarray
    device: np.ndarray
    ip: np.ndarray
    prefix: np.ndarray
    country: np.ndarray
    session: np.ndarray

    def take(self, idx) -> "EventArrays":
        return EventArrays(*(a[idx] for a in self))

    def __len__(self) -> int:              # (a NamedTuple's len would count its fields)
        return len(self.ts)


# --------------------------------------------------------------------------- contexts

assert struct.calcsize("<BIqqqIIIIIIII" + "d" * 15) == K.USER_HEAD_SIZE       # the Redis layout
assert struct.calcsize("<Bqqdddd B") == K.ENTITY_HEAD_SIZE


def _int_field(col: int):
    return property(lambda self: int(self.ints[col]), lambda self, v: self.ints.__setitem__(col, v))


def _float_field(col: int):
    return property(lambda self: float(self.floats[col]), lambda self, v: self.floats.__setitem__(col, v))


class _Context:
    """A featuriser context is held either as its Redis bytes (`from_bytes`, and after
    `featurize_batch`: decoded and encoded in bulk, so a gateway batch never pays per field) or as
    kernel rows `ints` / `floats` (views into a ContextStore's tables, or its own), materialised on
    first field access."""
    __slots__ = ("_ints", "_floats", "_blob")
    _decode = _encode = None                 # the bulk codec of the subclass

    def __init__(self, ints: np.ndarray | None = None, floats: np.ndarray | None = None):
        self._ints, self._floats = ints, floats
        self._blob = b"" if ints is None else None           # b"": a new context

    @classmethod
    def from_bytes(cls, data: bytes):
        if not data or data[0] != CONTEXT_FORMAT:
            raise ValueError(f"{cls.__name__} version {data[0] if data else None} is not "
                             f"{CONTEXT_FORMAT}")
        c = cls()
        c._blob = bytes(data)
        return c

    def to_bytes(self) -> bytes:
        if self._blob:
            return self._blob
        return type(self)._encode(self.ints[None], self.floats[None])[0]

    def _materialise(self) -> None:
        i, f = type(self)._decode([self._blob])
        self._ints, self._floats, self._blob = i[0], f[0], None

    @property
    def ints(self) -> np.ndarray:
        if self._ints is None:
            self._materialise()
        return self._ints

    @property
    def floats(self) -> np.ndarray:
        if self._ints is None:
            self._materialise()
        return self._floats


class UserContext(_Context):
    """Per-user featuriser state (~300 bytes serialised): one row of the kernel's user tables."""
    __slots__ = ()

    n, first_ts, last_ts, last_change_ts = (_int_field(c) for c in (K.U_N, K.U_FIRST_TS, K.U_LAST_TS,
                                                                     K.U_LAST_CHANGE_TS))
    last_device, last_country, last_prefix, last_session = (_int_field(c) for c in (
        K.U_LAST_DEVICE, K.U_LAST_COUNTRY, K.U_LAST_PREFIX, K.U_LAST_SESSION))
    session_events, n_payments, n_reviews, last_type = (_int_field(c) for c in (
        K.U_SESSION_EVENTS, K.U_N_PAYMENTS, K.U_N_REVIEWS, K.U_LAST_TYPE))
    (ev_1m, ev_1h, fail_login, fail_pay, pay_24h, amt_24h, coupon_24h, amt_mean, amt_m2, amt_max, gap_mean,
     gap_var, last_log_gap, gap_jitter, reserved_float) = (_float_field(c) for c in range(K.N_UF))
    devices = property(lambda self: self.ints[K.U_DEVICES:K.U_DEVICES + self.ints[K.U_N_DEVICES]].tolist())
    countries = property(lambda self: self.ints[K.U_COUNTRIES:K.U_COUNTRIES + self.ints[K.U_N_COUNTRIES]].tolist())
    prefixes = property(lambda self: self.ints[K.U_PREFIXES:K.U_PREFIXES + self.ints[K.U_N_PREFIXES]].tolist())


def _pairs_field(count_col: int, base: int):
    def get(self) -> list:
        n = int(self.ints[count_col])
        return self.ints[base:base + 2 * n].reshape(n, 2).tolist()

    def put(self, pairs: list) -> None:
        if len(pairs) > MAX_ENTITY_USERS:
            raise ValueError(f"an entity keeps at most {MAX_ENTITY_USERS} [user, ts] pairs, got {len(pairs)}")
        self.ints[count_col] = len(pairs)
        if pairs:
            self.ints[base:base + 2 * len(pairs)] = np.asarray(pairs, np.int64).ravel()
    return property(get, put)


class EntityContext(_Context):
    """Per device / IP / IP-prefix state shared by all users: one row of the kernel's entity tables
    (~300 bytes serialised, up to ~700 for a device in a stuffing ring)."""
    __slots__ = ()

    first_ts, last_ts = _int_field(K.E_FIRST_TS), _int_field(K.E_LAST_TS)
    events_1h, failed_1h, new_accounts_24h, reserved_float = (_float_field(c) for c in range(K.N_EF))
    users = _pairs_field(K.E_N_USERS, K.E_USERS)                 # [user hash, last ts ms], most recent first (24 h)
    failed_users = _pairs_field(K.E_N_FAILED, K.E_FAILED)        # [user hash, last failed-login ts ms] (7 days)


def _blobs(blobs: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    present = [b or b"" for b in blobs]
    offsets = np.array([0, *itertools.accumulate(map(len, present))], np.int64)
    return np.frombuffer(b"".join(present), np.uint8), offsets


def _split(buf: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    data = buf.tobytes()
    o = offsets.tolist()
    return [data[o[k]:o[k + 1]] for k in range(len(o) - 1)]


def decode_user_contexts(blobs: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Many UserContext byte strings (None or b"": a new user) -> kernel rows (UI, UF), one call."""
    buf, offsets = _blobs(blobs)
    ui, uf = np.empty((len(blobs), K.N_UI), np.int64), np.empty((len(blobs), K.N_UF))   # (every row is set)
    bad = K.decode_users(buf, offsets, ui, uf, CONTEXT_FORMAT)
    if bad >= 0:
        raise ValueError(f"user context {bad} is corrupt: version {blobs[bad][0]} (readable: "
                         f"{CONTEXT_FORMAT}), {len(blobs[bad])} bytes")
    return ui, uf


def encode_user_contexts(ui: np.ndarray, uf: np.ndarray) -> list[bytes]:
    return _split(*K.encode_users(ui, uf, CONTEXT_FORMAT))


def decode_entity_contexts(blobs: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Many EntityContext byte strings (None or b"": a new entity) -> kernel rows (EI, EF), one call."""
    buf, offsets = _blobs(blobs)
    ei, ef = np.empty((len(blobs), K.N_EI), np.int64), np.empty((len(blobs), K.N_EF))   # (every row is set)
    bad = K.decode_entities(buf, offsets, ei, ef, CONTEXT_FORMAT)
    if bad >= 0:
        raise ValueError(f"entity context {bad} is corrupt: version {blobs[bad][0]} (readable: "
                         f"{CONTEXT_FORMAT}), {len(blobs[bad])} bytes")
    return ei, ef


def encode_entity_contexts(ei: np.ndarray, ef: np.ndarray) -> list[bytes]:
    return _split(*K.encode_entities(ei, ef, CONTEXT_FORMAT))


UserContext._decode, UserContext._encode = staticmethod(decode_user_contexts), staticmethod(encode_user_contexts)
EntityContext._decode, EntityContext._encode = staticmethod(decode_entity_contexts), staticmethod(encode_entity_contexts)


# The 9 cross-user features start at ENTITY_FEATURES_START, in the kernel's order. Per entity kind:
# which of touch_entity's five outputs it contributes (device: accounts, failed, new accounts,
# failed accounts 7 d; ...) and at which of those 9 columns.
ENTITY_FEATURES_START = K.ENTITY_FEATURES_START
ENTITY_IDLE_RESET_MS = K.ENTITY_IDLE_RESET_MS
N_ENTITY_FEATURES = K.N_ENTITY_FEATURES
ENTITY_KINDS = (("device", (0, 1, 3, 4), (0, 1, 2, 8)), ("ip", (0, 1, 2), (3, 4, 5)), ("prefix", (0, 1), (6, 7)))


class ContextStore:
    """In-memory contexts for offline replay: the kernel's tables, grown as users and entities
    appear, with a row per user / device / IP / prefix token hash (the gateway keeps the same
    contexts in Redis, as bytes). Memory grows with users and entities, never with events."""

    def __init__(self, capacity: int = 1024):
        self.UI, self.UF = K.new_user_rows(capacity)
        self.EI, self.EF = K.new_entity_rows(capacity)
        self.user_rows: dict[int, int] = {}
        self.entity_rows: tuple[dict, dict, dict] = ({}, {}, {})    # device, ip, prefix hash -> row
        self.n_entities = 0

    def user(self, user_hash: int) -> UserContext | None:
        """The user's context as a view into the table (None if never seen)."""
        r = self.user_rows.get(user_hash)
        return None if r is None else UserContext(self.UI[r], self.UF[r])

    def entities(self, kind: int) -> list[EntityContext]:
        """Views of every entity of one kind (0 device, 1 IP, 2 prefix)."""
        return [EntityContext(self.EI[r], self.EF[r]) for r in self.entity_rows[kind].values()]

    def rows(self, ev: EventArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user, device, ip, prefix) row per event; new contexts are created fresh, -1 = no entity."""
        u = self._rows(self.user_rows, ev.user, self._new_users)
        ents = [self._rows(table, keys, self._new_entities)
                for table, keys in zip(self.entity_rows, (ev.device, ev.ip, ev.prefix))]
        return (u, *ents)

    def _rows(self, table: dict, keys: np.ndarray, new) -> np.ndarray:
        uniq, inverse = np.unique(keys, return_inverse=True)
        rows = np.fromiter(map(table.get, uniq.tolist(), [-1] * len(uniq)), np.int64, len(uniq))
        missing = np.flatnonzero((rows < 0) & (uniq != 0))
        if len(missing):
            rows[missing] = new(len(missing))
            table.update(zip(uniq[missing].tolist(), rows[missing].tolist()))
        return rows[inverse]

    def _new_users(self, n: int) -> np.ndarray:
        a = len(self.user_rows)
        if a + n > len(self.UI):
            ui, uf = K.new_user_rows(max(2 * len(self.UI), a + n))
            ui[:a], uf[:a] = self.UI[:a], self.UF[:a]
            self.UI, self.UF = ui, uf
        return np.arange(a, a + n)

    def _new_entities(self, n: int) -> np.ndarray:
        a = self.n_entities
        if a + n > len(self.EI):
            ei, ef = K.new_entity_rows(max(2 * len(self.EI), a + n))
            ei[:a], ef[:a] = self.EI[:a], self.EF[:a]
            self.EI, self.EF = ei, ef
        self.n_entities += n
        return np.arange(a, a + n)

    def featurize(self, ev: EventArrays, out: np.ndarray | None = None) -> np.ndarray:
        """Features of a batch of events in this order (float32 [n, N_FEATURES] unless `out` is given),
        every context they touch updated: one kernel call."""
        rows = self.rows(ev)
        if out is None:
            out = np.empty((len(ev), N_FEATURES), np.float32)
        K.featurize_events(ev.ts, ev.type_id, ev.flags, ev.amount, ev.user, ev.device, ev.country, ev.prefix,
                           ev.session, *rows, self.UI, self.UF, self.EI, self.EF, out)
        return out


# --------------------------------------------------------------------------- featuriser

@dataclass
class Featurizer:
    """Maps events to model inputs; its spec (vocabulary + version + feature names) is model metadata."""
    vocab: Vocabulary
    hasher: TokenHasher

    def __post_init__(self):
        self._type_memo: dict[str, tuple[int, int]] = {}      # event type -> (vocabulary id, kernel flags)

    @classmethod
    def from_spec(cls, spec: dict, hasher: TokenHasher | None = None) -> "Featurizer":
        if spec.get("featurizer_version") != FEATURIZER_VERSION or list(spec.get("feature_names", [])) != list(FEATURE_NAMES):
            raise ValueError("model was trained with a different featuriser "
                             f"(version {spec.get('featurizer_version')}, this code is {FEATURIZER_VERSION})")
        return cls(Vocabulary(spec["vocab"][1:]), hasher or TokenHasher())

    def spec(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "featurizer_version": FEATURIZER_VERSION,
                "feature_names": list(FEATURE_NAMES), "vocab": list(self.vocab.tokens)}

    def schema_hash(self) -> str:
        """Fingerprint of everything that must match between a model and the serving code."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    # -- tokens
    def tokens(self, ev: Event) -> Tokens:
        h = self.hasher
        return Tokens(ev.ts, self.vocab.id(ev.event_type), ev.event_type, ev.amount, h(ev.user_id),
                      h(ev.device_id), h(ev.ip), h(ip_prefix(ev.ip)), h(ev.country), h(ev.session_id))

    def _type_info(self, event_type: str) -> tuple[int, int]:
        info = self._type_memo.get(event_type)
        if info is None:
            info = self._type_memo[event_type] = (self.vocab.id(event_type), event_flags(event_type))
        return info

    def event_arrays(self, events: Sequence[Event]) -> EventArrays:
        """The kernel's token arrays for a batch of events (same hashes and ids as `tokens`)."""
        n = len(events)
        if n == 0:
            z = np.zeros(0, np.int64)
            return EventArrays(z, z, z, np.zeros(0), z, z, z, z, z, z)
        etype = [e.event_type for e in events]        # (per-field comprehensions: far cheaper than zip(*events))
        for t in set(etype).difference(self._type_memo):
            self._type_info(t)
        type_info = np.array([self._type_memo[t] for t in etype], np.int64).reshape(n, 2)
        ip = [e.ip for e in events]
        h = self.hasher
        return EventArrays(np.array([e.ts for e in events], np.int64), type_info[:, 0].copy(),
                           type_info[:, 1].copy(), np.array([e.amount for e in events], np.float64),
                           h.many([e.user_id for e in events]), h.many([e.device_id for e in events]), h.many(ip),
                           h.many_prefixes(ip), h.many([e.country for e in events]),
                           h.many([e.session_id for e in events]))

    # -- the step
    def warm_up(self) -> None:
        """Featurise a few synthetic events with throw-away contexts, through the batch (float32) and the
        single-event (float64) entry points: every kernel specialisation a server calls is compiled, or
        loaded from numba's cache, now instead of inside its first request (seconds on a cold cache)."""
        from .schema import Event
        events = [Event("warm-1", "warm-user", 1_767_225_600_000, "login", device_id="warm-device", ip="10.0.0.1",
                        country="DE"),
                  Event("warm-2", "warm-user", 1_767_225_601_000, "payment", "i", "c", 9.5, session_id="s")]
        user = UserContext()
        self.featurize_batch(events, [user, user], [(EntityContext(), EntityContext(), EntityContext()),
                                                    (None, None, None)])
        self.featurize(self.tokens(events[0]), UserContext(), EntityContext(), EntityContext(), EntityContext())

    def featurize(self, t: Tokens, u: UserContext, device: EntityContext | None = None,
                  ip: EntityContext | None = None, prefix: EntityContext | None = None) -> np.ndarray:
        """Features (float64 [N_FEATURES]) of event t given the contexts *before* it; updates the
        contexts in place. Entity contexts are given when the event carries that entity (device/ip),
        None when it has none. One event: `featurize_batch` is the same kernel for many."""
        tid, flags = self._type_info(t.event_type)
        ev = EventArrays(*(np.array([v], np.int64) for v in (t.ts, tid, flags)),
                         np.array([np.nan if t.amount is None else t.amount], np.float64),
                         *(np.array([v], np.int64) for v in (t.user, t.device, t.ip, t.prefix, t.country, t.session)))
        out = np.empty((1, N_FEATURES), np.float64)
        _run_on_contexts(ev, [u], [(device, ip, prefix)], out)
        return out[0]

    def featurize_batch(self, events: Sequence[Event], user_contexts: Sequence[UserContext],
                        entity_contexts: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """(type ids int64 [n], features float32 [n, N_FEATURES]) of events in this order, in one kernel
        call. `user_contexts[k]` is event k's user context (the same object for the same user),
        `entity_contexts[k]` its (device, ip, prefix) EntityContext or None each; all updated in place.
        This is the online gateway's batch: its contexts come from Redis and go back there."""
        ev = self.event_arrays(events)
        out = np.empty((len(ev), N_FEATURES), np.float32)
        _run_on_contexts(ev, user_contexts, entity_contexts, out)
        return ev.type_id, out


def _run_on_contexts(ev: EventArrays, user_contexts: Sequence[UserContext], entity_contexts: Sequence[tuple],
                     out: np.ndarray) -> None:
    """The kernel over context objects, each once (by identity): those held as bytes are decoded in
    one call and re-encoded in one call (left as bytes); those held as rows are copied in and back."""
    index: dict[int, int] = {}
    users: list = []
    ents: list = []

    def row_of(ctx, objs: list) -> int:
        if ctx is None:
            return -1
        r = index.get(id(ctx))
        if r is None:
            r = index[id(ctx)] = len(objs)
            objs.append(ctx)
        return r

    u_row = np.array([row_of(u, users) for u in user_contexts], np.int64)
    ent_rows = np.array([[row_of(e, ents) for e in es] for es in entity_contexts], np.int64).reshape(len(ev), 3)
    if all(o._ints is None for o in itertools.chain(users, ents)):      # all held as bytes: one call
        ubuf, uoff = _blobs([o._blob for o in users])
        ebuf, eoff = _blobs([o._blob for o in ents])
        bad_u, bad_e, ub, uo, eb, eo = K.featurize_blobs(
            ev.ts, ev.type_id, ev.flags, ev.amount, ev.user, ev.device, ev.country, ev.prefix, ev.session, u_row,
            ent_rows[:, 0].copy(), ent_rows[:, 1].copy(), ent_rows[:, 2].copy(), ubuf, uoff, ebuf, eoff,
            CONTEXT_FORMAT, out)
        if bad_u >= 0:
            decode_user_contexts([users[bad_u]._blob])            # raises the ValueError naming it
        if bad_e >= 0:
            decode_entity_contexts([ents[bad_e]._blob])
        for o, blob in itertools.chain(zip(users, _split(ub, uo)), zip(ents, _split(eb, eo))):
            o._blob = blob
        return
    UI, UF = _gather(users, decode_user_contexts)
    EI, EF = _gather(ents, decode_entity_contexts)
    K.featurize_events(ev.ts, ev.type_id, ev.flags, ev.amount, ev.user, ev.device, ev.country, ev.prefix,
                       ev.session, u_row, ent_rows[:, 0].copy(), ent_rows[:, 1].copy(), ent_rows[:, 2].copy(),
                       UI, UF, EI, EF, out)
    _scatter(users, UI, UF, encode_user_contexts)
    _scatter(ents, EI, EF, encode_entity_contexts)


def _gather(objs: list, decode) -> tuple[np.ndarray, np.ndarray]:
    ints, floats = decode([o._blob if o._ints is None else None for o in objs])
    for r, o in enumerate(objs):
        if o._ints is not None:
            ints[r], floats[r] = o._ints, o._floats
    return ints, floats


def _scatter(objs: list, ints: np.ndarray, floats: np.ndarray, encode) -> None:
    held = [r for r, o in enumerate(objs) if o._ints is None]
    for r, blob in zip(held, encode(ints[held], floats[held]) if held else ()):
        objs[r]._blob = blob
    for r, o in enumerate(objs):
        if o._ints is not None:
            o._ints[:], o._floats[:] = ints[r], floats[r]


def replay_order(ts: np.ndarray) -> np.ndarray:
    """Global replay order: by timestamp, ties in input order (what the online gateway sees when a
    log is sent in time order)."""
    return np.argsort(np.asarray(ts, np.int64), kind="stable")


def featurize_log(featurizer: Featurizer, events: list[Event], store: ContextStore | None = None,
                  progress: bool = False, order=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replay events in global (ts, position) order; return (order, type_ids, features) in that order.

    `order[k]` is the index into `events` of the k-th replayed event. Rows are float32 exactly as
    the online gateway computes them for the same event stream. `order` replays in another
    order instead (e.g. the order a gateway applied the events, from its sequence numbers).
    """
    store = store or ContextStore()
    ev = featurizer.event_arrays(events)
    order = replay_order(ev.ts) if order is None else np.asarray(order, dtype=np.int64)
    ev = ev.take(order)
    feats = np.empty((len(events), N_FEATURES), dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(events), desc="featurise", unit="ev", mininterval=1.0, leave=False)
    step = 1 << 18                       # kernel calls per progress update
    for a in range(0, len(events), step):
        store.featurize(ev.take(slice(a, a + step)), feats[a:a + step])
        if bar is not None:
            bar.update(min(step, len(events) - a))
    if bar is not None:
        bar.close()
    return order, ev.type_id, feats
