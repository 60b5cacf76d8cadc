"""Reason codes: the top signals behind a score, in words an analyst can act on.

Cheap enough for the online path (a few comparisons on one feature row, ~10 us): each rule
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


def _n(log1p_value: float) -> int:
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
    f = lambda name: float(row[FI[name]])  # noqa: E731
    out: list[Reason] = []

    def ids_of(*types):
        return [e[0] for e in recent if e[1] in types][-5:] + [event_id]

    nd, nc = f("new_device") > 0.5, f("new_country") > 0.5
    if nd and nc:
        out.append(Reason("NEW_DEVICE_AND_COUNTRY", "new device and new country", 3.0, [event_id]))
    elif nd:
        out.append(Reason("NEW_DEVICE", "new device for this account", 1.5, [event_id]))
    elif nc:
        out.append(Reason("NEW_COUNTRY", "new country for this account", 1.5, [event_id]))
    if f("new_ip_prefix") > 0.5 and not (nd or nc):
        out.append(Reason("NEW_NETWORK", "new network (IP prefix) for this account", 0.8, [event_id]))
    lf = _n(f("log_login_failed_1h"))
    if lf >= 3:
        out.append(Reason("LOGIN_FAILURE_BURST", f"{lf} failed logins in the last hour", 1.0 + 0.3 * lf,
                          ids_of("login_failed")))
    pf = _n(f("log_payment_failed_1h"))
    if pf >= 2:
        out.append(Reason("PAYMENT_FAILURE_BURST", f"payment failure burst ({pf} declines in the last hour)",
                          1.0 + 0.5 * pf, ids_of("payment_failed")))
    # gap_jitter starts at 2.0 and needs ~8 near-identical gaps to fall below 0.15; gap_std needs ~30
    jitter = f("gap_jitter")
    slow_regular = f("log_n_events") >= math.log1p(10) and f("gap_std") < 0.25
    if slow_regular or jitter < 0.15:
        out.append(Reason("MACHINE_TIMING", "machine-regular timing between events",
                          2.0 + 8 * max(0.25 - f("gap_std") if slow_regular else 0.0, 0.15 - jitter),
                          ids_of(event_type)))
    v = _n(f("log_events_1m"))
    if v >= 15:
        out.append(Reason("HIGH_VELOCITY", f"{v} events in the last minute", 1.0 + v / 20, ids_of(event_type)))
    da = _n(f("log_device_accounts_24h"))
    if da >= 4:
        out.append(Reason("SHARED_DEVICE", f"device shared by {da} accounts", 1.0 + da / 4, [event_id]))
    ia = _n(f("log_ip_accounts_24h"))
    if ia >= 10:
        out.append(Reason("SHARED_IP", f"IP address used by {ia} accounts today", 0.5 + ia / 20, [event_id]))
    na = _n(f("log_device_new_accounts_24h"))
    if na >= 3:
        out.append(Reason("NEW_ACCOUNTS_ON_DEVICE", f"{na} new accounts created on this device today",
                          1.0 + na / 3, [event_id]))
    rf = _n(f("log_device_failed_accounts_7d"))
    if rf >= 1:
        out.append(Reason("DEVICE_FAILED_LOGINS_OTHER_ACCOUNTS",
                          f"failed logins on this device for {rf} other account{'s' if rf > 1 else ''} this week",
                          1.5 + 0.5 * min(rf, 10), [event_id]))
    ipf = _n(f("log_ip_failed_1h"))
    if ipf >= 5:
        out.append(Reason("IP_LOGIN_FAILURES", f"{ipf} failed logins from this IP in the last hour",
                          1.0 + ipf / 5, [event_id]))
    if f("recent_account_change") > 0.3 and event_type in ("payment", "checkout", "add_payment_method"):
        out.append(Reason("ACCOUNT_CHANGE_BEFORE_PAYMENT", "account details changed shortly before paying",
                          2.0 * f("recent_account_change") + 0.5,
                          ids_of("change_password", "change_email", "change_address", "add_payment_method")))
    if f("amount_z") >= 2.5:
        out.append(Reason("UNUSUAL_AMOUNT", "amount far above this account's usual payments", f("amount_z") / 2,
                          [event_id]))
    if f("review_without_purchase") > 0.5:
        out.append(Reason("REVIEW_WITHOUT_PURCHASE", "review without any purchase", 1.5, [event_id]))
    c = _n(f("log_coupons_24h"))
    if c >= 3:
        out.append(Reason("COUPON_BURST", f"{c} coupons redeemed today", 1.0 + c / 3, ids_of("redeem_coupon")))
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
