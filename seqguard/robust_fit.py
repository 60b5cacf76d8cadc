"""Contamination-robust fitting: no single account may define "normal" (issue #20, part 3).

Why: the detector's forests and every calibration table were fitted per EVENT, so an account
that produces thousands of events (a crawler fleet, a card-testing script) is most of what the
forests call typical, and its events sit in the middle of every quantile table. On independent
data a fleet of ~0.1% of accounts producing ~4% of events was learned as normal (fast-crawler
recall 0.46 where a velocity rule gets 0.98).

The remedy here is a per-account cap: before fitting or calibrating on a set of training events,
each account keeps at most K of its events there (a seeded random subset). K is `cap_factor`
times the median account's event count in that set (never below `min_cap`), so ordinary and
moderately heavy users keep all their events while a heavy hitter counts like K events.
"""
from __future__ import annotations

import math

import numpy as np


def user_cap(user_of_row: np.ndarray, cap_factor: float, min_cap: int) -> int:
    """K for one set of rows: cap_factor x the median per-account count, at least min_cap."""
    counts = np.bincount(np.unique(user_of_row, return_inverse=True)[1])
    return max(int(min_cap), int(math.ceil(cap_factor * float(np.median(counts))))) if len(counts) else int(min_cap)


def capped_rows(user_of_row: np.ndarray, cap_factor: float, min_cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of the rows kept when every account keeps at most K rows (random ones)."""
    users = np.asarray(user_of_row)
    n = len(users)
    if n == 0:
        return np.arange(0)
    k = user_cap(users, cap_factor, min_cap)
    order = np.lexsort((rng.random(n), users))          # by account, random within an account
    su = users[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[rank < k])
