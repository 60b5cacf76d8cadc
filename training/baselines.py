"""Two baselines scored on the same events as the model, for `seqguard evaluate`.

* `hand_rules_score`: what a fraud rule engine does. The shipped rules pack
  (configs/rules/default.toml, evaluated by seqguard/rules.py) over the SHARED featuriser's
  outputs (so the rules see exactly the signals the model sees), each rule hit adding a
  hand-chosen score. Nothing is fitted, least of all to labels.
* `user_aggregate_iforest_score`: the classic "aggregate features + IsolationForest" set-up:
  per-user (and per-device / per-IP) aggregates computed cumulatively up to and including
  each event, an IsolationForest fitted unsupervised on the evaluated log itself. Fully
  numpy-vectorised (group-wise cumulative sums over a (user, ts) sort), ~1M events in seconds.

Both return one float per event, higher = riskier, in INPUT order.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from seqguard.featurizer import ACCOUNT_CHANGES, HOUR_MS, ip_prefix
from seqguard.rules import DEFAULT_RULES_PATH, RuleInputs, RuleSet, load_rules, ranked_score
from seqguard.schema import Event


@functools.lru_cache(maxsize=1)
def default_rules() -> RuleSet:
    """The shipped rules pack (configs/rules/default.toml): today's hand rules, loaded once."""
    return load_rules(DEFAULT_RULES_PATH)


def rule_hits(events: Sequence[Event], feats: np.ndarray, rules: RuleSet | None = None) -> dict[str, np.ndarray]:
    """Boolean hit vector per rule of `rules` (default: the shipped pack), INPUT order;
    `feats` are featuriser rows in INPUT order."""
    rules = rules or default_rules()
    F = np.asarray(feats)
    if F.ndim != 2 or len(F) != len(events):
        raise ValueError(f"feats must be [n_events, n_features], got {F.shape} for {len(events)} events")
    out = rules.evaluate(RuleInputs(events, F))
    return {name: out.hits[:, k] for k, name in enumerate(out.names)}


def hand_rules_score(events: Sequence[Event], feats_in_input_order: np.ndarray,
                     rules: RuleSet | None = None) -> np.ndarray:
    """Summed rule score per event (input order), higher = riskier, ties broken by velocity and
    failures (seqguard.rules.ranked_score, the score the detector's rules view reads); `rules`
    default: the shipped pack."""
    F = np.asarray(feats_in_input_order, np.float64)
    return ranked_score((rules or default_rules()).evaluate(RuleInputs(events, F)).score, F)


# --------------------------------------------------------------------------- aggregates + IForest

def _codes(values: list) -> np.ndarray:
    """Dense int codes for hashable values; None -> -1."""
    index: dict = {}
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = -1
        else:
            j = index.get(v)
            if j is None:
                j = index[v] = len(index)
            out[i] = j
    return out


def _group_start_positions(group_sorted: np.ndarray) -> np.ndarray:
    """For a sorted group vector, the position of the first row of each row's group."""
    n = len(group_sorted)
    if n == 0:
        return np.zeros(0, np.int64)
    is_start = np.r_[True, group_sorted[1:] != group_sorted[:-1]]
    return np.maximum.accumulate(np.where(is_start, np.arange(n), 0))


def _group_cumsum(x: np.ndarray, start_pos: np.ndarray) -> np.ndarray:
    """Cumulative sum of x restarting at each group (rows sorted by group; start_pos from above)."""
    cs = np.cumsum(x, dtype=np.float64)
    before = np.where(start_pos > 0, cs[np.maximum(start_pos - 1, 0)], 0.0)
    return cs - before


def _distinct_so_far(group: np.ndarray, value: np.ndarray, start_pos: np.ndarray) -> np.ndarray:
    """Distinct non-missing values of `value` within the group up to and including each row
    (rows sorted by group, then time)."""
    n = len(group)
    if n == 0:
        return np.zeros(0)
    valid = value >= 0
    key = group * (int(value.max(initial=0)) + 2) + (value + 1)
    first = np.zeros(n, np.float64)
    # np.unique returns the FIRST position of each key in the (time-sorted) array
    _, first_pos = np.unique(key, return_index=True)
    first[first_pos] = 1.0
    first[~valid] = 0.0
    return _group_cumsum(first, start_pos)


AGGREGATE_NAMES = (
    "log_events_so_far", "log_distinct_devices", "log_distinct_countries", "log_distinct_ips",
    "log_distinct_prefixes", "failure_ratio", "log_login_failures", "log_payment_failures",
    "log_payments", "log_mean_amount", "log_max_amount", "amount_vs_mean",
    "log_events_per_hour", "log_account_changes", "log_coupons", "reviews_minus_payments",
    "log_device_users_so_far", "log_ip_users_so_far",
)


def user_aggregates(events: Sequence[Event]) -> np.ndarray:
    """[n_events, len(AGGREGATE_NAMES)] cumulative aggregates, INPUT order.

    Per user, in (ts, input position) order, up to and including each event; the two entity
    columns count distinct users seen on the event's device / IP so far in global time order.
    """
    n = len(events)
    if n == 0:
        return np.zeros((0, len(AGGREGATE_NAMES)))
    user = _codes([e.user_id for e in events])
    ts = np.fromiter((e.ts for e in events), np.int64, n)
    et = np.array([e.event_type for e in events], dtype=object)
    amount = np.fromiter((np.nan if e.amount is None else e.amount for e in events), np.float64, n)
    device = _codes([e.device_id for e in events])
    ip = _codes([e.ip for e in events])
    country = _codes([e.country for e in events])
    prefix = _codes([ip_prefix(e.ip) for e in events])
    pos = np.arange(n)

    o = np.lexsort((pos, ts, user))                   # by user, then time, then input position
    u, t = user[o], ts[o]
    sp = _group_start_positions(u)
    n_so_far = (np.arange(n) - sp + 1).astype(np.float64)
    et_o = et[o]
    login_f = (et_o == "login_failed").astype(np.float64)
    pay_f = (et_o == "payment_failed").astype(np.float64)
    is_pay = (et_o == "payment").astype(np.float64)
    change = np.isin(et_o, list(ACCOUNT_CHANGES)).astype(np.float64)
    coupon = (et_o == "redeem_coupon").astype(np.float64)
    review = (et_o == "review").astype(np.float64)
    amt = amount[o]
    has_amt = np.isfinite(amt)
    log_amt = np.where(has_amt, np.log1p(np.where(has_amt, amt, 0.0)), 0.0)

    c_login_f = _group_cumsum(login_f, sp)
    c_pay_f = _group_cumsum(pay_f, sp)
    c_pay = _group_cumsum(is_pay, sp)
    c_amt_n = _group_cumsum(has_amt.astype(np.float64), sp)
    c_amt_sum = _group_cumsum(log_amt, sp)
    mean_amt = np.where(c_amt_n > 0, c_amt_sum / np.maximum(c_amt_n, 1.0), 0.0)
    # group-wise running max: offset each user's values by a large per-user constant
    big = float(log_amt.max(initial=0.0)) + 1.0
    run_max = np.maximum.accumulate(log_amt + u * big) - u * big
    hours = (t - t[sp]) / HOUR_MS
    per_hour = n_so_far / np.maximum(hours, 1.0)     # >= 1 h window: a user's first events are no burst

    X_o = np.column_stack([
        np.log1p(n_so_far),
        np.log1p(_distinct_so_far(u, device[o], sp)),
        np.log1p(_distinct_so_far(u, country[o], sp)),
        np.log1p(_distinct_so_far(u, ip[o], sp)),
        np.log1p(_distinct_so_far(u, prefix[o], sp)),
        (c_login_f + c_pay_f) / n_so_far,
        np.log1p(c_login_f),
        np.log1p(c_pay_f),
        np.log1p(c_pay),
        mean_amt,
        np.maximum(run_max, 0.0),
        np.where(has_amt, log_amt - mean_amt, 0.0),
        np.log1p(per_hour),
        np.log1p(_group_cumsum(change, sp)),
        np.log1p(_group_cumsum(coupon, sp)),
        np.log1p(_group_cumsum(review, sp)) - np.log1p(c_pay),
    ])
    X = np.empty((n, len(AGGREGATE_NAMES)), np.float64)
    X[o, :X_o.shape[1]] = X_o

    # entity columns: distinct users seen on the event's device / IP so far, global time order
    for col, ent in ((X_o.shape[1], device), (X_o.shape[1] + 1, ip)):
        oe = np.lexsort((pos, ts, ent))
        g = ent[oe]
        users_so_far = _distinct_so_far(g, user[oe], _group_start_positions(g))
        X[oe, col] = np.log1p(np.where(g >= 0, users_so_far, 0.0))
    return X


def user_aggregate_iforest_score(events: Sequence[Event], seed: int = 0, n_estimators: int = 100,
                                 max_samples: int = 512, fit_events: int = 200_000) -> np.ndarray:
    """IsolationForest anomaly score (higher = riskier) on cumulative per-user aggregates.

    Fitted unsupervised on (a random subsample of) the evaluated log itself, as a team
    without a sequence model would do.
    """
    from sklearn.ensemble import IsolationForest
    X = user_aggregates(events).astype(np.float32)
    if len(X) == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(X), size=min(fit_events, len(X)), replace=False)
    forest = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, len(fit_rows)),
                             random_state=seed, n_jobs=1).fit(X[fit_rows])
    chunk = 262_144
    return np.concatenate([-forest.score_samples(X[a:a + chunk]) for a in range(0, len(X), chunk)])
