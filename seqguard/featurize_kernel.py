"""The featuriser's per-event arithmetic, compiled: one call featurises a whole batch of events.

Why numba (`@njit(cache=True)`): it is a pip wheel (no compiler or build step in our install, so
`scripts/setup.sh` and a read-only site-packages keep working), it compiles this plain-Python
arithmetic to machine code with the same IEEE operations and the same libm calls (exp, log1p,
sqrt) as CPython's `math`, so rows stay bit-identical to the Python featuriser that preceded it
(tests/test_featurizer_kernel.py replays a generated log through both), and it is well kept.
No fastmath: it would let LLVM reassociate and change bits.

Contexts are rows of four dense tables, the kernel reads and writes them in place:
  users     UI int64 [n, N_UI]  (counters, timestamps, token hashes, the three LRU lists)
            UF float64 [n, N_UF] (decayed counters, amount and gap statistics)
  entities  EI int64 [n, N_EI]  (first/last ts, the two [user hash, ts] lists, 32 pairs each)
            EF float64 [n, N_EF] (decayed events / failures / new accounts)
The field order mirrors the Redis byte layout (`featurizer.UserContext.to_bytes`), which is
unchanged. An event names its rows by index (-1: the event has no such entity).

The on-disk cache lives next to this file when it is writable; otherwise (a read-only install)
under NUMBA_CACHE_DIR, default `$XDG_CACHE_HOME/seqguard-numba` or a per-user temp directory
(`configure_cache`). Without a cache the first call compiles (~seconds, measured in BENCHMARKS.md).
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np


def configure_cache() -> None:
    """Point numba's cache somewhere writable when this package directory is not (read-only installs)."""
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.access(base if os.path.isdir(base) else os.path.dirname(base), os.W_OK):
        base = os.path.join(tempfile.gettempdir(), f"seqguard-{os.getuid()}")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, "seqguard-numba")


configure_cache()

from numba import njit  # noqa: E402  (after the cache directory is chosen: numba reads it at import)

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
MAX_DEVICES, MAX_COUNTRIES, MAX_PREFIXES = 8, 4, 8
MAX_ENTITY_USERS = 32
FAILED_ACCOUNTS_WINDOW_MS = 7 * DAY_MS    # slow stuffing rings reuse a device for days, not hours
GAP_EWMA_ALPHA = 0.1
JITTER_ALPHA = 0.3                 # gap_jitter: about the last 5-6 gaps (gap_std needs ~40 events to settle)
JITTER_PRIOR = 2.0                 # gap_jitter before a user has two gaps: "irregular" (humans average ~1)
N_FEATURES = 42
N_ENTITY_FEATURES = 9
ENTITY_FEATURES_START = 32

# event-type flags (the featuriser reacts to type NAMES, so a team's own ids do not matter)
FLAG_LOGIN_FAILED = 1
FLAG_PAYMENT_FAILED = 2
FLAG_PAYMENT = 4            # "payment": counts, amount statistics
FLAG_PAYMENTS = 8           # "payment" or "checkout": amount compared with the user's history
FLAG_REVIEW = 16
FLAG_ACCOUNT_CHANGE = 32
FLAG_COUPON = 64

# user ints (UI), in the Redis layout's order after its version byte
(U_N, U_FIRST_TS, U_LAST_TS, U_LAST_CHANGE_TS, U_LAST_DEVICE, U_LAST_COUNTRY, U_LAST_PREFIX, U_LAST_SESSION,
 U_SESSION_EVENTS, U_N_PAYMENTS, U_N_REVIEWS, U_LAST_TYPE, U_N_DEVICES, U_N_COUNTRIES, U_N_PREFIXES) = range(15)
U_DEVICES = 15
U_COUNTRIES = U_DEVICES + MAX_DEVICES
U_PREFIXES = U_COUNTRIES + MAX_COUNTRIES
N_UI = U_PREFIXES + MAX_PREFIXES
# user floats (UF), in the Redis layout's order
(F_EV_1M, F_EV_1H, F_FAIL_LOGIN, F_FAIL_PAY, F_PAY_24H, F_AMT_24H, F_COUPON_24H, F_AMT_MEAN, F_AMT_M2, F_AMT_MAX,
 F_GAP_MEAN, F_GAP_VAR, F_LAST_LOG_GAP, F_GAP_JITTER, F_RESERVED) = range(15)   # F_RESERVED: always 0, kept for the layout
N_UF = 15
# entity ints (EI): [user hash, ts] pairs, most recent first
E_FIRST_TS, E_LAST_TS, E_N_USERS, E_N_FAILED = range(4)
E_USERS = 4
E_FAILED = E_USERS + 2 * MAX_ENTITY_USERS
N_EI = E_FAILED + 2 * MAX_ENTITY_USERS
# entity floats (EF)
G_EVENTS_1H, G_FAILED_1H, G_NEW_ACCOUNTS_24H, G_RESERVED = range(4)          # G_RESERVED: always 0, kept for the layout
N_EF = 4


def new_user_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n fresh user contexts (gap_jitter starts at its prior, everything else at zero)."""
    uf = np.zeros((n, N_UF), np.float64)
    uf[:, F_GAP_JITTER] = JITTER_PRIOR
    return np.zeros((n, N_UI), np.int64), uf


def new_entity_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, N_EI), np.int64), np.zeros((n, N_EF), np.float64)


# --------------------------------------------------------------------------- pieces

# A shared entity's clock (its last-seen time) follows its newest event, so one event stamped far in the
# future would stop the decay of the device's or IP's counters for every user on it until real time caught
# up. An event more than this far BEHIND the clock therefore resets it: a single outlier then holds the
# clock until the next ordinary event, not for as long as it lies. Replay in time order never steps
# back, so offline features are unchanged by this rule; online, a late event reorders time just once.
ENTITY_CLOCK_RESET_MS = 3_600_000

# An entity idle for longer than its longest window (the 7-day failed-login list) plus a day starts
# again from empty: everything it still held has decayed or left its window, and the gateway can let
# Redis expire the key after this long (state.ENTITY_TTL_S) instead of keeping every IP a user ever
# used for the whole user TTL. Offline replay applies the same rule, so both see the same features.
ENTITY_IDLE_RESET_MS = 8 * 86_400_000


@njit(cache=True)
def _decay(dt_ms, tau_ms):
    return math.exp(-dt_ms / tau_ms) if dt_ms > 0 else 1.0


@njit(cache=True)
def _lru_touch(UI, u, base, count_col, cap, value):
    """Move value to the front of the user's list; True if it was not there (new)."""
    n = UI[u, count_col]
    for j in range(n):
        if UI[u, base + j] == value:
            for k in range(j, 0, -1):
                UI[u, base + k] = UI[u, base + k - 1]
            UI[u, base] = value
            return False
    m = min(n + 1, cap)
    for k in range(m - 1, 0, -1):
        UI[u, base + k] = UI[u, base + k - 1]
    UI[u, base] = value
    UI[u, count_col] = m
    return True


@njit(cache=True)
def _refresh_pairs(EI, r, base, count_col, user, ts, insert, horizon, buf):
    """One of an entity's [user, ts] lists: optionally (user, ts) moved to the front (replacing the
    user's entry), then the first MAX_ENTITY_USERS kept if their ts >= horizon. Returns the length."""
    n = EI[r, count_col]
    m = 0
    if insert:
        buf[0] = user
        buf[1] = ts
        m = 1
    removed = False
    for j in range(n):
        pu = EI[r, base + 2 * j]
        if insert and not removed and pu == user:
            removed = True
            continue
        buf[2 * m] = pu
        buf[2 * m + 1] = EI[r, base + 2 * j + 1]
        m += 1
    m = min(m, MAX_ENTITY_USERS)
    kept = 0
    for j in range(m):
        if buf[2 * j + 1] >= horizon:
            EI[r, base + 2 * kept] = buf[2 * j]
            EI[r, base + 2 * kept + 1] = buf[2 * j + 1]
            kept += 1
    EI[r, count_col] = kept
    return kept


@njit(cache=True)
def touch_entity(EI, EF, r, ts, user, user_is_new, failed, buf, out):
    """Entity row r sees an event of `user` at `ts`; out[:5] = (log accounts 24h, log failed 1h,
    log events 1h, log new accounts 24h, log OTHER accounts with a failed login in 7 days).

    The last one is the slow credential-stuffing ring: a device that tries a few accounts a day never
    reaches the 1-hour counters, but it is the same device across victims. Other accounts only, so a
    user who mistypes their own password does not count against themselves. Depends only on this
    entity's own events in replay order (plus the per-user `user_is_new`), which is what lets
    `seqguard.ray_engine` replay entities apart from users and join back.
    """
    if EI[r, E_LAST_TS] != 0 and ts - EI[r, E_LAST_TS] > ENTITY_IDLE_RESET_MS:
        EI[r, :] = 0
        EF[r, :] = 0.0
    if EI[r, E_FIRST_TS] == 0:
        EI[r, E_FIRST_TS] = ts
    last = EI[r, E_LAST_TS]
    dt = ts - last if last != 0 else 0
    k1h = _decay(dt, HOUR_MS)
    EF[r, G_EVENTS_1H] = EF[r, G_EVENTS_1H] * k1h + 1.0
    EF[r, G_FAILED_1H] = EF[r, G_FAILED_1H] * k1h + (1.0 if failed else 0.0)
    EF[r, G_NEW_ACCOUNTS_24H] = EF[r, G_NEW_ACCOUNTS_24H] * _decay(dt, DAY_MS) + (1.0 if user_is_new else 0.0)
    if ts > last or last - ts > ENTITY_CLOCK_RESET_MS:
        EI[r, E_LAST_TS] = ts
    n_users = _refresh_pairs(EI, r, E_USERS, E_N_USERS, user, ts, True, ts - DAY_MS, buf)
    n_failed = _refresh_pairs(EI, r, E_FAILED, E_N_FAILED, user, ts, failed, ts - FAILED_ACCOUNTS_WINDOW_MS, buf)
    others = 0
    for j in range(n_failed):
        if EI[r, E_FAILED + 2 * j] != user:
            others += 1
    out[0] = math.log1p(n_users)
    out[1] = math.log1p(EF[r, G_FAILED_1H])
    out[2] = math.log1p(EF[r, G_EVENTS_1H])
    out[3] = math.log1p(EF[r, G_NEW_ACCOUNTS_24H])
    out[4] = math.log1p(others)


@njit(cache=True)
def _update_counters(UF, u, gap_ms, flags, amount, has_amount):
    """Decay the user's counters to this event's time, then count it."""
    k1m, k1h, k24 = _decay(gap_ms, MINUTE_MS), _decay(gap_ms, HOUR_MS), _decay(gap_ms, DAY_MS)
    is_pay = (flags & FLAG_PAYMENT) != 0
    UF[u, F_EV_1M] = UF[u, F_EV_1M] * k1m + 1.0
    UF[u, F_EV_1H] = UF[u, F_EV_1H] * k1h + 1.0
    UF[u, F_FAIL_LOGIN] = UF[u, F_FAIL_LOGIN] * k1h + (1.0 if flags & FLAG_LOGIN_FAILED else 0.0)
    UF[u, F_FAIL_PAY] = UF[u, F_FAIL_PAY] * k1h + (1.0 if flags & FLAG_PAYMENT_FAILED else 0.0)
    UF[u, F_PAY_24H] = UF[u, F_PAY_24H] * k24 + (1.0 if is_pay else 0.0)
    UF[u, F_AMT_24H] = UF[u, F_AMT_24H] * k24 + (amount if (has_amount and is_pay) else 0.0)
    UF[u, F_COUPON_24H] = UF[u, F_COUPON_24H] * k24 + (1.0 if flags & FLAG_COUPON else 0.0)


@njit(cache=True)
def _amount_features(UI, UF, u, flags, amount, has_amount):
    """(log amount, amount_z, amount_vs_max): the amount against the user's own payment history
    BEFORE this event; then a payment joins that history."""
    is_payment = (flags & FLAG_PAYMENTS) != 0
    is_pay = (flags & FLAG_PAYMENT) != 0
    log_amt = math.log1p(amount) if has_amount else 0.0
    amount_z = 0.0
    amount_vs_max = 0.0
    n_pay = UI[u, U_N_PAYMENTS]
    if has_amount and is_payment and n_pay > 0:
        var = UF[u, F_AMT_M2] / n_pay
        amount_z = max(-5.0, min(5.0, (log_amt - UF[u, F_AMT_MEAN]) / math.sqrt(var + 0.25)))
        amount_vs_max = max(-5.0, min(5.0, log_amt - UF[u, F_AMT_MAX]))
    if has_amount and is_pay:                      # AMOUNT_STATS_TYPES: payments only
        n = n_pay + 1
        d = log_amt - UF[u, F_AMT_MEAN]
        UF[u, F_AMT_MEAN] += d / n
        UF[u, F_AMT_M2] += d * (log_amt - UF[u, F_AMT_MEAN])
        UF[u, F_AMT_MAX] = max(UF[u, F_AMT_MAX], log_amt)
    if is_pay:
        UI[u, U_N_PAYMENTS] += 1
    return log_amt, amount_z, amount_vs_max


@njit(cache=True)
def _novelty(UI, u, value, first, base, count_col, capacity, last_col):
    """(new to this user, changed since the user's previous event) for a device, country or IP
    prefix id (0: the event has none); remembers it in the user's recently-seen list."""
    if value == 0:
        return 0.0, 0.0
    is_new = 1.0 if (_lru_touch(UI, u, base, count_col, capacity, value) and not first) else 0.0
    changed = 1.0 if (UI[u, last_col] != 0 and value != UI[u, last_col]) else 0.0
    UI[u, last_col] = value
    return is_new, changed


@njit(cache=True)
def _timing_regularity(UF, u, n_before, log_gap):
    """gap_std after this gap: EWMA mean/variance of log gaps (bots are machine-regular); also moves
    the fast regularity, gap_jitter = EWMA of |log gap - previous log gap| (a script's cadence shows
    within a handful of events; a person's consecutive gaps differ by ~1 on this scale)."""
    if n_before >= 1:
        if n_before == 1:
            UF[u, F_GAP_MEAN] = log_gap
            UF[u, F_GAP_VAR] = 1.0
        else:
            d = log_gap - UF[u, F_GAP_MEAN]
            UF[u, F_GAP_MEAN] += GAP_EWMA_ALPHA * d
            UF[u, F_GAP_VAR] = (1.0 - GAP_EWMA_ALPHA) * (UF[u, F_GAP_VAR] + GAP_EWMA_ALPHA * d * d)
    gap_std = math.sqrt(UF[u, F_GAP_VAR]) if n_before >= 1 else 1.0
    if n_before >= 2:
        UF[u, F_GAP_JITTER] += JITTER_ALPHA * (abs(log_gap - UF[u, F_LAST_LOG_GAP]) - UF[u, F_GAP_JITTER])
    UF[u, F_LAST_LOG_GAP] = log_gap
    return gap_std


@njit(cache=True)
def user_step(UI, UF, u, ts, type_id, flags, amount, dev, cty, pfx, session, entity, row):
    """The user half of the featuriser: features of one event given the user's row *before* it and
    its 9 cross-user features; writes the N_FEATURES outputs to `row` and updates the row in place.
    `amount` is NaN when the event has none."""
    first = UI[u, U_N] == 0
    if first:
        UI[u, U_FIRST_TS] = ts
        gap_ms = 0
    else:
        gap_ms = max(0, ts - UI[u, U_LAST_TS])
    log_gap = math.log1p(gap_ms / 1000.0)
    has_amount = not math.isnan(amount)
    _update_counters(UF, u, gap_ms, flags, amount, has_amount)
    log_amt, amount_z, amount_vs_max = _amount_features(UI, UF, u, flags, amount, has_amount)
    is_review = (flags & FLAG_REVIEW) != 0
    review_wo_purchase = 1.0 if (is_review and UI[u, U_N_PAYMENTS] == 0) else 0.0
    if is_review:
        UI[u, U_N_REVIEWS] += 1
    new_device, device_changed = _novelty(UI, u, dev, first, U_DEVICES, U_N_DEVICES, MAX_DEVICES, U_LAST_DEVICE)
    new_country, country_changed = _novelty(UI, u, cty, first, U_COUNTRIES, U_N_COUNTRIES, MAX_COUNTRIES,
                                            U_LAST_COUNTRY)
    new_pfx, pfx_changed = _novelty(UI, u, pfx, first, U_PREFIXES, U_N_PREFIXES, MAX_PREFIXES, U_LAST_PREFIX)
    # account changes shortly before a payment
    recent_change = 0.0
    if UI[u, U_LAST_CHANGE_TS] != 0:
        recent_change = _decay(max(0, ts - UI[u, U_LAST_CHANGE_TS]), HOUR_MS)
    if flags & FLAG_ACCOUNT_CHANGE:
        UI[u, U_LAST_CHANGE_TS] = ts
    n_before = UI[u, U_N]
    gap_std = _timing_regularity(UF, u, n_before, log_gap)
    new_session = 0.0
    if session != UI[u, U_LAST_SESSION] or first:
        new_session = 1.0
        UI[u, U_SESSION_EVENTS] = 0
        UI[u, U_LAST_SESSION] = session
    UI[u, U_SESSION_EVENTS] += 1
    first_ts = UI[u, U_FIRST_TS]
    age_h = (ts - first_ts) / HOUR_MS if ts > first_ts else 0.0
    UI[u, U_N] = n_before + 1
    if ts > UI[u, U_LAST_TS]:
        UI[u, U_LAST_TS] = ts
    UI[u, U_LAST_TYPE] = type_id

    row[0] = 1.0 if first else 0.0
    row[1] = log_gap
    row[2] = math.log1p(age_h)
    row[3] = math.log1p(n_before)
    row[4] = 1.0 if has_amount else 0.0
    row[5] = log_amt
    row[6] = amount_z
    row[7] = amount_vs_max
    row[8] = 1.0 if dev != 0 else 0.0
    row[9] = new_device
    row[10] = device_changed
    row[11] = math.log1p(UI[u, U_N_DEVICES])
    row[12] = 1.0 if cty != 0 else 0.0
    row[13] = new_country
    row[14] = country_changed
    row[15] = 1.0 if pfx != 0 else 0.0
    row[16] = new_pfx
    row[17] = pfx_changed
    row[18] = math.log1p(UF[u, F_EV_1M])
    row[19] = math.log1p(UF[u, F_EV_1H])
    row[20] = math.log1p(UF[u, F_FAIL_LOGIN])
    row[21] = math.log1p(UF[u, F_FAIL_PAY])
    row[22] = math.log1p(UF[u, F_PAY_24H])
    row[23] = math.log1p(UF[u, F_AMT_24H])
    row[24] = math.log1p(UF[u, F_COUPON_24H])
    row[25] = recent_change
    row[26] = UF[u, F_GAP_MEAN]
    row[27] = gap_std
    row[28] = review_wo_purchase
    row[29] = math.log1p(UI[u, U_N_REVIEWS]) - math.log1p(UI[u, U_N_PAYMENTS])
    row[30] = math.log1p(UI[u, U_SESSION_EVENTS])
    row[31] = new_session
    for j in range(N_ENTITY_FEATURES):
        row[ENTITY_FEATURES_START + j] = entity[j]
    row[N_FEATURES - 1] = UF[u, F_GAP_JITTER]


# --------------------------------------------------------------------------- batch kernels

@njit(cache=True)
def featurize_events(ts, type_id, flags, amount, user, device, country, prefix, session,
                     u_row, d_row, i_row, p_row, UI, UF, EI, EF, out):
    """Featurise events 0..n-1 in the given order: out[k] = features of event k (float32 rows as
    every path stores them), the user rows UI/UF and entity rows EI/EF updated in place.

    Per event: the device, IP and IP-prefix entity rows (d_row/i_row/p_row, -1 = none) are touched
    first, then the user's row u_row; user/device/country/prefix/session are the keyed token hashes.
    """
    buf = np.empty(2 * (MAX_ENTITY_USERS + 1), np.int64)
    five = np.empty(5, np.float64)
    entity = np.empty(N_ENTITY_FEATURES, np.float64)
    row = np.empty(N_FEATURES, np.float64)
    for k in range(len(ts)):
        u = u_row[k]
        is_new = UI[u, U_N] == 0
        failed = (flags[k] & FLAG_LOGIN_FAILED) != 0
        entity[:] = 0.0
        r = d_row[k]
        if r >= 0:
            touch_entity(EI, EF, r, ts[k], user[k], is_new, failed, buf, five)
            entity[0], entity[1], entity[2], entity[8] = five[0], five[1], five[3], five[4]
        r = i_row[k]
        if r >= 0:
            touch_entity(EI, EF, r, ts[k], user[k], is_new, failed, buf, five)
            entity[3], entity[4], entity[5] = five[0], five[1], five[2]
        r = p_row[k]
        if r >= 0:
            touch_entity(EI, EF, r, ts[k], user[k], is_new, failed, buf, five)
            entity[6], entity[7] = five[0], five[1]
        user_step(UI, UF, u, ts[k], type_id[k], flags[k], amount[k], device[k], country[k], prefix[k],
                  session[k], entity, row)
        for j in range(N_FEATURES):
            out[k, j] = row[j]


@njit(cache=True)
def featurize_users(ts, type_id, flags, amount, device, country, prefix, session, u_row, entity, UI, UF, out):
    """The user half alone, given each event's 9 cross-user features (`entity`, float64 [n, 9],
    from `touch_entities`): the Ray engine's per-user-partition pass."""
    row = np.empty(N_FEATURES, np.float64)
    for k in range(len(ts)):
        user_step(UI, UF, u_row[k], ts[k], type_id[k], flags[k], amount[k], device[k], country[k], prefix[k],
                  session[k], entity[k], row)
        for j in range(N_FEATURES):
            out[k, j] = row[j]


@njit(cache=True)
def touch_entities(rows, ts, user, is_new, failed, EI, EF, out):
    """The entity half alone for one entity kind: out[k] = touch_entity's five outputs for event k
    on entity row rows[k] (events in global replay order): the Ray engine's per-entity pass."""
    buf = np.empty(2 * (MAX_ENTITY_USERS + 1), np.int64)
    five = np.empty(5, np.float64)
    for k in range(len(ts)):
        touch_entity(EI, EF, rows[k], ts[k], user[k], is_new[k], failed[k], buf, five)
        for j in range(5):
            out[k, j] = five[j]


# --------------------------------------------------------------------------- Redis bytes, in bulk
# The byte layout is featurizer.UserContext / EntityContext's: a version byte, a
# packed little-endian head, then the variable lists. Decoding and encoding many contexts is one
# call each, so a gateway batch never touches a context field from Python.

USER_HEAD_SIZE = 181           # struct "<BIqqqIIIIIIII" + 15 d
ENTITY_HEAD_SIZE = 50          # struct "<Bqqdddd B"
PAIR_SIZE = 12                 # "<Iq"


@njit(cache=True)
def _load(buf, o, nbytes):
    """Little-endian integer of nbytes at buf[o:] (8 bytes: two's complement int64)."""
    v = np.uint64(0)
    for j in range(nbytes):
        v |= np.uint64(buf[o + j]) << np.uint64(8 * j)
    return np.int64(v)


@njit(cache=True)
def _store(buf, o, nbytes, value):
    v = np.uint64(value)
    for j in range(nbytes):
        buf[o + j] = np.uint8((v >> np.uint64(8 * j)) & np.uint64(0xFF))


@njit(cache=True)
def _load_f64(buf, o, scratch):
    for j in range(8):
        scratch[j] = buf[o + j]
    return scratch.view(np.float64)[0]


@njit(cache=True)
def _store_f64(buf, o, value, scratch):
    scratch.view(np.float64)[0] = value
    for j in range(8):
        buf[o + j] = scratch[j]


@njit(cache=True)
def decode_users(buf, offsets, UI, UF, version):
    """Blob k = buf[offsets[k]:offsets[k + 1]] (empty: a new user) -> row k of UI/UF. Returns -1, or
    the index of the first blob that is not a `version` context of its length (not decoded)."""
    scratch = np.empty(8, np.uint8)
    for k in range(len(offsets) - 1):
        o = offsets[k]
        size = offsets[k + 1] - o
        UI[k, :] = 0
        UF[k, :] = 0.0
        UF[k, F_GAP_JITTER] = JITTER_PRIOR
        if size == 0:
            continue
        if buf[o] != version or size < USER_HEAD_SIZE + 3:
            return k
        nd, nc, npf = buf[o + USER_HEAD_SIZE], buf[o + USER_HEAD_SIZE + 1], buf[o + USER_HEAD_SIZE + 2]
        if (nd > MAX_DEVICES or nc > MAX_COUNTRIES or npf > MAX_PREFIXES
                or size < USER_HEAD_SIZE + 3 + 4 * (np.int64(nd) + nc + npf)):
            return k
        UI[k, U_N] = _load(buf, o + 1, 4)
        for j in range(3):                                   # first_ts, last_ts, last_change_ts
            UI[k, U_FIRST_TS + j] = _load(buf, o + 5 + 8 * j, 8)
        for j in range(8):                                   # last_device .. last_type
            UI[k, U_LAST_DEVICE + j] = _load(buf, o + 29 + 4 * j, 4)
        for j in range(N_UF):
            UF[k, j] = _load_f64(buf, o + 61 + 8 * j, scratch)
        p = o + USER_HEAD_SIZE + 3
        for j, (count_col, base) in enumerate(((U_N_DEVICES, U_DEVICES), (U_N_COUNTRIES, U_COUNTRIES),
                                                (U_N_PREFIXES, U_PREFIXES))):
            n = np.int64(buf[o + USER_HEAD_SIZE + j])
            UI[k, count_col] = n
            for i in range(n):
                UI[k, base + i] = _load(buf, p, 4)
                p += 4
    return -1


@njit(cache=True)
def encode_users(UI, UF, version):
    """Rows of UI/UF -> (bytes buffer, offsets): context k is buf[offsets[k]:offsets[k + 1]]."""
    n = UI.shape[0]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for k in range(n):
        offsets[k + 1] = offsets[k] + USER_HEAD_SIZE + 3 + 4 * (UI[k, U_N_DEVICES] + UI[k, U_N_COUNTRIES]
                                                                 + UI[k, U_N_PREFIXES])
    buf = np.empty(offsets[n], np.uint8)
    scratch = np.empty(8, np.uint8)
    for k in range(n):
        o = offsets[k]
        buf[o] = version
        _store(buf, o + 1, 4, UI[k, U_N])
        for j in range(3):
            _store(buf, o + 5 + 8 * j, 8, UI[k, U_FIRST_TS + j])
        for j in range(8):
            _store(buf, o + 29 + 4 * j, 4, UI[k, U_LAST_DEVICE + j])
        for j in range(N_UF):
            _store_f64(buf, o + 61 + 8 * j, UF[k, j], scratch)
        p = o + USER_HEAD_SIZE + 3
        for j, (count_col, base) in enumerate(((U_N_DEVICES, U_DEVICES), (U_N_COUNTRIES, U_COUNTRIES),
                                                (U_N_PREFIXES, U_PREFIXES))):
            cnt = UI[k, count_col]
            buf[o + USER_HEAD_SIZE + j] = cnt
            for i in range(cnt):
                _store(buf, p, 4, UI[k, base + i])
                p += 4
    return buf, offsets


@njit(cache=True)
def decode_entities(buf, offsets, EI, EF, version):
    """As decode_users, for entity contexts."""
    scratch = np.empty(8, np.uint8)
    for k in range(len(offsets) - 1):
        o = offsets[k]
        end = offsets[k + 1]
        EI[k, :] = 0
        EF[k, :] = 0.0
        if end == o:
            continue
        if buf[o] != version or end - o < ENTITY_HEAD_SIZE:
            return k
        n = np.int64(buf[o + 49])
        if n > MAX_ENTITY_USERS or end - o < ENTITY_HEAD_SIZE + PAIR_SIZE * n + 1:
            return k
        nf = np.int64(buf[o + ENTITY_HEAD_SIZE + PAIR_SIZE * n])
        if nf > MAX_ENTITY_USERS or end - o < ENTITY_HEAD_SIZE + PAIR_SIZE * n + 1 + PAIR_SIZE * nf:
            return k
        EI[k, E_FIRST_TS] = _load(buf, o + 1, 8)
        EI[k, E_LAST_TS] = _load(buf, o + 9, 8)
        for j in range(N_EF):
            EF[k, j] = _load_f64(buf, o + 17 + 8 * j, scratch)
        n = np.int64(buf[o + 49])
        EI[k, E_N_USERS] = n
        p = o + ENTITY_HEAD_SIZE
        for i in range(n):
            EI[k, E_USERS + 2 * i] = _load(buf, p, 4)
            EI[k, E_USERS + 2 * i + 1] = _load(buf, p + 4, 8)
            p += PAIR_SIZE
        nf = np.int64(buf[p])
        EI[k, E_N_FAILED] = nf
        p += 1
        for i in range(nf):
            EI[k, E_FAILED + 2 * i] = _load(buf, p, 4)
            EI[k, E_FAILED + 2 * i + 1] = _load(buf, p + 4, 8)
            p += PAIR_SIZE
    return -1


@njit(cache=True)
def encode_entities(EI, EF, version):
    n = EI.shape[0]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for k in range(n):
        offsets[k + 1] = offsets[k] + ENTITY_HEAD_SIZE + 1 + PAIR_SIZE * (EI[k, E_N_USERS] + EI[k, E_N_FAILED])
    buf = np.empty(offsets[n], np.uint8)
    scratch = np.empty(8, np.uint8)
    for k in range(n):
        o = offsets[k]
        buf[o] = version
        _store(buf, o + 1, 8, EI[k, E_FIRST_TS])
        _store(buf, o + 9, 8, EI[k, E_LAST_TS])
        for j in range(N_EF):
            _store_f64(buf, o + 17 + 8 * j, EF[k, j], scratch)
        nu = EI[k, E_N_USERS]
        buf[o + 49] = nu
        p = o + ENTITY_HEAD_SIZE
        for i in range(nu):
            _store(buf, p, 4, EI[k, E_USERS + 2 * i])
            _store(buf, p + 4, 8, EI[k, E_USERS + 2 * i + 1])
            p += PAIR_SIZE
        nf = EI[k, E_N_FAILED]
        buf[p] = nf
        p += 1
        for i in range(nf):
            _store(buf, p, 4, EI[k, E_FAILED + 2 * i])
            _store(buf, p + 4, 8, EI[k, E_FAILED + 2 * i + 1])
            p += PAIR_SIZE
    return buf, offsets


@njit(cache=True)
def featurize_blobs(ts, type_id, flags, amount, user, device, country, prefix, session, u_row, d_row, i_row, p_row,
                    ubuf, uoff, ebuf, eoff, version, out):
    """decode_users + decode_entities + featurize_events + encode_users + encode_entities in one call
    (a gateway batch's contexts straight from and back to their Redis bytes). Returns (-1 or the
    index of a corrupt user blob, -1 or of a corrupt entity blob, user bytes, user offsets, entity
    bytes, entity offsets); nothing is featurised when a blob is corrupt."""
    UI = np.empty((len(uoff) - 1, N_UI), np.int64)
    UF = np.empty((len(uoff) - 1, N_UF), np.float64)
    EI = np.empty((len(eoff) - 1, N_EI), np.int64)
    EF = np.empty((len(eoff) - 1, N_EF), np.float64)
    bad_u = decode_users(ubuf, uoff, UI, UF, version)
    bad_e = decode_entities(ebuf, eoff, EI, EF, version)
    if bad_u >= 0 or bad_e >= 0:
        z = np.empty(0, np.uint8)
        zo = np.zeros(1, np.int64)
        return bad_u, bad_e, z, zo, z, zo
    featurize_events(ts, type_id, flags, amount, user, device, country, prefix, session, u_row, d_row, i_row, p_row,
                     UI, UF, EI, EF, out)
    ub, uo = encode_users(UI, UF, version)
    eb, eo = encode_entities(EI, EF, version)
    return -1, -1, ub, uo, eb, eo
