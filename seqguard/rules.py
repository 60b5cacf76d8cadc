"""Rules beside the model: a declarative, versioned rules file, evaluated vectorised over a batch.

A rules file (TOML, `version = 1`) lists rules an analyst can write and backtest without
retraining. Each rule has a name, a description, conditions over one event and an effect:

    version = 1
    name = "default"                        # optional: the pack's name, shown in reports

    [score_actions]                         # optional: summed rule score -> at least this action
    REVIEW = 3.0
    CHALLENGE = 5.0

    [[rule]]
    name = "login_failure_burst"
    description = "3 or more failed logins in the last hour"
    when = ["login_failures_1h >= 3"]       # all of these ...
    any = ["event_type == login", "event_type == login_failed"]   # ... and at least one of these
    action = "CHALLENGE"                    # a minimum action, and/or
    score = 2.0                             # points added to the event's rule score

A condition is `<field> <op> <value>`. Fields (FIELDS lists them all):

* the featuriser's named signals (seqguard/featurizer.py FEATURE_NAMES) in their stored units;
* its counters in natural units: the featuriser stores counts as log1p(count), a rule writes
  `login_failures_1h >= 3` and the threshold is translated (COUNTERS). Counters decay
  exponentially (a 1 h counter counts a failure 30 min ago as 0.61), exactly as the model sees them;
* a few derived signals in analyst units (DERIVED, e.g. `minutes_since_account_change`);
* the model's `risk` and its reason codes (`reasons contains LOGIN_FAILURE_BURST`: the reason's
  condition holds for the event, whether or not it is among the three the gateway returns);
* the event's own fields (`event_type`, `amount`, `country`, `category`, `item_id`, `device_id`, `ip`).

Operators: >= > <= < == != for numbers; == != in, not in for strings; == != true/false for 0/1
flags; contains / not contains for `reasons`. A missing event field (no country, no amount)
satisfies no condition, `!=` and `not in` included: a rule never fires on absent data.

`RuleSet.evaluate` takes whole arrays (features, risk, event types) and returns, per event, the
final action, the summed rule score and the rules that fired. Every result depends only on the
event's own row, so a gateway's coalesced batch and a whole offline log give the same hits: the
gateway and `seqguard score-file` call this one function.
"""
from __future__ import annotations

import ast
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .detector import ACTIONS
from .featurizer import FEATURE_INDEX, FEATURE_NAMES
from .schema import Event

RULES_FORMAT_VERSION = 1
RULE_ACTIONS = ACTIONS[1:]                 # what a rule may require (ALLOW is no effect)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")   # names travel in CSV columns, JSON and gRPC
_LOG_TOL = 1e-6                            # float32 feature rows vs float64 log1p thresholds

# Natural-unit counters: name a rule writes -> the featuriser column holding log1p(count).
COUNTERS = {
    "events_before": "log_n_events",
    "events_1m": "log_events_1m",
    "events_1h": "log_events_1h",
    "login_failures_1h": "log_login_failed_1h",
    "payment_failures_1h": "log_payment_failed_1h",
    "payments_24h": "log_payments_24h",
    "amount_24h": "log_amount_24h",
    "coupons_24h": "log_coupons_24h",
    "devices_seen": "log_n_devices",
    "session_events": "log_session_events",
    "gap_s": "log_gap_s",
    "account_age_h": "log_account_age_h",
    "device_accounts_24h": "log_device_accounts_24h",
    "device_login_failures_1h": "log_device_failed_1h",
    "device_new_accounts_24h": "log_device_new_accounts_24h",
    "device_failed_accounts_7d": "log_device_failed_accounts_7d",
    "ip_accounts_24h": "log_ip_accounts_24h",
    "ip_login_failures_1h": "log_ip_failed_1h",
    "ip_events_1h": "log_ip_events_1h",
    "prefix_accounts_24h": "log_prefix_accounts_24h",
    "prefix_login_failures_1h": "log_prefix_failed_1h",
}
# 0/1 featuriser outputs: written `new_device == true`
FLAGS = frozenset({"is_first_event", "has_amount", "has_device", "new_device", "device_changed", "has_country",
                   "new_country", "country_changed", "has_ip", "new_ip_prefix", "ip_prefix_changed",
                   "review_without_purchase", "new_session"})


def _col(F: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(F[:, FEATURE_INDEX[name]], np.float64)


def _failures_1h(F):
    return np.expm1(_col(F, "log_login_failed_1h")) + np.expm1(_col(F, "log_payment_failed_1h"))


def _minutes_since_change(F):
    # recent_account_change = exp(-dt / 1 h) since the last account change, 0 when there was none
    x = _col(F, "recent_account_change")
    return np.where(x > 0, -60.0 * np.log(np.where(x > 0, x, 1.0)), np.inf)


# Derived signals in analyst units: name -> (function of the feature rows, tolerance of >= / <=).
# Counts get the counters' tolerance; ratios compare exactly.
DERIVED: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "failures_1h": (_failures_1h, _LOG_TOL),                        # failed logins + failed payments
    "failure_ratio_1h": (lambda F: _failures_1h(F) / np.maximum(np.expm1(_col(F, "log_events_1h")), 1.0), 0.0),
    "minutes_since_account_change": (_minutes_since_change, 0.0),   # inf: never changed
    "amount_over_user_max": (lambda F: np.exp(_col(F, "amount_vs_max")), 0.0),   # (1 + amount) / (1 + max before)
    "review_purchase_ratio": (lambda F: np.exp(_col(F, "review_vs_purchase")), 0.0),  # (1 + reviews)/(1 + buys)
}

EVENT_STRING_FIELDS = ("event_type", "country", "category", "item_id", "device_id", "ip")
EVENT_NUMBER_FIELDS = ("amount",)

# Reason codes of seqguard/explain.py; the two marked need the encoder (surprise, session stage).
REASON_CODES = (
    "NEW_DEVICE_AND_COUNTRY", "NEW_DEVICE", "NEW_COUNTRY", "NEW_NETWORK", "LOGIN_FAILURE_BURST",
    "PAYMENT_FAILURE_BURST", "MACHINE_TIMING", "HIGH_VELOCITY", "SHARED_DEVICE", "SHARED_IP",
    "NEW_ACCOUNTS_ON_DEVICE", "DEVICE_FAILED_LOGINS_OTHER_ACCOUNTS", "IP_LOGIN_FAILURES",
    "ACCOUNT_CHANGE_BEFORE_PAYMENT", "UNUSUAL_AMOUNT", "REVIEW_WITHOUT_PURCHASE", "COUPON_BURST",
    "UNUSUAL_SEQUENCE", "RISKY_SESSION",
)
MODEL_REASON_CODES = frozenset({"UNUSUAL_SEQUENCE", "RISKY_SESSION"})

FIELDS = (*FEATURE_NAMES, *COUNTERS, *DERIVED, "risk", "reasons", *EVENT_STRING_FIELDS, *EVENT_NUMBER_FIELDS)
NUMBER_OPS = (">=", ">", "<=", "<", "==", "!=")
_COND_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+(>=|<=|==|!=|>|<|not\s+in|in|not\s+contains|contains)\s+(.+?)\s*$")


class RulesError(ValueError):
    """A rules file that cannot be used; names the file, the rule and the field."""

    def __init__(self, source: str, message: str, rule: str | None = None, field: str | None = None):
        self.source, self.rule, self.field = source, rule, field
        where = "".join([f": rule {rule!r}" if rule else "", f": field {field!r}" if field else ""])
        super().__init__(f"{source}{where}: {message}")


class ModelInputsMissing(ValueError):
    """A rule reads the model's risk or a model reason, and the inputs carry no model outputs."""


# --------------------------------------------------------------------------- reason flags

def _n(F, name):
    """A counter rounded as explain.py reports it ("4 failed logins")."""
    return np.rint(np.expm1(_col(F, name)))


def reason_flags(F: np.ndarray, event_types: np.ndarray, codes, surprise=None, surprise_cut: float = 8.0,
                 session_lift=None) -> dict[str, np.ndarray]:
    """Per reason code, whether seqguard/explain.py's condition for it holds on each row.

    The same thresholds as `explain` (tests/test_rules.py pins them against it), vectorised;
    not truncated to explain's top three.
    """
    out = {}
    nd, nc = _col(F, "new_device") > 0.5, _col(F, "new_country") > 0.5
    jitter, gap_std = _col(F, "gap_jitter"), _col(F, "gap_std")
    slow_regular = (_col(F, "log_n_events") >= math.log1p(10)) & (gap_std < 0.25)
    for code in codes:
        if code == "NEW_DEVICE_AND_COUNTRY":
            m = nd & nc
        elif code == "NEW_DEVICE":
            m = nd & ~nc
        elif code == "NEW_COUNTRY":
            m = nc & ~nd
        elif code == "NEW_NETWORK":
            m = (_col(F, "new_ip_prefix") > 0.5) & ~nd & ~nc
        elif code == "LOGIN_FAILURE_BURST":
            m = _n(F, "log_login_failed_1h") >= 3
        elif code == "PAYMENT_FAILURE_BURST":
            m = _n(F, "log_payment_failed_1h") >= 2
        elif code == "MACHINE_TIMING":
            m = slow_regular | (jitter < 0.15)
        elif code == "HIGH_VELOCITY":
            m = _n(F, "log_events_1m") >= 15
        elif code == "SHARED_DEVICE":
            m = _n(F, "log_device_accounts_24h") >= 4
        elif code == "SHARED_IP":
            m = _n(F, "log_ip_accounts_24h") >= 10
        elif code == "NEW_ACCOUNTS_ON_DEVICE":
            m = _n(F, "log_device_new_accounts_24h") >= 3
        elif code == "DEVICE_FAILED_LOGINS_OTHER_ACCOUNTS":
            m = _n(F, "log_device_failed_accounts_7d") >= 1
        elif code == "IP_LOGIN_FAILURES":
            m = _n(F, "log_ip_failed_1h") >= 5
        elif code == "ACCOUNT_CHANGE_BEFORE_PAYMENT":
            m = (_col(F, "recent_account_change") > 0.3) & np.isin(event_types, ["payment", "checkout",
                                                                                  "add_payment_method"])
        elif code == "UNUSUAL_AMOUNT":
            m = _col(F, "amount_z") >= 2.5
        elif code == "REVIEW_WITHOUT_PURCHASE":
            m = _col(F, "review_without_purchase") > 0.5
        elif code == "COUPON_BURST":
            m = _n(F, "log_coupons_24h") >= 3
        elif code == "UNUSUAL_SEQUENCE":
            s = np.asarray(surprise, np.float64)
            m = (s[:, 0] if s.ndim == 2 else s) >= surprise_cut
        elif code == "RISKY_SESSION":
            m = np.asarray(session_lift, np.float64) >= 2.3
        else:
            raise KeyError(code)
        out[code] = np.asarray(m, bool)
    return out


# --------------------------------------------------------------------------- inputs

@dataclass
class RuleInputs:
    """What rules read for a batch of events, all arrays in the order of `events`.

    risk / surprise ([n, 2] or [n], the type NLL first) / session_lift (the session average that
    set the score, 0 where the event itself did) come from the model; rules that read none of
    them run without it.
    """
    events: Sequence[Event]
    feats: np.ndarray
    risk: np.ndarray | None = None
    surprise: np.ndarray | None = None
    session_lift: np.ndarray | None = None
    surprise_cut: float = 8.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.feats.ndim != 2 or self.feats.shape != (len(self.events), len(FEATURE_NAMES)):
            raise ValueError(f"feats must be [{len(self.events)}, {len(FEATURE_NAMES)}], got {self.feats.shape}")
        for name in ("risk", "surprise", "session_lift"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.events):
                raise ValueError(f"{name} has {len(v)} rows for {len(self.events)} events")

    @classmethod
    def from_types(cls, event_types, feats: np.ndarray) -> "RuleInputs":
        """Inputs that carry only each event's type and featuriser row: what the detector keeps per
        model step (a gateway's deferred step has no other event field). `amount` is read back from
        the row's log1p(amount), rounded to cents (float32 rows keep ~7 digits); rules reading any
        other event field cannot run on them (RuleSet.event_fields says which a pack reads)."""
        types = np.asarray(event_types, dtype=object)
        x = cls(_TypeOnlyEvents(len(types)), feats)
        x._cache["event_type"] = types
        F = x.f64
        x._cache["amount"] = np.where(F[:, FEATURE_INDEX["has_amount"]] > 0.5,
                                      np.round(np.expm1(F[:, FEATURE_INDEX["log_amount"]]), 2), np.nan)
        return x

    def __len__(self) -> int:
        return len(self.events)

    @property
    def f64(self) -> np.ndarray:
        """The feature rows as float64, converted once per batch (every threshold is float64)."""
        c = self._cache.get("f64")
        if c is None:
            c = self._cache["f64"] = np.asarray(self.feats, np.float64)
        return c

    def column(self, name: str) -> np.ndarray:
        """An event field as an array: strings as objects (None when absent), amount as NaN when absent."""
        c = self._cache.get(name)
        if c is None:
            if name == "amount":
                c = np.fromiter((np.nan if e.amount is None else e.amount for e in self.events), np.float64,
                                len(self.events))
            else:
                c = np.array([getattr(e, name) for e in self.events], dtype=object)
            self._cache[name] = c
        return c

    def reasons(self, code: str) -> np.ndarray:
        key = ("reason", code)
        c = self._cache.get(key)
        if c is None:
            if code == "UNUSUAL_SEQUENCE" and self.surprise is None or code == "RISKY_SESSION" and self.session_lift is None:
                raise ModelInputsMissing(f"reason {code} needs the model's outputs")
            c = self._cache[key] = reason_flags(self.feats, self.column("event_type"), [code], self.surprise,
                                                self.surprise_cut, self.session_lift)[code]
        return c


class _TypeOnlyEvents(Sequence):
    """Stands in for the events of RuleInputs.from_types: their type and amount columns are given, nothing else is."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise ModelInputsMissing("these rule inputs carry only event types, amounts and featuriser rows")


# --------------------------------------------------------------------------- conditions

@dataclass(frozen=True)
class Condition:
    """One parsed `<field> <op> <value>`; `mask` evaluates it over a batch."""
    text: str
    field: str
    op: str
    value: object

    @property
    def needs_model(self) -> bool:
        return self.field == "risk" or (self.field == "reasons" and self.value in MODEL_REASON_CODES)

    def column_compare(self) -> tuple[int, str, float, float] | None:
        """(feature column, op, threshold, tolerance) when the condition compares one stored feature
        column with a number (signals, counters, flags): RuleSet evaluates all of those at once."""
        f, op, v = self.field, self.op, self.value
        if f in COUNTERS:         # compared in the stored log1p space: no expm1 over the column
            return FEATURE_INDEX[COUNTERS[f]], op, math.log1p(v), _LOG_TOL
        if f in FLAGS:            # == true / != false: > 0.5; == false / != true: <= 0.5
            return FEATURE_INDEX[f], (">" if (op == "==") == v else "<="), 0.5, 0.0
        if f in FEATURE_INDEX:
            return FEATURE_INDEX[f], op, v, 0.0
        return None

    def mask(self, x: RuleInputs) -> np.ndarray:
        """Evaluated once per batch: rules sharing a condition (event_type in [payment, ...]) share its mask."""
        key = ("cond", self.field, self.op, self.value)
        m = x._cache.get(key)
        if m is None:
            m = x._cache[key] = self._mask(x)
        return m

    def _mask(self, x: RuleInputs) -> np.ndarray:
        f, op, v = self.field, self.op, self.value
        if f == "reasons":
            m = x.reasons(v)
            return m if op == "contains" else ~m
        if f in EVENT_STRING_FIELDS:     # set membership per event: np.isin on object arrays is slow per call
            vals = frozenset(v) if isinstance(v, tuple) else frozenset([v])
            col = x.column(f)
            if op in ("==", "in"):
                return np.fromiter((s in vals for s in col), bool, len(col))
            return np.fromiter((s is not None and s not in vals for s in col), bool, len(col))
        if f == "risk":
            if x.risk is None:
                raise ModelInputsMissing(f"condition {self.text!r} needs the model's risk")
            return _compare(np.asarray(x.risk, np.float64), op, float(v), 0.0)
        if f in EVENT_NUMBER_FIELDS:
            col = x.column(f)
            return np.isfinite(col) & _compare(col, op, float(v), 0.0)
        if f in DERIVED:
            fn, tol = DERIVED[f]
            return _compare(fn(x.f64), op, float(v), tol)
        col, op, v, tol = self.column_compare()
        return _compare(x.f64[:, col], op, v, tol)


def _compare(col: np.ndarray, op: str, v, tol) -> np.ndarray:
    """col <op> v, with `tol` absorbing float32 rounding of the stored value toward the threshold
    (v, tol: scalars, or one per column of a 2-D col)."""
    if op == ">=":
        return col >= v - tol
    if op == ">":
        return col > v + tol
    if op == "<=":
        return col <= v + tol
    if op == "<":
        return col < v - tol
    if op == "==":
        return np.abs(col - v) <= tol
    return np.abs(col - v) > tol


def _parse_value(raw: str):
    """A number, a quoted string, true/false, a bare word, or a [list] of strings / bare words."""
    raw = raw.strip()
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    if raw.startswith("[") and raw.endswith("]"):
        return [w.strip().strip("'\"") for w in raw[1:-1].split(",") if w.strip()]
    if re.fullmatch(r"[A-Za-z0-9_.:\-/]+", raw):
        return raw
    raise ValueError(f"cannot read the value {raw!r}")


def parse_condition(text: str) -> Condition:
    """`login_failures_1h >= 3` -> Condition; ValueError says what is wrong (the caller adds where)."""
    if not isinstance(text, str):
        raise ValueError(f"a condition is a string like \"login_failures_1h >= 3\", got {type(text).__name__}")
    m = _COND_RE.match(text)
    if not m:
        raise ValueError(f"cannot read condition {text!r}: expected '<field> <op> <value>', e.g. 'login_failures_1h >= 3'")
    f, op, raw = m.group(1), " ".join(m.group(2).split()), m.group(3)
    if f not in FIELDS:
        import difflib
        close = difflib.get_close_matches(f, FIELDS, n=1)
        raise ValueError(f"unknown field {f!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    v = _parse_value(raw)
    if f == "reasons":
        if op not in ("contains", "not contains"):
            raise ValueError(f"reasons takes 'contains' or 'not contains', not {op!r}")
        if v not in REASON_CODES:
            raise ValueError(f"unknown reason code {v!r}; known: {', '.join(REASON_CODES)}")
        return Condition(text, f, op, v)
    if f in EVENT_STRING_FIELDS:
        if op in ("in", "not in"):
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) for s in v):
                raise ValueError(f"{op!r} needs a non-empty list of strings, e.g. [payment, checkout]")
            return Condition(text, f, op, tuple(v))
        if op not in ("==", "!=") or not isinstance(v, str):
            raise ValueError(f"{f} is a string field: use == / != with a string or in / not in with a list")
        return Condition(text, f, op, v)
    if f in FLAGS:
        if op not in ("==", "!=") or not isinstance(v, bool):
            raise ValueError(f"{f} is a 0/1 flag: write '{f} == true' or '{f} == false'")
        return Condition(text, f, op, v)
    if op not in NUMBER_OPS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{f} is numeric: use one of {' '.join(NUMBER_OPS)} with a finite number")
    if f in COUNTERS and v < 0:
        raise ValueError(f"{f} is a count: the threshold must be >= 0, got {v}")
    return Condition(text, f, op, float(v))


# --------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    when: tuple[Condition, ...]          # all of
    any: tuple[Condition, ...]           # at least one of (empty: no such requirement)
    action: int = 0                      # minimum action code (ACTIONS index; 0 = none)
    score: float = 0.0

    @property
    def needs_model(self) -> bool:
        return any(c.needs_model for c in (*self.when, *self.any))

    def mask(self, x: RuleInputs) -> np.ndarray:
        m = None
        for c in self.when:
            m = c.mask(x) if m is None else m & c.mask(x)
        if self.any:
            a = self.any[0].mask(x)
            for c in self.any[1:]:
                a = a | c.mask(x)
            m = a if m is None else m & a
        return m


@dataclass
class RuleOutcome:
    """Per event (input order): which rules fired, the summed rule score and the final action."""
    names: tuple[str, ...]
    hits: np.ndarray                     # [n, n_rules] bool
    score: np.ndarray                    # [n] float64: sum of fired rules' scores
    rule_action: np.ndarray              # [n] int8: the strongest action the rules alone require
    action: np.ndarray                   # [n] int8: max(model action, rule_action)

    def fired(self, i: int) -> list[str]:
        return [self.names[k] for k in np.flatnonzero(self.hits[i])]

    def fired_lists(self) -> list[list[str]]:
        rows, cols = np.nonzero(self.hits)
        out: list[list[str]] = [[] for _ in range(len(self.hits))]
        for r, c in zip(rows.tolist(), cols.tolist()):
            out[r].append(self.names[c])
        return out


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    score_actions: dict                  # action code -> minimum rule score for it
    name: str = ""
    source: str = "<rules>"
    digest: str = ""                     # sha256 of the file: which rules produced a result

    def __post_init__(self):
        # every condition that compares a feature column with a number, grouped by operator: one
        # vectorised comparison per operator per batch instead of one numpy call per condition
        groups: dict[str, dict] = {}
        for r in self.rules:
            for c in (*r.when, *r.any):
                spec = c.column_compare()
                if spec is not None:
                    col, op, v, tol = spec
                    groups.setdefault(op, {})[("cond", c.field, c.op, c.value)] = (col, v, tol)
        object.__setattr__(self, "_column_groups", {
            op: (list(g), np.array([s[0] for s in g.values()], np.int64), np.array([s[1] for s in g.values()]),
                 np.array([s[2] for s in g.values()])) for op, g in groups.items()})

    def _score_tables(self) -> tuple:
        """The pack as matrices over its distinct conditions, built once: for summed_score."""
        t = self.__dict__.get("_tables")
        if t is None:
            conds: dict = {}
            for r in self.rules:
                for c in (*r.when, *r.any):
                    conds.setdefault(("cond", c.field, c.op, c.value), c)
            index = {k: j for j, k in enumerate(conds)}
            W_when, W_any = np.zeros((len(conds), len(self.rules))), np.zeros((len(conds), len(self.rules)))
            for k, r in enumerate(self.rules):
                for c in r.when:
                    W_when[index[("cond", c.field, c.op, c.value)], k] = 1.0
                for c in r.any:
                    W_any[index[("cond", c.field, c.op, c.value)], k] = 1.0
            grouped = {op: np.array([index[key] for key in keys], np.int64)
                       for op, (keys, *_rest) in self._column_groups.items()}
            others = [(index[key], c) for key, c in conds.items() if c.column_compare() is None]
            t = (len(conds), grouped, others, W_when, W_when.sum(axis=0), W_any, W_any.sum(axis=0) == 0,
                 np.array([r.score for r in self.rules], np.float64))
            object.__setattr__(self, "_tables", t)
        return t

    def summed_score(self, x: RuleInputs) -> np.ndarray:
        """evaluate(x).score, the same bits, in a few matrix operations whatever the number of rules
        (what a detector view reads per event): one mask per distinct condition, each rule's "all of
        when" and "any of any" as counts over them, the scores summed rule by rule in file order."""
        C, grouped, others, W_when, n_when, W_any, no_any, weights = self._score_tables()
        M = np.empty((len(x), C))
        for op, (keys, cols, v, tol) in self._column_groups.items():
            M[:, grouped[op]] = _compare(x.f64[:, cols], op, v, tol)
        for j, c in others:
            M[:, j] = c.mask(x)
        fired = (M @ W_when == n_when) & (no_any | (M @ W_any > 0))
        if not len(self.rules) or not len(x):
            return np.zeros(len(x))
        return np.cumsum(fired * weights, axis=1)[:, -1]   # left to right, as evaluate's loop adds

    def _compare_columns(self, x: RuleInputs) -> None:
        """Fill the batch's condition cache with every column comparison (see __post_init__)."""
        for op, (keys, cols, v, tol) in self._column_groups.items():
            masks = _compare(x.f64[:, cols], op, v, tol)
            for j, key in enumerate(keys):
                x._cache[key] = masks[:, j]

    @property
    def version_tag(self) -> str:
        return f"{self.name or 'rules'}@{self.digest[:12]}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    @property
    def needs_model(self) -> bool:
        return any(r.needs_model for r in self.rules)

    @property
    def event_fields(self) -> frozenset:
        """The event fields (EVENT_STRING_FIELDS, EVENT_NUMBER_FIELDS) the rules read directly."""
        direct = {*EVENT_STRING_FIELDS, *EVENT_NUMBER_FIELDS}
        return frozenset(c.field for r in self.rules for c in (*r.when, *r.any) if c.field in direct)

    @property
    def reason_codes(self) -> frozenset:
        """The reason codes the rules read."""
        return frozenset(c.value for r in self.rules for c in (*r.when, *r.any) if c.field == "reasons")

    def without_model(self) -> "RuleSet":
        """The rules that read only featuriser outputs and event fields."""
        return RuleSet(tuple(r for r in self.rules if not r.needs_model), self.score_actions, self.name,
                       self.source, self.digest)

    def evaluate(self, x: RuleInputs, model_action=None) -> RuleOutcome:
        """Vectorised over the batch; `model_action` (ACTIONS codes) is the floor of the final action."""
        n = len(x)
        self._compare_columns(x)
        hits = np.empty((n, len(self.rules)), bool)
        score = np.zeros(n, np.float64)
        rule_action = np.zeros(n, np.int8)
        for k, r in enumerate(self.rules):
            m = hits[:, k] = r.mask(x)
            if r.score:            # summed rule by rule, in file order: the same bits whatever the batch
                score += m * r.score
            if r.action:
                np.maximum(rule_action, m.astype(np.int8) * np.int8(r.action), out=rule_action)
        for code, cut in sorted(self.score_actions.items()):
            np.maximum(rule_action, (score >= cut).astype(np.int8) * np.int8(code), out=rule_action)
        base = np.zeros(n, np.int8) if model_action is None else np.asarray(model_action, np.int8)
        return RuleOutcome(self.names, hits, score, rule_action, np.maximum(base, rule_action))


TIE_BREAK = 0.04                           # the most ranked_score adds to a summed rule score


def ranked_score(summed: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """The summed rule score with a tiny tie-break, as an analyst sorting a queue would order it.

    A rule engine's score is coarse (many ties); the tie-break (< 0.05 in total, far below any
    sensible rule weight) orders equal rule scores by velocity and failures. It never changes the
    order between different rule scores. Row-wise, so any batching gives the same bits."""
    F = np.asarray(feats, np.float64)
    score = np.array(summed, np.float64)
    if len(F):
        tb = (F[:, FEATURE_INDEX["log_events_1m"]] + F[:, FEATURE_INDEX["log_login_failed_1h"]]
              + F[:, FEATURE_INDEX["log_payment_failed_1h"]] + F[:, FEATURE_INDEX["log_device_accounts_24h"]])
        score += TIE_BREAK * np.clip(tb, 0.0, 20.0) / 20.0
    return score


# --------------------------------------------------------------------------- loading

_TOP_KEYS = {"version", "name", "description", "score_actions", "rule"}
_RULE_KEYS = {"name", "description", "when", "any", "action", "score"}


def load_rules(path) -> RuleSet:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RulesError(str(path), f"cannot read: {e.strerror or e}") from e
    return loads_rules(data.decode("utf-8", "replace"), source=str(path), digest=hashlib.sha256(data).hexdigest())


def loads_rules(text: str, source: str = "<rules>", digest: str | None = None) -> RuleSet:
    """Parse and validate a rules file's text; every error names the rule and the field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(source, f"not valid TOML: {e}") from e
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise RulesError(source, f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}",
                         field=sorted(unknown)[0])
    if doc.get("version") != RULES_FORMAT_VERSION:
        raise RulesError(source, f"version must be {RULES_FORMAT_VERSION}, got {doc.get('version')!r}",
                         field="version")
    name = doc.get("name", "")
    if not isinstance(name, str):
        raise RulesError(source, "must be a string", field="name")
    score_actions = _score_actions(doc.get("score_actions", {}), source)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(source, "no rules: add [[rule]] tables", field="rule")
    rules, seen = [], set()
    for i, raw in enumerate(raw_rules):
        r = _rule(raw, i, source)
        if r.name in seen:
            raise RulesError(source, "duplicate rule name", rule=r.name, field="name")
        seen.add(r.name)
        rules.append(r)
    return RuleSet(tuple(rules), score_actions, name, source,
                   digest or hashlib.sha256(text.encode("utf-8")).hexdigest())


def _score_actions(raw, source: str) -> dict:
    if not isinstance(raw, dict):
        raise RulesError(source, "must be a table like {REVIEW = 3.0}", field="score_actions")
    out = {}
    for k, v in raw.items():
        a = str(k).upper()
        if a not in RULE_ACTIONS:
            raise RulesError(source, f"unknown action {k!r}; one of {', '.join(RULE_ACTIONS)}", field=f"score_actions.{k}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise RulesError(source, f"must be a positive number, got {v!r}", field=f"score_actions.{k}")
        out[ACTIONS.index(a)] = float(v)
    cuts = [out[c] for c in sorted(out)]
    if cuts != sorted(cuts):
        raise RulesError(source, "thresholds must not fall from REVIEW to BLOCK", field="score_actions")
    return out


def _rule(raw, i: int, source: str) -> Rule:
    label = f"#{i + 1}"
    if not isinstance(raw, dict):
        raise RulesError(source, "each [[rule]] must be a table", rule=label)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RulesError(source, f"name must match {_NAME_RE.pattern} (lower case, digits, _ . -), got {name!r}",
                         rule=label, field="name")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RulesError(source, f"unknown key; allowed: {sorted(_RULE_KEYS)}", rule=name, field=sorted(unknown)[0])
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise RulesError(source, "a rule needs a description (what it catches, in words)", rule=name,
                         field="description")
    conds = {}
    for key in ("when", "any"):
        items = raw.get(key, [])
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list):
            raise RulesError(source, "must be a list of condition strings", rule=name, field=key)
        parsed = []
        for j, text in enumerate(items):
            try:
                parsed.append(parse_condition(text))
            except ValueError as e:
                raise RulesError(source, str(e), rule=name, field=f"{key}[{j}]") from None
        conds[key] = tuple(parsed)
    if not conds["when"] and not conds["any"]:
        raise RulesError(source, "a rule needs at least one condition in 'when' or 'any'", rule=name, field="when")
    action = 0
    if "action" in raw:
        a = raw["action"]
        if not isinstance(a, str) or a.upper() not in RULE_ACTIONS:
            raise RulesError(source, f"must be one of {', '.join(RULE_ACTIONS)}, got {a!r}", rule=name, field="action")
        action = ACTIONS.index(a.upper())
    score = raw.get("score", 0.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RulesError(source, f"must be a finite number, got {score!r}", rule=name, field="score")
    if not action and not score:
        raise RulesError(source, "a rule needs an effect: 'action' (REVIEW/CHALLENGE/BLOCK) and/or a non-zero 'score'",
                         rule=name, field="action")
    return Rule(name, desc.strip(), conds["when"], conds["any"], action, float(score))


# the shipped pack (configs/rules/default.toml): the hand rules `seqguard evaluate` compares with
DEFAULT_RULES_PATH = Path(__file__).resolve().parent.parent / "configs" / "rules" / "default.toml"
