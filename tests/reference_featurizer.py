"""TEST ORACLE: the per-event Python featuriser as it was before the compiled kernel (seqguard 39db3d8).

Kept only so tests can check that `seqguard.featurize_kernel` gives bit-identical rows and context
bytes (tests/test_featurizer_kernel.py). Nothing in the package imports it. Tokens and vocabulary
are shared with the package (they were not changed).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from seqguard.featurizer import (ACCOUNT_CHANGES, AMOUNT_STATS_TYPES, DAY_MS, FAILED_ACCOUNTS_WINDOW_MS,
                                 CONTEXT_FORMAT, GAP_EWMA_ALPHA, HOUR_MS, JITTER_ALPHA, JITTER_PRIOR,
                                 MAX_COUNTRIES, MAX_DEVICES, MAX_ENTITY_USERS, MAX_PREFIXES, MINUTE_MS, N_FEATURES,
                                 PAYMENTS, TokenHasher, Tokens, Vocabulary)
from seqguard.featurize_kernel import ENTITY_CLOCK_RESET_MS, ENTITY_IDLE_RESET_MS
from seqguard.schema import Event

# --------------------------------------------------------------------------- contexts

def _decay(dt_ms: int, tau_ms: int) -> float:
    return math.exp(-dt_ms / tau_ms) if dt_ms > 0 else 1.0


def _lru_touch(items: list, value: int, cap: int) -> bool:
    """Move value to the front; return True if it was not there (new)."""
    if value in items:
        items.remove(value)
        items.insert(0, value)
        return False
    items.insert(0, value)
    del items[cap:]
    return True


_USER_HEAD = struct.Struct("<BIqqqIIIIIIII" + "d" * 15)
_ENTITY_HEAD = struct.Struct("<Bqqdddd B")


class UserContext:
    """Per-user featuriser state (~300 bytes serialised)."""
    __slots__ = ("n", "first_ts", "last_ts", "last_change_ts", "last_device", "last_country",
                 "last_prefix", "last_session", "session_events", "n_payments", "n_reviews", "last_type",
                 "ev_1m", "ev_1h", "fail_login", "fail_pay", "pay_24h", "amt_24h", "coupon_24h",
                 "amt_mean", "amt_m2", "amt_max", "gap_mean", "gap_var", "last_log_gap", "gap_jitter", "reserved_float",
                 "devices", "countries", "prefixes")

    def __init__(self):
        self.n = 0
        self.first_ts = self.last_ts = self.last_change_ts = 0
        self.last_device = self.last_country = self.last_prefix = self.last_session = 0
        self.session_events = self.n_payments = self.n_reviews = self.last_type = 0
        self.ev_1m = self.ev_1h = self.fail_login = self.fail_pay = 0.0
        self.pay_24h = self.amt_24h = self.coupon_24h = 0.0
        self.amt_mean = self.amt_m2 = self.amt_max = 0.0
        self.gap_mean = self.gap_var = 0.0
        self.last_log_gap = self.reserved_float = 0.0
        self.gap_jitter = JITTER_PRIOR
        self.devices: list[int] = []
        self.countries: list[int] = []
        self.prefixes: list[int] = []

    def to_bytes(self) -> bytes:
        head = _USER_HEAD.pack(
            CONTEXT_FORMAT, self.n, self.first_ts, self.last_ts, self.last_change_ts,
            self.last_device, self.last_country, self.last_prefix, self.last_session,
            self.session_events, self.n_payments, self.n_reviews, self.last_type,
            self.ev_1m, self.ev_1h, self.fail_login, self.fail_pay, self.pay_24h, self.amt_24h,
            self.coupon_24h, self.amt_mean, self.amt_m2, self.amt_max, self.gap_mean, self.gap_var,
            self.last_log_gap, self.gap_jitter, self.reserved_float)
        lists = bytes([len(self.devices), len(self.countries), len(self.prefixes)])
        ids = self.devices + self.countries + self.prefixes
        return head + lists + struct.pack(f"<{len(ids)}I", *ids)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UserContext":
        u = cls()
        vals = _USER_HEAD.unpack_from(data, 0)
        if vals[0] != CONTEXT_FORMAT:
            raise ValueError(f"user context version {vals[0]} is not {CONTEXT_FORMAT}")
        (_, u.n, u.first_ts, u.last_ts, u.last_change_ts, u.last_device, u.last_country,
         u.last_prefix, u.last_session, u.session_events, u.n_payments, u.n_reviews, u.last_type,
         u.ev_1m, u.ev_1h, u.fail_login, u.fail_pay, u.pay_24h, u.amt_24h, u.coupon_24h,
         u.amt_mean, u.amt_m2, u.amt_max, u.gap_mean, u.gap_var, u.last_log_gap, u.gap_jitter, u.reserved_float) = vals
        off = _USER_HEAD.size
        nd, nc, npf = data[off], data[off + 1], data[off + 2]
        ids = list(struct.unpack_from(f"<{nd + nc + npf}I", data, off + 3))
        u.devices, u.countries, u.prefixes = ids[:nd], ids[nd:nd + nc], ids[nd + nc:]
        return u


class EntityContext:
    """Per device / IP / IP-prefix state shared by all users (~300 bytes serialised, up to ~700
    for a device in a stuffing ring)."""
    __slots__ = ("first_ts", "last_ts", "events_1h", "failed_1h", "new_accounts_24h", "reserved_float", "users",
                 "failed_users")

    def __init__(self):
        self.first_ts = self.last_ts = 0
        self.events_1h = self.failed_1h = self.new_accounts_24h = self.reserved_float = 0.0
        self.users: list[list[int]] = []         # [user hash, last ts ms], most recent first (24 h)
        self.failed_users: list[list[int]] = []  # [user hash, last failed-login ts ms] (7 days)

    def to_bytes(self) -> bytes:
        head = _ENTITY_HEAD.pack(CONTEXT_FORMAT, self.first_ts, self.last_ts, self.events_1h,
                                 self.failed_1h, self.new_accounts_24h, self.reserved_float, len(self.users))
        return head + _pack_pairs(self.users) + bytes([len(self.failed_users)]) + _pack_pairs(self.failed_users)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EntityContext":
        e = cls()
        (ver, e.first_ts, e.last_ts, e.events_1h, e.failed_1h, e.new_accounts_24h, e.reserved_float,
         n) = _ENTITY_HEAD.unpack_from(data, 0)
        if ver != CONTEXT_FORMAT:
            raise ValueError(f"entity context version {ver} is not {CONTEXT_FORMAT}")
        i = _ENTITY_HEAD.size
        e.users = _unpack_pairs(data, i, n)
        i += _PAIR.size * n
        e.failed_users = _unpack_pairs(data, i + 1, data[i])
        return e


_PAIR = struct.Struct("<Iq")             # [user hash, ts ms] in an entity's lists


def _pack_pairs(pairs: list) -> bytes:
    return b"".join(_PAIR.pack(u, ts) for u, ts in pairs)


def _unpack_pairs(data: bytes, offset: int, n: int) -> list:
    return [list(_PAIR.unpack_from(data, offset + _PAIR.size * k)) for k in range(n)]


def _move_to_front(pairs: list, user: int, ts: int) -> None:
    """[user, ts] first in `pairs`, replacing the user's earlier entry (most recent first)."""
    for i, pair in enumerate(pairs):
        if pair[0] == user:
            del pairs[i]
            break
    pairs.insert(0, [user, ts])


def touch_entity(e: EntityContext | None, ts: int, user: int, user_is_new: bool,
                 failed: bool) -> tuple[float, float, float, float, float]:
    """Update one entity with an event of `user` at `ts`; return (log accounts 24h, log failed 1h,
    log events 1h, log new accounts 24h, log OTHER accounts with a failed login in 7 days).

    The last one is the slow credential-stuffing ring: a device that tries a few accounts a day
    never reaches the 1-hour counters, but it is the same device across victims. Other accounts
    only, so a user who mistypes their own password does not count against themselves.

    Depends only on this entity's own events in replay order (plus the per-user `user_is_new`),
    which is what lets `seqguard.ray_engine` replay entities apart from users and join back.
    """
    if e is None:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    if e.last_ts and ts - e.last_ts > ENTITY_IDLE_RESET_MS:
        e.__init__()                     # idle past every window: starts again from empty
    if e.first_ts == 0:
        e.first_ts = ts
    dt = ts - e.last_ts if e.last_ts else 0
    k1h = _decay(dt, HOUR_MS)
    e.events_1h = e.events_1h * k1h + 1.0
    e.failed_1h = e.failed_1h * k1h + (1.0 if failed else 0.0)
    e.new_accounts_24h = e.new_accounts_24h * _decay(dt, DAY_MS) + (1.0 if user_is_new else 0.0)
    if ts > e.last_ts or e.last_ts - ts > ENTITY_CLOCK_RESET_MS:
        e.last_ts = ts
    _move_to_front(e.users, user, ts)
    horizon = ts - DAY_MS
    e.users = [p for p in e.users[:MAX_ENTITY_USERS] if p[1] >= horizon]
    fu = e.failed_users
    if failed:
        _move_to_front(fu, user, ts)
    others = 0
    if fu:
        horizon = ts - FAILED_ACCOUNTS_WINDOW_MS
        e.failed_users = fu = [p for p in fu[:MAX_ENTITY_USERS] if p[1] >= horizon]
        others = sum(1 for p in fu if p[0] != user)
    return (math.log1p(len(e.users)), math.log1p(e.failed_1h), math.log1p(e.events_1h),
            math.log1p(e.new_accounts_24h), math.log1p(others))


def entity_features(t: Tokens, user_is_new: bool, device: EntityContext | None,
                    ip: EntityContext | None, prefix: EntityContext | None) -> list[float]:
    """The 9 cross-user features of event t (FEATURE_NAMES from ENTITY_FEATURES_START); updates the entities."""
    failed = t.event_type == "login_failed"
    d_acc, d_fail, _, d_new, d_ring = touch_entity(device, t.ts, t.user, user_is_new, failed)
    i_acc, i_fail, i_ev, _, _ = touch_entity(ip, t.ts, t.user, user_is_new, failed)
    p_acc, p_fail, _, _, _ = touch_entity(prefix, t.ts, t.user, user_is_new, failed)
    return [d_acc, d_fail, d_new, i_acc, i_fail, i_ev, p_acc, p_fail, d_ring]


# --------------------------------------------------------------------------- featuriser

@dataclass
class Featurizer:
    """The old per-event featuriser (same vocabulary and hasher as the package's)."""
    vocab: Vocabulary
    hasher: TokenHasher

    # -- tokens
    def tokens(self, ev: Event) -> Tokens:
        from seqguard.featurizer import ip_prefix
        h = self.hasher
        return Tokens(ev.ts, self.vocab.id(ev.event_type), ev.event_type, ev.amount, h(ev.user_id),
                      h(ev.device_id), h(ev.ip), h(ip_prefix(ev.ip)), h(ev.country), h(ev.session_id))

    # -- the step
    def featurize(self, t: Tokens, u: UserContext, device: EntityContext | None = None,
                  ip: EntityContext | None = None, prefix: EntityContext | None = None) -> list[float]:
        """Features of event t given the contexts *before* it; updates the contexts in place.

        Entity contexts must be given when the event carries that entity (device/ip) for the
        cross-user features; they are None when the event has no such field.
        """
        return self.featurize_user(t, u, entity_features(t, u.n == 0, device, ip, prefix))

    def featurize_user(self, t: Tokens, u: UserContext, entity: list[float]) -> list[float]:
        """`featurize` given the event's 9 cross-user features (`entity_features`), computed
        here or by a separate pass; updates only the user context."""
        ts, et, amount = t.ts, t.event_type, t.amount
        first = u.n == 0
        if first:
            u.first_ts = ts
            gap_ms = 0
        else:
            gap_ms = max(0, ts - u.last_ts)
        log_gap = math.log1p(gap_ms / 1000.0)

        # decayed per-user counters (decay to now, then add this event)
        k1m, k1h, k24 = _decay(gap_ms, MINUTE_MS), _decay(gap_ms, HOUR_MS), _decay(gap_ms, DAY_MS)
        u.ev_1m = u.ev_1m * k1m + 1.0
        u.ev_1h = u.ev_1h * k1h + 1.0
        u.fail_login = u.fail_login * k1h + (1.0 if et == "login_failed" else 0.0)
        u.fail_pay = u.fail_pay * k1h + (1.0 if et == "payment_failed" else 0.0)
        is_payment = et in PAYMENTS
        has_amount = amount is not None
        u.pay_24h = u.pay_24h * k24 + (1.0 if et == "payment" else 0.0)
        u.amt_24h = u.amt_24h * k24 + (amount if (has_amount and et == "payment") else 0.0)
        u.coupon_24h = u.coupon_24h * k24 + (1.0 if et == "redeem_coupon" else 0.0)

        # amount relative to the user's own payment history (before this event)
        log_amt = math.log1p(amount) if has_amount else 0.0
        amount_z = amount_vs_max = 0.0
        if has_amount and is_payment and u.n_payments > 0:
            var = u.amt_m2 / u.n_payments
            amount_z = max(-5.0, min(5.0, (log_amt - u.amt_mean) / math.sqrt(var + 0.25)))
            amount_vs_max = max(-5.0, min(5.0, log_amt - u.amt_max))
        if has_amount and et in AMOUNT_STATS_TYPES:
            n = u.n_payments + 1
            d = log_amt - u.amt_mean
            u.amt_mean += d / n
            u.amt_m2 += d * (log_amt - u.amt_mean)
            u.amt_max = max(u.amt_max, log_amt)
        if et == "payment":
            u.n_payments += 1
        review_wo_purchase = 1.0 if (et == "review" and u.n_payments == 0) else 0.0
        if et == "review":
            u.n_reviews += 1

        # where from: device / country / IP prefix novelty for this user
        dev, cty, pfx = t.device, t.country, t.prefix
        new_device = device_changed = new_country = country_changed = new_pfx = pfx_changed = 0.0
        if dev:
            new_device = 1.0 if (_lru_touch(u.devices, dev, MAX_DEVICES) and not first) else 0.0
            device_changed = 1.0 if (u.last_device and dev != u.last_device) else 0.0
            u.last_device = dev
        if cty:
            new_country = 1.0 if (_lru_touch(u.countries, cty, MAX_COUNTRIES) and not first) else 0.0
            country_changed = 1.0 if (u.last_country and cty != u.last_country) else 0.0
            u.last_country = cty
        if pfx:
            new_pfx = 1.0 if (_lru_touch(u.prefixes, pfx, MAX_PREFIXES) and not first) else 0.0
            pfx_changed = 1.0 if (u.last_prefix and pfx != u.last_prefix) else 0.0
            u.last_prefix = pfx

        # account changes shortly before a payment
        recent_change = 0.0
        if u.last_change_ts:
            recent_change = _decay(max(0, ts - u.last_change_ts), HOUR_MS)
        if et in ACCOUNT_CHANGES:
            u.last_change_ts = ts

        # timing regularity: EWMA mean/variance of log gaps (bots are machine-regular)
        if not first:
            if u.n == 1:
                u.gap_mean, u.gap_var = log_gap, 1.0
            else:
                d = log_gap - u.gap_mean
                u.gap_mean += GAP_EWMA_ALPHA * d
                u.gap_var = (1.0 - GAP_EWMA_ALPHA) * (u.gap_var + GAP_EWMA_ALPHA * d * d)
        gap_std = math.sqrt(u.gap_var) if u.n >= 1 else 1.0
        # fast timing regularity: EWMA of |log gap - previous log gap| (a script's cadence shows within
        # a handful of events; a person's consecutive gaps differ by ~1 on this scale)
        if u.n >= 2:
            u.gap_jitter += JITTER_ALPHA * (abs(log_gap - u.last_log_gap) - u.gap_jitter)
        u.last_log_gap = log_gap

        # sessions
        new_session = 0.0
        if t.session != u.last_session or first:
            new_session = 1.0
            u.session_events = 0
            u.last_session = t.session
        u.session_events += 1

        age_h = (ts - u.first_ts) / HOUR_MS if ts > u.first_ts else 0.0
        u.n += 1
        if ts > u.last_ts:
            u.last_ts = ts
        u.last_type = t.type_id

        return [
            1.0 if first else 0.0, log_gap, math.log1p(age_h), math.log1p(u.n - 1),
            1.0 if has_amount else 0.0, log_amt, amount_z, amount_vs_max,
            1.0 if dev else 0.0, new_device, device_changed, math.log1p(len(u.devices)),
            1.0 if cty else 0.0, new_country, country_changed,
            1.0 if pfx else 0.0, new_pfx, pfx_changed,
            math.log1p(u.ev_1m), math.log1p(u.ev_1h), math.log1p(u.fail_login), math.log1p(u.fail_pay),
            math.log1p(u.pay_24h), math.log1p(u.amt_24h), math.log1p(u.coupon_24h),
            recent_change, u.gap_mean, gap_std,
            review_wo_purchase, math.log1p(u.n_reviews) - math.log1p(u.n_payments),
            math.log1p(u.session_events), new_session, *entity, u.gap_jitter,
        ]


class ContextStore:
    """In-memory contexts for offline replay (the gateway keeps the same structs in Redis)."""

    def __init__(self):
        self.users: dict[int, UserContext] = {}
        self.devices: dict[int, EntityContext] = {}
        self.ips: dict[int, EntityContext] = {}
        self.prefixes: dict[int, EntityContext] = {}

    @staticmethod
    def _get(table: dict, key: int, factory):
        if not key:
            return None
        c = table.get(key)
        if c is None:
            c = table[key] = factory()
        return c

    def contexts_for(self, t: Tokens):
        return (self._get(self.users, t.user, UserContext), self._get(self.devices, t.device, EntityContext),
                self._get(self.ips, t.ip, EntityContext), self._get(self.prefixes, t.prefix, EntityContext))


def featurize_log(featurizer: Featurizer, events: list[Event], store: ContextStore | None = None,
                  progress: bool = False, order=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replay events in global (ts, position) order; return (order, type_ids, features) in that order.

    `order[k]` is the index into `events` of the k-th replayed event. Rows are float32 exactly as
    the online gateway computes them for the same event stream. `order` replays in another
    order instead (e.g. the order a gateway applied the events, from its sequence numbers).
    """
    store = store or ContextStore()
    if order is None:
        order = sorted(range(len(events)), key=lambda i: (events[i].ts, i))
    order = np.asarray(order, dtype=np.int64)
    type_ids = np.empty(len(events), dtype=np.int64)
    feats = np.empty((len(events), N_FEATURES), dtype=np.float32)
    it = order
    if progress:
        from tqdm import tqdm
        it = tqdm(order, desc="featurise", unit="ev", mininterval=1.0, leave=False)
    rows = []
    tok = featurizer.tokens
    fz = featurizer.featurize
    ctx = store.contexts_for
    for k, i in enumerate(it):
        t = tok(events[i])
        type_ids[k] = t.type_id
        rows.append(fz(t, *ctx(t)))
        if len(rows) == 65536:
            feats[k + 1 - len(rows):k + 1] = rows
            rows = []
    if rows:
        feats[len(events) - len(rows):] = rows
    return order, type_ids, feats
