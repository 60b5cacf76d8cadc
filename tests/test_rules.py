"""The rules engine (seqguard/rules.py): loading and validation, each operator, vectorised ==
per-event, the shipped pack == the hand rules it replaced, reason flags == explain()."""
import math

import numpy as np
import pytest

from seqguard.detector import ACTIONS
from seqguard.explain import explain
from seqguard.featurizer import (ACCOUNT_CHANGES, FEATURE_INDEX, N_FEATURES, ContextStore, Featurizer, TokenHasher,
                                 Vocabulary, featurize_log)
from seqguard.rules import (DEFAULT_RULES_PATH, REASON_CODES, ModelInputsMissing, RuleInputs, RulesError,
                            load_rules, loads_rules, reason_flags)
from seqguard.schema import Event
from seqguard.training.baselines import hand_rules_score

T0 = 1_767_225_600_000


@pytest.fixture(scope="module")
def gen_log():
    """A generated 300-user log (8 days), featurised: (events, feature rows in input order)."""
    from seqguard.training.generate import generate
    raw, _ = generate(300, seed=21, days=8)
    events = [Event(**{k: d.get(k) for k in Event._fields}) for d in raw]
    fz = Featurizer(Vocabulary.learn((e.event_type for e in events), 1), TokenHasher())
    order, _, feats = featurize_log(fz, events, ContextStore())
    F = np.empty_like(feats)
    F[order] = feats
    return events, F


def _pack(*rules: str, head: str = "") -> str:
    return "version = 1\n" + head + "\n" + "\n".join(f"[[rule]]\n{r}\n" for r in rules)


def _rows(n, **cols):
    """n feature rows of zeros with the named columns set (values: scalars or per-row lists)."""
    F = np.zeros((n, N_FEATURES), np.float32)
    for name, v in cols.items():
        F[:, FEATURE_INDEX[name]] = v
    return F


def _events(n, **fields):
    out = []
    for i in range(n):
        kw = {k: (v[i] if isinstance(v, list) else v) for k, v in fields.items()}
        kw.setdefault("event_type", "login")
        out.append(Event(f"e{i}", f"u{i}", T0 + i, **kw))
    return out


def _hits(cond: str, events, F, **model) -> list[bool]:
    rs = loads_rules(_pack(f'name = "r"\ndescription = "d"\nwhen = [{cond!r}]\nscore = 1'))
    return rs.evaluate(RuleInputs(events, F, **model)).hits[:, 0].tolist()


# --------------------------------------------------------------------------- operators

def test_counter_thresholds_are_natural_counts():
    # stored as log1p(count) in float32, as the featuriser writes them
    counts = [0.0, 2.0, 2.9, 3.0, 3.2, 10.0]
    F = _rows(6, log_login_failed_1h=np.log1p(counts))
    ev = _events(6)
    assert _hits("login_failures_1h >= 3", ev, F) == [False, False, False, True, True, True]
    assert _hits("login_failures_1h > 3", ev, F) == [False, False, False, False, True, True]
    assert _hits("login_failures_1h < 3", ev, F) == [True, True, True, False, False, False]
    assert _hits("login_failures_1h <= 2", ev, F) == [True, True, False, False, False, False]
    assert _hits("login_failures_1h == 10", ev, F) == [False] * 5 + [True]
    assert _hits("login_failures_1h != 0", ev, F) == [False] + [True] * 5


def test_signals_flags_and_derived():
    F = _rows(4, amount_z=[-1.0, 2.999, 3.0, 5.0], new_device=[0, 1, 0, 1],
              recent_account_change=[0.0, math.exp(-0.5), math.exp(-2.0), 1.0],
              log_events_1h=np.log1p([0, 3, 4, 1]), log_login_failed_1h=np.log1p([0, 2, 1, 0]),
              log_payment_failed_1h=np.log1p([0, 1, 0, 0]))
    ev = _events(4)
    assert _hits("amount_z >= 3", ev, F) == [False, False, True, True]
    assert _hits("new_device == true", ev, F) == [False, True, False, True]
    assert _hits("new_device != true", ev, F) == [True, False, True, False]
    assert _hits("new_device == false", ev, F) == [True, False, True, False]
    # never changed -> infinitely long ago; exp(-0.5) = 30 min; exp(-2) = 120 min; 1.0 = just now
    assert _hits("minutes_since_account_change < 60", ev, F) == [False, True, False, True]
    assert _hits("failures_1h >= 3", ev, F) == [False, True, False, False]
    assert _hits("failure_ratio_1h >= 0.2", ev, F) == [False, True, True, False]


def test_event_fields_and_missing_values_never_match():
    ev = _events(4, event_type=["payment", "checkout", "login", "payment"], country=["DE", None, "FR", "US"],
                 amount=[600.0, None, 10.0, 500.0])
    F = _rows(4)
    assert _hits("event_type in [payment, checkout]", ev, F) == [True, True, False, True]
    assert _hits("event_type not in ['payment', 'checkout']", ev, F) == [False, False, True, False]
    assert _hits('event_type == "login"', ev, F) == [False, False, True, False]
    assert _hits("country == DE", ev, F) == [True, False, False, False]
    assert _hits("country != DE", ev, F) == [False, False, True, True]      # no country: no hit
    assert _hits("country not in [DE, FR]", ev, F) == [False, False, False, True]
    assert _hits("amount >= 500", ev, F) == [True, False, False, True]      # no amount: no hit
    assert _hits("amount < 500", ev, F) == [False, False, True, False]


def test_risk_and_reasons():
    F = _rows(3, log_login_failed_1h=np.log1p([0, 4, 0]))
    ev = _events(3)
    risk = np.array([0.1, 0.5, 0.999])
    assert _hits("risk >= 0.99", ev, F, risk=risk) == [False, False, True]
    assert _hits("reasons contains LOGIN_FAILURE_BURST", ev, F) == [False, True, False]
    assert _hits("reasons not contains LOGIN_FAILURE_BURST", ev, F) == [True, False, True]
    sur = np.array([[1.0, 0.0], [9.0, 0.0], [3.0, 0.0]], np.float32)
    assert _hits("reasons contains UNUSUAL_SEQUENCE", ev, F, surprise=sur, surprise_cut=8.0) == [False, True, False]
    with pytest.raises(ModelInputsMissing):
        _hits("risk >= 0.5", ev, F)
    with pytest.raises(ModelInputsMissing):
        _hits("reasons contains RISKY_SESSION", ev, F)


def test_all_of_any_of_and_effects():
    rs = loads_rules(_pack(
        'name = "burst"\ndescription = "d"\nwhen = ["login_failures_1h >= 3"]\n'
        'any = ["event_type == login", "country == RU"]\naction = "challenge"\nscore = 2',
        'name = "risky"\ndescription = "d"\nwhen = ["risk >= 0.9"]\nscore = 1.5',
        'name = "block_ru"\ndescription = "d"\nwhen = ["country == RU", "new_device == true"]\naction = "BLOCK"',
        head="[score_actions]\nREVIEW = 3.0\n"))
    F = _rows(4, log_login_failed_1h=np.log1p([5, 5, 5, 0]), new_device=[0, 0, 1, 0])
    ev = _events(4, event_type=["login", "login_failed", "login_failed", "login"], country=["DE", "DE", "RU", "DE"])
    x = RuleInputs(ev, F, risk=np.array([0.95, 0.1, 0.1, 0.95]))
    out = rs.evaluate(x, model_action=np.array([0, 0, 0, 2]))
    assert out.fired_lists() == [["burst", "risky"], [], ["burst", "block_ru"], ["risky"]]
    assert out.score.tolist() == [3.5, 0.0, 2.0, 1.5]
    assert [ACTIONS[a] for a in out.rule_action] == ["CHALLENGE", "ALLOW", "BLOCK", "ALLOW"]
    # the final action is never below the model's
    assert [ACTIONS[a] for a in out.action] == ["CHALLENGE", "ALLOW", "BLOCK", "CHALLENGE"]
    assert rs.needs_model and rs.without_model().names == ("burst", "block_ru")


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("text, rule, field, message", [
    ('version = 2\n[[rule]]\nname="a"\ndescription="d"\nwhen=["events_1m >= 1"]\nscore=1', None, "version", "version"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["login_fails_1h >= 3"]\nscore = 1'), "a", "when[0]",
     "unknown field 'login_fails_1h' \\(did you mean 'login_failures_1h'\\?\\)"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1", "events_1m >> 1"]\nscore = 1'), "a", "when[1]",
     "cannot read condition"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["event_type >= 3"]\nscore = 1'), "a", "when[0]", "string field"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["new_device >= 1"]\nscore = 1'), "a", "when[0]", "0/1 flag"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= -1"]\nscore = 1'), "a", "when[0]", "count"),
    (_pack('name = "a"\ndescription = "d"\nany = ["reasons contains NOPE"]\nscore = 1'), "a", "any[0]",
     "unknown reason code"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1"]\naction = "DENY"'), "a", "action", "one of"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1"]'), "a", "action", "needs an effect"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1"]\nscroe = 1'), "a", "scroe", "unknown key"),
    (_pack('name = "a"\nwhen = ["events_1m >= 1"]\nscore = 1'), "a", "description", "description"),
    (_pack('name = "a"\ndescription = "d"\nscore = 1'), "a", "when", "at least one condition"),
    (_pack('name = "Bad Name"\ndescription = "d"\nwhen = ["events_1m >= 1"]\nscore = 1'), "#1", "name", "name"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1"]\nscore = 1',
           'name = "a"\ndescription = "d"\nwhen = ["events_1m >= 2"]\nscore = 1'), "a", "name", "duplicate"),
    (_pack('name = "a"\ndescription = "d"\nwhen = ["events_1m >= 1"]\nscore = 1',
           head="[score_actions]\nREVIEW = 5\nCHALLENGE = 3\n"), None, "score_actions", "must not fall"),
    ("version = 1\n[[rule]\n", None, None, "not valid TOML"),
])
def test_bad_files_are_rejected_naming_rule_and_field(text, rule, field, message):
    with pytest.raises(RulesError, match=message) as ei:
        loads_rules(text, source="bad.toml")
    e = ei.value
    assert (e.rule, e.field) == (rule, field)
    assert str(e).startswith("bad.toml")
    if rule:
        assert f"rule {rule!r}" in str(e) and f"field {field!r}" in str(e)


def test_load_rules_names_a_missing_file(tmp_path):
    with pytest.raises(RulesError, match="nope.toml: cannot read"):
        load_rules(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- the shipped pack

def test_default_pack_loads():
    rs = load_rules(DEFAULT_RULES_PATH)
    assert rs.name == "default" and len(rs.rules) >= 20 and not rs.needs_model
    assert all(r.description and r.score > 0 for r in rs.rules)
    assert [ACTIONS[c] for c in sorted(rs.score_actions)] == ["REVIEW", "CHALLENGE", "BLOCK"]
    assert rs.version_tag.startswith("default@") and len(rs.digest) == 64


def _legacy_hand_rule_hits(events, F):
    """The hand rules as training/baselines.py wrote them before the rules engine (verbatim
    arithmetic): the shipped pack must fire exactly where these did."""
    lg = math.log1p
    F = np.asarray(F, np.float64)
    c = {name: F[:, i] for name, i in FEATURE_INDEX.items()}
    et = np.array([e.event_type for e in events], dtype=object)
    pay = np.isin(et, ["payment", "payment_failed", "checkout"])
    change = np.isin(et, list(ACCOUNT_CHANGES))
    payment_amt = pay & (c["has_amount"] > 0)
    fails_1h = np.expm1(c["log_login_failed_1h"]) + np.expm1(c["log_payment_failed_1h"])
    ev_1h = np.maximum(np.expm1(c["log_events_1h"]), 1.0)
    return {
        "high_velocity_1m": c["log_events_1m"] >= lg(10) - 1e-6,
        "extreme_velocity_1m": c["log_events_1m"] >= lg(30) - 1e-6,
        "high_velocity_1h": c["log_events_1h"] >= lg(120) - 1e-6,
        "new_device": c["new_device"] > 0.5,
        "new_country": c["new_country"] > 0.5,
        "new_network": c["new_ip_prefix"] > 0.5,
        "new_device_and_country": (c["new_device"] > 0.5) & (c["new_country"] > 0.5),
        "login_failure_burst": c["log_login_failed_1h"] >= lg(3) - 1e-6,
        "login_failure_storm": c["log_login_failed_1h"] >= lg(10) - 1e-6,
        "payment_failure_burst": c["log_payment_failed_1h"] >= lg(2) - 1e-6,
        "payment_failure_storm": c["log_payment_failed_1h"] >= lg(5) - 1e-6,
        "mostly_failures_1h": (fails_1h >= 2.0 - 1e-6) & (fails_1h / ev_1h >= 0.5),
        "account_change_before_payment": pay & (c["recent_account_change"] > math.exp(-1.0)),
        "account_change_on_new_device": change & (c["new_device"] > 0.5),
        "unusual_amount": payment_amt & (c["amount_z"] >= 3.0),
        "amount_3x_user_max": payment_amt & (c["amount_vs_max"] >= math.log(3.0)),
        "high_first_payment": payment_amt & (c["log_payments_24h"] <= lg(1) + 1e-6)
        & (c["amount_z"] == 0.0) & (c["log_amount"] >= lg(500)),
        "many_payments_24h": c["log_payments_24h"] >= lg(6) - 1e-6,
        "coupon_burst": c["log_coupons_24h"] >= lg(3) - 1e-6,
        "review_without_purchase": c["review_without_purchase"] > 0.5,
        "reviews_far_exceed_purchases": (et == "review") & (c["review_vs_purchase"] >= math.log(3.0)),
        "shared_device": c["log_device_accounts_24h"] >= lg(4) - 1e-6,
        "new_accounts_on_device": c["log_device_new_accounts_24h"] >= lg(3) - 1e-6,
        "shared_ip": c["log_ip_accounts_24h"] >= lg(10) - 1e-6,
        "busy_ip_prefix": c["log_prefix_accounts_24h"] >= lg(25) - 1e-6,
        "device_login_failures": c["log_device_failed_1h"] >= lg(5) - 1e-6,
        "ip_login_failures": c["log_ip_failed_1h"] >= lg(10) - 1e-6,
        "machine_regular_timing": (np.expm1(c["log_n_events"]) >= 20 - 1e-6) & (c["gap_std"] < 0.15),
    }


LEGACY_WEIGHTS = [2.0, 1.0, 1.5, 1.0, 1.5, 0.5, 2.0, 2.0, 1.5, 2.0, 1.5, 1.0, 2.5, 1.5, 1.5, 1.0, 1.0, 1.0, 1.5,
                  1.5, 1.0, 2.0, 1.5, 1.5, 0.5, 1.5, 1.5, 1.0]


def test_default_pack_fires_where_the_hand_rules_did(gen_log):
    events, F = gen_log
    rs = load_rules(DEFAULT_RULES_PATH)
    out = rs.evaluate(RuleInputs(events, F))
    legacy = _legacy_hand_rule_hits(events, F)
    assert list(rs.names) == list(legacy)
    fired_somewhere = 0
    for k, name in enumerate(rs.names):
        assert np.array_equal(out.hits[:, k], legacy[name]), name
        fired_somewhere += bool(legacy[name].any())
    assert fired_somewhere >= 15          # the log exercises most rules, not just their silence
    assert [r.score for r in rs.rules] == LEGACY_WEIGHTS
    expected = np.zeros(len(events))
    for w, name in zip(LEGACY_WEIGHTS, legacy):
        expected += w * legacy[name]
    assert np.array_equal(out.score, expected)
    # the evaluate baseline is that score plus its tie-break (< 0.05)
    gap = hand_rules_score(events, F) - expected
    assert gap.min() >= 0 and gap.max() < 0.05


def test_summed_score_equals_evaluate_and_types_only_inputs_suffice(gen_log):
    """RuleSet.summed_score (the detector's rules view reads it) gives evaluate's score bit for bit, on
    the whole log, one row at a time, with any/when rules and fractional weights; and inputs that
    carry only event types and featuriser rows (a deferred gateway step) give the same score."""
    events, F = gen_log
    extra = ('\n[[rule]]\nname = "odd_weights"\ndescription = "d"\nwhen = ["new_device == true"]\n'
             'any = ["event_type == payment", "events_1m >= 3"]\nscore = 0.3\n'
             '\n[[rule]]\nname = "negative"\ndescription = "d"\nwhen = ["amount >= 20"]\nscore = -0.7\n')
    for rs in (load_rules(DEFAULT_RULES_PATH), loads_rules(DEFAULT_RULES_PATH.read_text() + extra)):
        want = rs.evaluate(RuleInputs(events, F)).score
        assert np.array_equal(rs.summed_score(RuleInputs(events, F)), want)
        for i in np.flatnonzero(want != 0)[:50]:
            assert rs.summed_score(RuleInputs(events[i:i + 1], F[i:i + 1]))[0] == want[i]
        typed = RuleInputs.from_types([e.event_type for e in events], F)
        assert np.array_equal(rs.summed_score(typed), want)
    with pytest.raises(ModelInputsMissing):
        loads_rules(DEFAULT_RULES_PATH.read_text() + extra.replace("amount >= 20", "country == DE")).summed_score(
            RuleInputs.from_types([e.event_type for e in events], F))


def test_vectorised_equals_per_event(gen_log):
    events, F = gen_log
    rs = load_rules(DEFAULT_RULES_PATH)
    rng = np.random.default_rng(0)
    risk = rng.random(len(events))
    model_action = rng.integers(0, 4, len(events)).astype(np.int8)
    whole = rs.evaluate(RuleInputs(events, F, risk=risk), model_action)
    rows = np.r_[np.flatnonzero(whole.score > 0)[:300], rng.choice(len(events), 100, replace=False)]
    for i in rows:
        one = rs.evaluate(RuleInputs(events[i:i + 1], F[i:i + 1], risk=risk[i:i + 1]), model_action[i:i + 1])
        assert one.fired(0) == whole.fired(i)
        assert one.score[0] == whole.score[i] and one.action[0] == whole.action[i]
    # and any split into batches (a gateway's coalesced windows) gives the same arrays
    parts = [rs.evaluate(RuleInputs(events[a:a + 777], F[a:a + 777], risk=risk[a:a + 777]), model_action[a:a + 777])
             for a in range(0, len(events), 777)]
    assert np.array_equal(np.concatenate([p.hits for p in parts]), whole.hits)
    assert np.array_equal(np.concatenate([p.action for p in parts]), whole.action)


def test_reason_flags_match_explain(gen_log):
    events, F = gen_log
    rng = np.random.default_rng(1)
    sur = np.c_[rng.gamma(2.0, 2.0, len(events)), rng.random(len(events))].astype(np.float32)
    lift = np.where(rng.random(len(events)) < 0.2, rng.random(len(events)) * 5, 0.0)
    et = np.array([e.event_type for e in events], dtype=object)
    flags = reason_flags(F, et, REASON_CODES, sur, 8.0, lift)
    seen = set()
    for i, e in enumerate(events):
        got = {c for c in REASON_CODES if flags[c][i]}
        want = {r.code for r in explain(F[i], sur[i], e.event_id, e.event_type, [], 8.0, top=100,
                                        session_lift=float(lift[i]))}
        assert got == want, (i, got, want)
        seen |= got
    assert len(seen) >= 12
