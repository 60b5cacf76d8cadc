"""Reason codes: the top signals behind a score, in words an analyst can act on.

Cheap enough for the online path (a few comparisons on one feature row): each rule
reads named featuriser outputs, fires when a signal is far outside normal behaviour, and
carries a weight (how far) used to rank it. The event ids come from the user's recent-event
ring (the same events that moved the counters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .featurizer import FEATURE_INDEX as FI


@dataclass
class Reason:
    code: str
    message: str
    weight: float
    event_ids: list = field(default_factory=list)


def _count(log1p_value: float) -> int:
    """A log1p-scaled counter feature back as the count it encodes."""
    return int(round(math.expm1(log1p_value)))


def explain(row, surprise, event_id: str, event_type: str, recent: list | None = None,
            surprise_cut: float = 8.0, top: int = 3, session_lift: float = 0.0,
            view_rules: Sequence[str] = ()) -> list[Reason]:
    """row: one feature vector; surprise: (type NLL, gap NLL); recent: [(event_id, event_type, ts), ...].

    session_lift: the detector's session average m when it, not the event itself, set the score
    (seqguard/detector.py stage 2; on the -log(1 - quantile) scale: 4.6 = a 1-in-100 event).
    view_rules: the detector's rules-view rules that account for the score on their own
    (Detector.rules_reasons); named first, since that view is what flagged the event."""
    recent = recent or []
    feature = lambda name: float(row[FI[name]])  # noqa: E731

    def ids_of(*types):
        return [e[0] for e in recent if e[1] in types][-5:] + [event_id]

    out = (_where_from(feature, event_id) + _activity(feature, event_type, ids_of)
           + _shared_entities(feature, event_id) + _account_behaviour(feature, event_id, event_type, ids_of))
    if float(surprise[0]) >= surprise_cut:
        out.append(Reason("UNUSUAL_SEQUENCE", "event sequence unlike this account's history",
                          float(surprise[0]) / surprise_cut, [event_id]))
    if session_lift >= 2.3:          # the session averages at least a 1-in-10 event
        out.append(Reason("RISKY_SESSION", "follows unusual activity earlier in this session",
                          session_lift / 2, [e[0] for e in recent][-3:] + [event_id]))
    out.sort(key=lambda r: -r.weight)
    if view_rules:
        out.insert(0, Reason("RULES_VIEW", "hand rules: " + ", ".join(view_rules),
                             max((r.weight for r in out), default=0.0) + 1.0, [event_id]))
    return out[:top]


def _where_from(feature, event_id: str) -> list[Reason]:
    """A device, country or network this account has not used."""
    out = []
    new_device, new_country = feature("new_device") > 0.5, feature("new_country") > 0.5
    if new_device and new_country:
        out.append(Reason("NEW_DEVICE_AND_COUNTRY", "new device and new country", 3.0, [event_id]))
    elif new_device:
        out.append(Reason("NEW_DEVICE", "new device for this account", 1.5, [event_id]))
    elif new_country:
        out.append(Reason("NEW_COUNTRY", "new country for this account", 1.5, [event_id]))
    if feature("new_ip_prefix") > 0.5 and not (new_device or new_country):
        out.append(Reason("NEW_NETWORK", "new network (IP prefix) for this account", 0.8, [event_id]))
    return out


def _activity(feature, event_type: str, ids_of) -> list[Reason]:
    """Bursts of failures or events, and machine-regular timing."""
    out = []
    login_failures = _count(feature("log_login_failed_1h"))
    if login_failures >= 3:
        out.append(Reason("LOGIN_FAILURE_BURST", f"{login_failures} failed logins in the last hour",
                          1.0 + 0.3 * login_failures, ids_of("login_failed")))
    payment_failures = _count(feature("log_payment_failed_1h"))
    if payment_failures >= 2:
        out.append(Reason("PAYMENT_FAILURE_BURST",
                          f"payment failure burst ({payment_failures} declines in the last hour)",
                          1.0 + 0.5 * payment_failures, ids_of("payment_failed")))
    # gap_jitter starts at 2.0 and needs ~8 near-identical gaps to fall below 0.15; gap_std needs ~30
    jitter = feature("gap_jitter")
    slow_regular = feature("log_n_events") >= math.log1p(10) and feature("gap_std") < 0.25
    if slow_regular or jitter < 0.15:
        out.append(Reason("MACHINE_TIMING", "machine-regular timing between events",
                          2.0 + 8 * max(0.25 - feature("gap_std") if slow_regular else 0.0, 0.15 - jitter),
                          ids_of(event_type)))
    events_1m = _count(feature("log_events_1m"))
    if events_1m >= 15:
        out.append(Reason("HIGH_VELOCITY", f"{events_1m} events in the last minute", 1.0 + events_1m / 20,
                          ids_of(event_type)))
    return out


def _shared_entities(feature, event_id: str) -> list[Reason]:
    """A device or IP address that many accounts use, create accounts on, or fail logins from."""
    out = []
    device_accounts = _count(feature("log_device_accounts_24h"))
    if device_accounts >= 4:
        out.append(Reason("SHARED_DEVICE", f"device shared by {device_accounts} accounts",
                          1.0 + device_accounts / 4, [event_id]))
    ip_accounts = _count(feature("log_ip_accounts_24h"))
    if ip_accounts >= 10:
        out.append(Reason("SHARED_IP", f"IP address used by {ip_accounts} accounts today",
                          0.5 + ip_accounts / 20, [event_id]))
    new_accounts = _count(feature("log_device_new_accounts_24h"))
    if new_accounts >= 3:
        out.append(Reason("NEW_ACCOUNTS_ON_DEVICE", f"{new_accounts} new accounts created on this device today",
                          1.0 + new_accounts / 3, [event_id]))
    failed_accounts = _count(feature("log_device_failed_accounts_7d"))
    if failed_accounts >= 1:
        plural = "s" if failed_accounts > 1 else ""
        out.append(Reason("DEVICE_FAILED_LOGINS_OTHER_ACCOUNTS",
                          f"failed logins on this device for {failed_accounts} other account{plural} this week",
                          1.5 + 0.5 * min(failed_accounts, 10), [event_id]))
    ip_failures = _count(feature("log_ip_failed_1h"))
    if ip_failures >= 5:
        out.append(Reason("IP_LOGIN_FAILURES", f"{ip_failures} failed logins from this IP in the last hour",
                          1.0 + ip_failures / 5, [event_id]))
    return out


def _account_behaviour(feature, event_id: str, event_type: str, ids_of) -> list[Reason]:
    """What the account does: paying right after changing its details, unusual amounts, reviews
    without purchases, coupon bursts."""
    out = []
    if feature("recent_account_change") > 0.3 and event_type in ("payment", "checkout", "add_payment_method"):
        out.append(Reason("ACCOUNT_CHANGE_BEFORE_PAYMENT", "account details changed shortly before paying",
                          2.0 * feature("recent_account_change") + 0.5,
                          ids_of("change_password", "change_email", "change_address", "add_payment_method")))
    if feature("amount_z") >= 2.5:
        out.append(Reason("UNUSUAL_AMOUNT", "amount far above this account's usual payments",
                          feature("amount_z") / 2, [event_id]))
    if feature("review_without_purchase") > 0.5:
        out.append(Reason("REVIEW_WITHOUT_PURCHASE", "review without any purchase", 1.5, [event_id]))
    coupons = _count(feature("log_coupons_24h"))
    if coupons >= 3:
        out.append(Reason("COUPON_BURST", f"{coupons} coupons redeemed today", 1.0 + coupons / 3,
                          ids_of("redeem_coupon")))
    return out
