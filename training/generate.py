"""Deterministic synthetic e-commerce event logs with labelled attacks and hard negatives.

Why this exists: seqguard trains WITHOUT labels, but tests, the demo and the evaluation
need logs whose ground truth is known. The model will later be judged on logs from a
different generator, so this one avoids rigid templates: every persona and every attacker
draws its own rates, timing, devices, IP ranges and habits, gaps are heavy-tailed, sessions
follow a per-user diurnal rhythm, and each attack family comes in a FAST variant (bursts,
seconds apart) and a LOW-AND-SLOW variant (hours/days apart, human-looking gaps).

Contents
* Normal users: personas (browser, regular, bargain hunter, heavy buyer, occasional,
  digital-goods buyer) with 1-3 own devices, a home country, a home /24 (sometimes two),
  optional mobile carrier and work IPs, sessions of login ... search / view_item /
  add_to_cart ... checkout -> payment (sometimes payment_failed first), logout, reviews
  days after purchases, rare legit account changes, a few team-specific event types.
* Attacks (label 1; family, variant "fast"/"slow"): account_takeover, card_testing,
  credential_stuffing, bot_scraping, brushing, promo_abuse, fake_reviews.
* Hard negatives (label 0, family names the kind): traveller, big_purchase,
  decline_then_success, shared_household, public_device, carrier_nat, digital_goods,
  legit_account_change. Labels are per EVENT: only the sessions showing the look-alike
  behaviour carry the hard-negative family, the rest of that user's events are "normal".

Determinism: the world (IP space, catalogue, role assignment) comes from a
random.Random seeded by the seed; every user and every attack instance has its own
sub-generator seeded by (seed, kind, index), so output is a pure function of the arguments.
Event ids are assigned after the global sort, so sorting by (ts, event_id) is the file order.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
from bisect import bisect
from collections import Counter, defaultdict

from seqguard.schema import COMMON_EVENT_TYPES, FIELDS

from .world_config import WorldConfig

EVENT_FIELDS = FIELDS
LABEL_FIELDS = ("event_id", "user_id", "label", "family", "variant")
EVENT_TYPES = COMMON_EVENT_TYPES
CUSTOM_EVENT_TYPES = ("wishlist_add", "share_item", "contact_support")
ATTACK_FAMILIES = ("account_takeover", "card_testing", "credential_stuffing", "bot_scraping",
                   "brushing", "promo_abuse", "fake_reviews")
HARD_NEGATIVES = ("traveller", "big_purchase", "decline_then_success", "shared_household",
                  "public_device", "carrier_nat", "digital_goods", "legit_account_change")
WORLD_HARD_NEGATIVES = ("prolific_reviewer", "decline_storm")   # look-alikes only worlds draw
VARIANTS = ("fast", "slow")

SEC_MS, MIN_MS, HOUR_MS, DAY_MS = 1_000, 60_000, 3_600_000, 86_400_000

# country -> (weight among normal users, possible UTC offsets in hours)
_COUNTRIES = {
    "US": (22, (-8, -7, -6, -5, -5, -5)), "GB": (8, (0,)), "DE": (8, (1,)), "FR": (6, (1,)),
    "IN": (8, (5.5,)), "BR": (6, (-3, -3, -4)), "CA": (4, (-8, -5, -5, -4)), "AU": (3, (8, 10, 10)),
    "NL": (3, (1,)), "ES": (3, (1,)), "IT": (3, (1,)), "PL": (3, (1,)), "JP": (4, (9,)),
    "MX": (3, (-6, -6, -7)), "SE": (2, (1,)), "TR": (2, (3,)), "ID": (2, (7, 7, 8)),
    "PH": (1.5, (8,)), "NG": (1.2, (1,)), "VN": (1, (7,)), "ZA": (1, (2,)), "KR": (2, (9,)),
    "AR": (1, (-3,)), "RO": (1, (2,)), "UA": (1, (2,)), "RU": (1, (3, 3, 5, 7)),
    "CN": (0.8, (8,)), "PK": (0.5, (5,)), "EG": (0.5, (2,)), "SG": (0.5, (8,)),
}
# where attackers (or their exit nodes) tend to sit
_ATTACKER_CC = {"RU": 3, "NG": 3, "VN": 2, "CN": 2, "UA": 1.5, "RO": 1.5, "BR": 2, "ID": 1.5,
                "PK": 1, "US": 2, "NL": 1, "DE": 1, "IN": 1.5, "PH": 1, "TR": 1}
_DATACENTER_CC = ("US", "US", "US", "DE", "NL", "SG", "FR", "GB", "RU", "NL")

# category -> (share of catalogue, median price, log-sd of price)
_CATEGORIES = {
    "electronics": (0.12, 120.0, 1.0), "books": (0.11, 14.0, 0.5), "fashion": (0.15, 35.0, 0.6),
    "home": (0.12, 40.0, 0.8), "beauty": (0.08, 18.0, 0.5), "grocery": (0.08, 9.0, 0.6),
    "toys": (0.06, 22.0, 0.6), "sports": (0.07, 40.0, 0.8), "digital": (0.05, 6.0, 0.7),
    "jewelry": (0.03, 150.0, 1.0), "gift_cards": (0.03, 50.0, 0.6), "health": (0.05, 20.0, 0.6),
    "pet": (0.05, 25.0, 0.6),
}
_RESALE_CATS = ("electronics", "gift_cards", "jewelry")   # what takeover attackers buy
_N_ITEMS = 6000

# persona -> (share, sessions/day median, browse steps mean, p(add to cart per view),
#             p(buy | cart), p(coupon), p(review per purchase))
_PERSONAS = {
    "browser":    (0.25, 0.18, 7.0, 0.05, 0.30, 0.04, 0.05),
    "regular":    (0.30, 0.14, 4.5, 0.20, 0.65, 0.05, 0.20),
    "bargain":    (0.15, 0.18, 6.5, 0.15, 0.55, 0.55, 0.15),
    "heavy":      (0.08, 0.35, 5.0, 0.30, 0.75, 0.08, 0.25),
    "occasional": (0.22, 0.04, 3.0, 0.25, 0.55, 0.05, 0.10),
}
_EVENING_PEAKS = (20.0, 21.0, 19.5, 12.5, 8.0, 23.5, 16.0, 22.0)


def _cum(weights):
    tot, out = 0.0, []
    for w in weights:
        tot += w
        out.append(tot)
    return [c / tot for c in out]


def _poisson(r: random.Random, lam: float) -> int:
    """Poisson draw (Knuth for small means, normal approximation above 30)."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, int(round(r.gauss(lam, math.sqrt(lam)))))
    lim, k, p = math.exp(-lam), 0, r.random()
    while p > lim:
        k += 1
        p *= r.random()
    return k


def _dev(r: random.Random) -> str:
    return f"d{r.getrandbits(48):012x}"


def _sid(r: random.Random) -> str:
    return f"s{r.getrandbits(56):014x}"


def _host(r: random.Random, pfx16: str) -> str:
    """A random host inside a /16 given as 'a.b.'."""
    return f"{pfx16}{int(r.random() * 256)}.{1 + int(r.random() * 254)}"


class _User:
    """Per-user habits; drawn once from the user's own sub-generator."""
    __slots__ = ("idx", "uid", "cc", "tz", "home_ip", "alt_ip", "work_ip", "mobile_pfx", "nat_ips",
                 "devices", "dev_cum", "p_mobile", "persona", "rate", "first_day", "p_login",
                 "p_typo", "p_logout", "gap_mu", "gap_sg", "peak1", "peak2", "p_peak1", "width",
                 "cats", "cat_cum", "p_search", "browse_mean", "p_cart", "p_buy", "p_coupon",
                 "p_fail", "p_review", "weekend", "burst", "p_nodev", "multi_buy", "base_tag")


class _World:
    """Everything shared between users: IP space, catalogue, role plan; builds the event log."""

    def __init__(self, n_users: int, seed: int, start_ms: int, days: int, cfg: WorldConfig | None = None):
        self.n, self.seed, self.start, self.days = n_users, seed, start_ms, days
        self.cfg = cfg
        # RNG stream names: without a world exactly the fixed generator's, so its output is unchanged
        self.rng_key = str(seed) if cfg is None else f"w{cfg.world}/{seed}"
        self.end = start_ms + days * DAY_MS
        self.epoch_day = start_ms // DAY_MS
        r = random.Random(f"seqguard/world/{self.rng_key}")
        self._build_ip_space(r)
        self._build_catalogue(r)
        self.cc_list = list(_COUNTRIES)
        self.cc_cum = _cum(_COUNTRIES[c][0] for c in self.cc_list)
        self.att_cc = list(_ATTACKER_CC)
        self.att_cum = _cum(_ATTACKER_CC.values())
        self.persona_names = list(_PERSONAS)
        if cfg is None:
            self.persona_cum = _cum(p[0] for p in _PERSONAS.values())
        else:
            self.persona_cum = _cum(cfg.persona_share[p] for p in self.persona_names)
        self.cat_names = list(_CATEGORIES)
        self.cat_pop_cum = _cum(_CATEGORIES[c][0] for c in self.cat_names)
        # decline storms: a payment processor failing for everyone for a few hours (label 0)
        W = self.end - self.start
        self.storms = [] if cfg is None else [
            (start_ms + int(W * f), start_ms + int(W * f) + int(hours * HOUR_MS), p)
            for f, hours, p in cfg.decline_storms]
        self._plan(r)

    def _storm_p(self, t: int) -> float:
        return max((p for a, b, p in self.storms if a <= t < b), default=0.0)

    # ------------------------------------------------------------------ world building
    def _build_ip_space(self, r):
        used = set()

        def new16():
            while True:
                a = r.randint(1, 223)
                if a in (10, 100, 127, 169, 172, 192, 198, 203):
                    continue
                b = r.randint(0, 255)
                if (a, b) not in used:
                    used.add((a, b))
                    return f"{a}.{b}."

        self.res16 = {cc: [new16() for _ in range(max(3, int(w)))] for cc, (w, _) in _COUNTRIES.items()}
        self.mob16 = {cc: [new16() for _ in range(2)] for cc in _COUNTRIES}
        # carrier-grade NAT egress addresses: a handful per country shared by very many users
        self.nat_ips = {cc: [_host(r, new16()) for _ in range(r.randint(1, 3))] for cc in _COUNTRIES}
        self.dc16 = [(new16(), cc) for cc in _DATACENTER_CC for _ in range(2)]

    def _build_catalogue(self, r):
        names = list(_CATEGORIES)
        cum = _cum(_CATEGORIES[c][0] for c in names)
        self.item_id, self.item_cat, self.item_price = [], [], []
        self.cat_items = {c: [] for c in names}
        for k in range(_N_ITEMS):
            c = names[bisect(cum, r.random())]
            _, med, sd = _CATEGORIES[c]
            if c == "gift_cards":
                price = float(r.choice((10, 25, 25, 50, 50, 100, 100, 200)))
            else:
                price = round(max(0.49, med * math.exp(sd * r.gauss(0, 1))), 2) - (0.01 if r.random() < 0.5 else 0)
            self.item_id.append(f"i{k:06d}")
            self.item_cat.append(c)
            self.item_price.append(round(price, 2))
            self.cat_items[c].append(k)
        for c in names:  # popularity: head of each list is the bestseller
            r.shuffle(self.cat_items[c])
        self.expensive = {c: sorted(v, key=lambda i: -self.item_price[i])[:max(3, len(v) // 8)]
                          for c, v in self.cat_items.items()}
        self.cheap = {c: [i for i in v if self.item_price[i] < 25] or v[:5] for c, v in self.cat_items.items()}

    def _pick_cc(self, r):
        return self.cc_list[bisect(self.cc_cum, r.random())]

    def _attacker_cc(self, r, exclude=None):
        for _ in range(10):
            cc = self.att_cc[bisect(self.att_cum, r.random())]
            if cc != exclude:
                return cc
        return "RU" if exclude != "RU" else "NG"

    def _item(self, r, cat):
        lst = self.cat_items[cat]
        return lst[int(len(lst) * r.random() ** 2.2)]

    def _local_ts(self, day: int, hour: float, tz: float) -> int:
        return self.start + day * DAY_MS + int((hour - tz) * HOUR_MS)

    def _weekday(self, day: int) -> int:
        return (self.epoch_day + day + 3) % 7   # 1970-01-01 was a Thursday; Monday = 0

    # ------------------------------------------------------------------ role plan
    def _plan(self, r):
        """Decide who is attacked, who attacks and who is a look-alike, before any events exist."""
        n = self.n
        order = list(range(n))
        r.shuffle(order)
        pool = iter(order)
        mn = 2 if n >= 150 else (1 if n >= 40 else 0)
        reserve = int(n * 0.6)   # never hand more than 40% of accounts to attack roles
        taken = [0]

        scale = self.cfg.attack_scale if self.cfg else {}

        def cnt(frac, fam=None):
            frac *= scale.get(fam, 1.0)
            return max(mn, int(round(frac * n))) if mn else int(frac * n)

        def take():
            if n - taken[0] <= reserve:
                return None
            taken[0] += 1
            return next(pool)

        variants = Counter()

        def variant(fam):
            k = variants[fam]
            variants[fam] += 1
            return VARIANTS[k % 2] if k < 2 else r.choice(VARIANTS)

        self.user_cc = [self._pick_cc(r) for _ in range(n)]
        self.owned = {}          # attacker-owned (fresh) accounts: idx -> family
        self.groups = []         # (family, variant, [idx...]) for ring attacks and bots
        cap = max(3, n // 60)
        for fam, frac, lo, hi in (("brushing", 1 / 800, 4, 10), ("promo_abuse", 1 / 700, 4, 12),
                                  ("fake_reviews", 1 / 900, 3, 8), ("bot_scraping", 1 / 800, 1, 1)):
            if self.cfg and fam != "bot_scraping":
                lo, hi = self.cfg.ring_size
                cap = max(3, n // 30)
            for _ in range(cnt(frac, fam)):
                size = min(cap, r.randint(lo, hi))
                members = [m for m in (take() for _ in range(size)) if m is not None]
                if not members:
                    break
                for m in members:
                    self.owned[m] = fam
                self.groups.append((fam, variant(fam), members))
        self.card_testers = []   # (idx, variant, fresh)
        for _ in range(cnt(0.005, "card_testing")):
            fresh = r.random() < 0.7 or not variants["card_testing"]
            m = take()
            if m is None:
                break
            if fresh:
                self.owned[m] = "card_testing"
            self.card_testers.append((m, variant("card_testing"), fresh))
        normal = [i for i in order if i not in self.owned]
        self.ato = {}            # victim idx -> variant
        hijacked = {m for m, _, f in self.card_testers if not f}
        cand = [i for i in normal if i not in hijacked]
        for i in r.sample(cand, min(len(cand), cnt(0.012, "account_takeover"))):
            self.ato[i] = variant("account_takeover")
        self.card_hijack = {m: v for m, v, f in self.card_testers if not f}
        self.stuffing = []       # (variant, [victim idx...])
        for _ in range(cnt(1 / 1500, "credential_stuffing")):
            k = min(len(normal), max(5, min(n // 8, r.randint(30, 160))))
            if k <= 0:
                break
            self.stuffing.append((variant("credential_stuffing"), r.sample(normal, k)))

        # ---- hard negatives among normal users (a user may carry several)
        hn_n = lambda frac: max(3 if mn else 0, int(round(frac * n))) if mn else int(frac * n)
        self.hard_negatives = {i: set() for i in normal}
        look = self.cfg.lookalike_frac if self.cfg else {}
        kinds = (("traveller", 0.03), ("big_purchase", 0.02), ("decline_then_success", 0.02),
                 ("legit_account_change", 0.02), ("digital_goods", 0.02), ("carrier_nat", 0.10))
        if self.cfg:
            kinds += (("prolific_reviewer", 0.0),)
        for kind, frac in kinds:
            for i in r.sample(normal, min(len(normal), hn_n(look.get(kind, frac)))):
                self.hard_negatives[i].add(kind)
        self.household = {}      # idx -> (shared device, home ip)
        free = [i for i in normal if not self.hard_negatives[i]]
        r.shuffle(free)
        want = hn_n(look.get("shared_household", 0.03))
        while want > 0 and len(free) >= 2:
            size = min(len(free), r.randint(2, 4))
            members = [free.pop() for _ in range(size)]
            cc = self.user_cc[members[0]]
            home = _host(r, r.choice(self.res16[cc]))
            dev = _dev(r)
            for m in members:
                self.user_cc[m] = cc
                self.household[m] = (dev, home)
            want -= size
        self.public = {}         # idx -> (public device, ip, country, tz)
        users = r.sample(normal, min(len(normal), hn_n(look.get("public_device", 0.02))))
        by_cc = defaultdict(list)
        for i in users:
            by_cc[self.user_cc[i]].append(i)
        # library/cafe terminals sit in countries with several such users; each serves many accounts
        local = {cc: [(_dev(r), _host(r, r.choice(self.res16[cc])), cc, _COUNTRIES[cc][1][0])
                      for _ in range(math.ceil(len(v) / 15))] for cc, v in sorted(by_cc.items()) if len(v) >= 3}
        if users and not local:
            cc = max(sorted(by_cc), key=lambda c: len(by_cc[c]))
            local[cc] = [(_dev(r), _host(r, r.choice(self.res16[cc])), cc, _COUNTRIES[cc][1][0])]
        everywhere = [d for v in local.values() for d in v]
        for j, i in enumerate(users):
            devs = local.get(self.user_cc[i]) or everywhere   # others use one while abroad
            self.public[i] = devs[j % len(devs)]

    # ------------------------------------------------------------------ normal users
    def _profile(self, r, idx) -> _User:
        rnd = r.random
        u = _User()
        u.idx, u.uid = idx, f"u{idx:06d}"
        u.cc = cc = self.user_cc[idx]
        u.tz = r.choice(_COUNTRIES[cc][1])
        u.home_ip = _host(r, r.choice(self.res16[cc]))
        u.alt_ip = _host(r, r.choice(self.res16[cc])) if rnd() < 0.3 else u.home_ip[:u.home_ip.rfind(".") + 1] + str(1 + int(rnd() * 254))
        u.work_ip = _host(r, r.choice(self.res16[cc])) if rnd() < 0.35 else None
        u.mobile_pfx = r.choice(self.mob16[cc])
        u.nat_ips = None
        hn = self.hard_negatives.get(idx, ())
        persona = self.persona_names[bisect(self.persona_cum, rnd())]
        if "digital_goods" in hn:
            persona = "digital"
        u.persona = persona
        kinds = ["phone" if rnd() < 0.7 else "desktop"]
        if rnd() < 0.5:
            kinds.append("desktop" if kinds[0] == "phone" else "phone")
        if rnd() < 0.2:
            kinds.append("tablet")
        u.devices = [(_dev(r), k) for k in kinds]
        w = [1.0 + 2 * rnd() for _ in kinds]
        if idx in self.household:
            dev, home = self.household[idx]
            u.home_ip = home
            u.devices.append((dev, "shared"))
            w.append(sum(w) * (0.5 + rnd()))
        u.dev_cum = _cum(w)
        u.p_mobile = 0.2 + 0.6 * rnd()
        if "carrier_nat" in hn:
            u.nat_ips = self.nat_ips[cc]
            u.p_mobile = 0.6 + 0.35 * rnd()
            if u.devices[0][1] != "phone":
                u.devices[0] = (u.devices[0][0], "phone")
        cfg = self.cfg
        if persona == "digital":
            share, rate_med, browse, p_cart, p_buy, p_coupon, p_review = 0, 0.45, 2.0, 0.7, 0.9, 0.02, 0.03
            if cfg:
                rate_med = cfg.digital_rate
        elif cfg and "prolific_reviewer" in hn:
            # reviews (nearly) everything bought, buys often: many reviews per week, all legitimate
            persona = u.persona = "reviewer"
            share, rate_med, browse, p_cart, p_buy, p_coupon, p_review = 0, cfg.reviewer_rate, 4.0, 0.35, 0.8, 0.05, 0.5
        else:
            share, rate_med, browse, p_cart, p_buy, p_coupon, p_review = _PERSONAS[persona]
        u.rate = rate_med * math.exp(0.6 * r.gauss(0, 1))
        if cfg:
            u.rate *= cfg.rate_scale
        u.first_day = int(self.days * rnd() * 0.8) if rnd() < 0.06 else 0   # some accounts are new
        u.p_login = 0.25 + 0.7 * rnd()
        u.p_typo = 0.01 + 0.08 * rnd() ** 2
        u.p_logout = 0.05 + 0.55 * rnd()
        u.gap_mu = math.log(6_000 + 30_000 * rnd() ** 1.5)
        u.gap_sg = 0.7 + 0.6 * rnd()
        u.peak1 = r.choice(_EVENING_PEAKS) + r.gauss(0, 1)
        u.peak2 = 6 + 17 * rnd()
        u.p_peak1 = 0.55 + 0.4 * rnd()
        u.width = 0.7 + 2.0 * rnd()
        ncat = 2 + int(rnd() * 3)
        cats = []
        while len(cats) < ncat:
            c = self.cat_names[bisect(self.cat_pop_cum, rnd())]
            if c not in cats:
                cats.append(c)
        if persona == "digital":
            cats = ["digital", "gift_cards"] + cats[:1]
            u.cat_cum = _cum([8, 1, 1][:len(cats)])
        else:
            u.cat_cum = _cum([rnd() + 0.2 for _ in cats])
        u.cats = cats
        u.p_search = 0.1 + 0.3 * rnd()
        u.browse_mean = browse * (0.5 + rnd())
        u.p_cart = p_cart * (0.5 + rnd())
        u.p_buy = min(0.97, p_buy * (0.7 + 0.6 * rnd()))
        u.p_coupon = p_coupon
        u.p_fail = 0.005 + 0.04 * rnd() ** 2 + (0.08 if persona == "digital" else 0)
        u.p_review = p_review * 2 * rnd()
        u.weekend = 0.5 + rnd()
        u.burst = 0.4 * rnd() ** 2
        u.p_nodev = 0.3 if rnd() < 0.01 else 0.004
        u.multi_buy = 0.45 if persona == "digital" else 0.03
        u.base_tag = "digital_goods" if persona == "digital" else "normal"
        if cfg and persona == "digital":
            u.multi_buy = cfg.digital_multi_buy
        if persona == "reviewer":
            u.p_review = 0.8 + 0.2 * rnd()
            u.base_tag = "prolific_reviewer"
        return u

    def _schedule(self, r, u) -> list:
        """Session start times for one user: Poisson count, diurnal hour, weekend bias, bursts."""
        rnd, gauss = r.random, r.gauss
        days = self.days - u.first_day
        n = max(1, _poisson(r, u.rate * days))
        out = []
        prev = None
        for _ in range(n):
            if prev is not None and rnd() < u.burst:
                day = prev + (1 if rnd() < 0.3 else 0)
            else:
                day = u.first_day + int(days * rnd())
                if self._weekday(day) >= 5 and rnd() > u.weekend:
                    day = u.first_day + int(days * rnd())
            prev = day
            peak = u.peak1 if rnd() < u.p_peak1 else u.peak2
            ts = self._local_ts(day, (peak + u.width * gauss(0, 1)) % 24, u.tz)
            if self.start <= ts < self.end - HOUR_MS:
                out.append(ts)
        if not out:
            out.append(self.start + int(rnd() * (self.end - self.start - 2 * HOUR_MS)))
        out.sort()
        return out

    def _normal_user(self, idx, out, lockout_at=None):
        r = random.Random(f"{self.rng_key}/u/{idx}")
        rnd = r.random
        u = self._profile(r, idx)
        hn = self.hard_negatives.get(idx, set())
        starts = self._schedule(r, u)
        kinds = [None] * len(starts)
        # rare organic account changes, plus the designated look-alike sessions
        for j in range(len(starts)):
            if rnd() < 0.004:
                kinds[j] = "change"
        for kind, code in (("big_purchase", "big"), ("decline_then_success", "decline"),
                           ("legit_account_change", "change")):
            if kind in hn:
                j = int(rnd() * len(starts))
                kinds[j] = code
                if code == "change" and len(starts) == 1:
                    starts.append(min(self.end - 2 * HOUR_MS, starts[0] + int(DAY_MS * (0.2 + 2 * rnd()))))
                    kinds.append(None)
        trip = None
        if "traveller" in hn:
            d0 = self.start + int((self.end - self.start) * (0.1 + 0.65 * rnd()))
            d1 = min(self.end - HOUR_MS, d0 + int(DAY_MS * (2 + 8 * rnd())))
            dest = u.cc
            while dest == u.cc:
                dest = self._pick_cc(r)
            trip = (d0, d1, dest, r.choice(_COUNTRIES[dest][1]))
            extra = 2 + _poisson(r, max(u.rate, 0.4) * (d1 - d0) / DAY_MS)
            for _ in range(extra):
                starts.append(d0 + int((d1 - d0) * rnd()))
                kinds.append(None)
        if idx in self.public:
            for _ in range(1 + int(rnd() * 3)):
                starts.append(self.start + int((self.end - self.start - 2 * HOUR_MS) * rnd()))
                kinds.append("public")
        order = sorted(range(len(starts)), key=lambda j: starts[j])
        pending = []      # (ready ts, item) reviews the user will write
        t_end = self.start
        changed = False
        for j in order:
            t = starts[j]
            kind = kinds[j]
            if t < t_end + MIN_MS:
                t = t_end + MIN_MS + int(MIN_MS * 30 * rnd())
            if t >= self.end - 10 * MIN_MS:
                break
            if trip and trip[0] <= t < trip[1] and kind != "public":
                kind = kind if kind in ("big", "decline") else "trip"
            if lockout_at is not None and t >= lockout_at and not changed:
                kind = "lockout"
                changed = True
            t_end = self._session(r, u, t, kind, trip, out, pending)
            if kind == "change" and "legit_account_change" in hn and rnd() < 0.4:
                # the change came with a new phone: it becomes one of the user's devices
                u.devices.append((self._last_dev, "phone"))
                u.dev_cum = _cum([1.0] * (len(u.devices) - 1) + [2.0])
        return u

    def _session(self, r, u, t, kind, trip, out, pending):
        """One human session; returns its end time. `kind` selects the special flows."""
        rnd, gauss, exp = r.random, r.gauss, math.exp
        app = out.append
        uid = u.uid
        mu, sg = u.gap_mu, u.gap_sg
        tag = u.base_tag
        # ---- where from
        if kind == "public":
            dev, ip, cc, _ = self.public[u.idx]
            tag = "public_device"
        elif kind == "trip":
            dev = u.devices[0][0]
            ip = _host(r, r.choice(self.res16[trip[2]])) if rnd() < 0.7 else _host(r, r.choice(self.mob16[trip[2]]))
            cc = trip[2]
            tag = "traveller"
        else:
            dev, dkind = u.devices[bisect(u.dev_cum, rnd())] if len(u.devices) > 1 else u.devices[0]
            cc = u.cc
            if kind == "change" and len(u.devices) and rnd() < 0.4:
                dev = _dev(r)
                dkind = "phone"
            if dkind == "phone" and rnd() < u.p_mobile:
                if u.nat_ips:
                    ip = u.nat_ips[int(rnd() * len(u.nat_ips))]
                    tag = "carrier_nat"
                else:
                    ip = _host(r, u.mobile_pfx)
            elif dkind == "desktop" and u.work_ip and rnd() < 0.35:
                ip = u.work_ip
            else:
                ip = u.home_ip if rnd() < 0.88 else u.alt_ip
            if dkind == "shared":
                tag = "shared_household"
        self._last_dev = dev
        if kind == "big":
            tag = "big_purchase"
        elif kind == "decline":
            tag = "decline_then_success"
        elif kind == "change":
            tag = "legit_account_change"
        if rnd() < u.p_nodev:
            dev = None
        x = rnd()
        if x < 0.002:
            ip = cc = None
        elif x < 0.004:
            cc = None
        sid = _sid(r) if rnd() > 0.005 else None

        def gap():
            return 400 + int(min(1_200_000.0, exp(mu + sg * gauss(0, 1))))

        # ---- authentication
        if kind == "lockout":
            for _ in range(1 + int(rnd() * 3)):
                app((t, len(out), uid, "login_failed", None, None, None, dev, ip, cc, None, 0, tag, ""))
                t += 3_000 + int(20_000 * rnd())
            t += int(MIN_MS * (1 + 10 * rnd()))
            app((t, len(out), uid, "change_password", None, None, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
            app((t, len(out), uid, "login", None, None, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        elif kind in ("public", "change") or rnd() < u.p_login:
            if rnd() < u.p_typo:
                app((t, len(out), uid, "login_failed", None, None, None, dev, ip, cc, None, 0, tag, ""))
                t += 2_500 + int(12_000 * rnd())
                if rnd() < 0.2:
                    app((t, len(out), uid, "login_failed", None, None, None, dev, ip, cc, None, 0, tag, ""))
                    t += 3_000 + int(15_000 * rnd())
            app((t, len(out), uid, "login", None, None, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        if kind == "change":
            changes = [et for et, p in (("change_address", 0.6), ("add_payment_method", 0.5),
                                         ("change_password", 0.25), ("change_email", 0.12)) if rnd() < p]
            for et in changes or ["change_address"]:
                t += int(20_000 + 90_000 * rnd())
                app((t, len(out), uid, et, None, None, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        # ---- reviews of earlier purchases
        n_reviews = 1 if u.persona != "reviewer" else 1 + int(3 * rnd())
        while n_reviews and pending and pending[0][0] <= t and rnd() < 0.75:
            n_reviews -= 1
            _, it = pending.pop(0)
            iid, cat = self.item_id[it], self.item_cat[it]
            if rnd() < 0.7:
                app((t, len(out), uid, "view_item", iid, cat, None, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
            t += int(20_000 + 120_000 * rnd())
            app((t, len(out), uid, "review", iid, cat, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        # ---- browsing
        cats, ccum = u.cats, u.cat_cum
        big = kind == "big"
        steps = 1 + int(-u.browse_mean * math.log(1.0 - rnd()))
        if big:
            steps = 3 + int(rnd() * 6)
        cart = []
        cat = None
        it = None
        p_search, p_cart = u.p_search, u.p_cart
        for _ in range(steps):
            if cat is None or rnd() < p_search:
                if big:
                    cat = r.choice(("electronics", "electronics", "jewelry", "home"))
                elif rnd() < 0.85:
                    cat = cats[bisect(ccum, rnd())]
                else:
                    cat = self.cat_names[bisect(self.cat_pop_cum, rnd())]
                app((t, len(out), uid, "search", None, cat if rnd() < 0.7 else None, None, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
            if big:
                lst = self.expensive[cat]
                it = lst[int(len(lst) * rnd() ** 1.5)]
            else:
                lst = self.cat_items[cat]
                it = lst[int(len(lst) * rnd() ** 2.2)]
            iid = self.item_id[it]
            app((t, len(out), uid, "view_item", iid, cat, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
            y = rnd()
            if y < p_cart and (not big or not cart):
                qty = 1 if (big or rnd() < 0.85) else 2 + int(rnd() * 2)
                amt = round(self.item_price[it] * qty, 2)
                cart.append((it, amt))
                app((t, len(out), uid, "add_to_cart", iid, cat, amt, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
                if rnd() < 0.07:
                    cart.pop()
                    app((t, len(out), uid, "remove_from_cart", iid, cat, None, dev, ip, cc, sid, 0, tag, ""))
                    t += gap()
            elif y > 0.991:
                app((t, len(out), uid, "wishlist_add" if y > 0.9955 else "share_item", iid, cat, None,
                     dev, ip, cc, sid, 0, tag, ""))
                t += gap()
            if rnd() < 0.12:
                cat = None
        # ---- purchase
        force = kind in ("big", "decline", "change")
        if force and not cart and it is not None:
            amt = self.item_price[it]
            cart.append((it, amt))
            app((t, len(out), uid, "add_to_cart", self.item_id[it], self.item_cat[it], amt, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        rounds = 0
        while cart and (force or rnd() < u.p_buy):
            rounds += 1
            total = round(sum(a for _, a in cart), 2)
            main = max(cart, key=lambda c: c[1])[0]
            mcat = self.item_cat[main]
            miid = self.item_id[main] if len(cart) == 1 else None
            if total > 15 and rnd() < u.p_coupon:
                disc = min(round(total * 0.5, 2), float(r.choice((5, 5, 10, 10, 15, 20))) if rnd() < 0.7
                           else round(total * r.choice((0.1, 0.15, 0.2)), 2))
                app((t, len(out), uid, "redeem_coupon", None, None, disc, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
                total = round(total - disc, 2)
            app((t, len(out), uid, "checkout", miid, mcat, total, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
            fails = (1 + int(rnd() * 2.5)) if kind == "decline" else (1 if big and rnd() < 0.25 else 0)
            while fails == 0 and rnd() < u.p_fail and rounds < 5:
                fails = 1
            if self.storms and fails == 0:
                p_storm = self._storm_p(t)
                if p_storm and rnd() < p_storm:
                    fails = 1 + int(rnd() * 2)
                    tag = "decline_storm"
            paid = True
            for f in range(fails):
                app((t, len(out), uid, "payment_failed", miid, mcat, total, dev, ip, cc, sid, 0, tag, ""))
                t += 5_000 + int(exp(mu + sg * gauss(0, 1)))
                if rnd() < 0.35:
                    t += int(30_000 + 120_000 * rnd())
                    app((t, len(out), uid, "add_payment_method", None, None, None, dev, ip, cc, sid, 0, tag, ""))
                    t += gap()
                if kind != "decline" and rnd() < 0.2:
                    paid = False
                    break
            if paid:
                app((t, len(out), uid, "payment", miid, mcat, total, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
                for it2, _ in cart:
                    if rnd() < u.p_review:
                        pending.append((t + int(DAY_MS * (1 + 9 * rnd())), it2))
                pending.sort()
            cart = []
            force = False
            if rnd() < u.multi_buy:   # digital goods: another top-up in the same session
                c2 = cats[bisect(ccum, rnd())]
                it = self._item(r, c2)
                amt = self.item_price[it]
                app((t, len(out), uid, "view_item", self.item_id[it], c2, None, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
                app((t, len(out), uid, "add_to_cart", self.item_id[it], c2, amt, dev, ip, cc, sid, 0, tag, ""))
                t += gap()
                cart = [(it, amt)]
        if rnd() < 0.002:
            app((t, len(out), uid, "contact_support", None, None, None, dev, ip, cc, sid, 0, tag, ""))
            t += gap()
        if kind == "public" or rnd() < u.p_logout:
            app((t, len(out), uid, "logout", None, None, None, dev, ip, cc, sid, 0, tag, ""))
        return t

    # ------------------------------------------------------------------ attack helpers
    def _attacker_origin(self, r, victim_cc=None):
        """(ip /16 prefix, country) for an attacker: datacenter, own country or a residential proxy."""
        x = r.random()
        if victim_cc and x < 0.25:
            return r.choice(self.res16[victim_cc]), victim_cc
        if x < 0.5:
            return r.choice(self.dc16)
        cc = self._attacker_cc(r, victim_cc)
        return r.choice(self.res16[cc]), cc

    def _human_gap(self, r, median_s=25.0, sd=0.9):
        return 500 + int(min(1_800_000.0, median_s * 1000 * math.exp(sd * r.gauss(0, 1))))

    def _waking(self, r, t, tz):
        """Move t forward to the attacker's local waking hours (slow variants pretend to be human)."""
        h = ((t / HOUR_MS) + tz) % 24
        if 8 <= h < 23.5:
            return t
        wait = (8 - h) % 24 + 3 * r.random()
        return t + int(wait * HOUR_MS)

    def _fit(self, t0, span_ms):
        """Start time so that an attack lasting span_ms still ends inside the window."""
        return max(self.start, min(t0, self.end - span_ms - HOUR_MS))

    # ------------------------------------------------------------------ attack families
    def _account_takeover(self, r, u, variant, out) -> tuple[int, bool]:
        """Attacker events on a victim with normal history. Returns (first ts, credentials changed)."""
        fam, uid = "account_takeover", u.uid
        W = self.end - self.start
        t = self.start + int(W * (0.35 + 0.5 * r.random()))
        if variant == "slow":
            t = self._fit(t, 6 * DAY_MS)
        else:
            t = self._fit(t, 2 * HOUR_MS)
        t0 = t
        st = {"dev": None if r.random() < 0.06 else _dev(r)}
        pfx, cc = self._attacker_origin(r, u.cc)
        st["ip"], st["cc"] = _host(r, pfx), cc
        tz = _COUNTRIES.get(cc, (0, (0,)))[1][0]
        new_cats = [c for c in _RESALE_CATS if c not in u.cats] or list(_RESALE_CATS)
        changed = False

        def E(et, item=None, cat=None, amt=None, sid=None):
            out.append((t, len(out), uid, et, item, cat, amt, st["dev"], st["ip"], st["cc"], sid, 1, fam, variant))

        def purchase(sid, lo_gap, hi_gap, big=True):
            nonlocal t
            c = r.choice(new_cats)
            if r.random() < 0.6:
                E("search", None, c, sid=sid)
                t += int(lo_gap + (hi_gap - lo_gap) * r.random())
            cart = []
            for _ in range(1 + int(r.random() * 3)):
                lst = self.expensive[c] if big else self.cat_items[c]
                it = r.choice(lst[:40])
                E("view_item", self.item_id[it], c, sid=sid)
                t += int(lo_gap + (hi_gap - lo_gap) * r.random())
                if not cart or r.random() < 0.5:
                    qty = 1 + int(r.random() * (3 if c == "gift_cards" else 2))
                    amt = round(self.item_price[it] * qty, 2)
                    cart.append((it, amt))
                    E("add_to_cart", self.item_id[it], c, amt, sid)
                    t += int(lo_gap + (hi_gap - lo_gap) * r.random())
            total = round(sum(a for _, a in cart), 2)
            miid = self.item_id[cart[0][0]] if len(cart) == 1 else None
            E("checkout", miid, c, total, sid)
            t += int(lo_gap + (hi_gap - lo_gap) * r.random())
            if r.random() < 0.25:
                E("payment_failed", miid, c, total, sid)
                t += int(lo_gap + (hi_gap - lo_gap) * r.random())
                if r.random() < 0.5:
                    E("add_payment_method", sid=sid)
                    t += int(lo_gap + (hi_gap - lo_gap) * r.random())
            E("payment", miid, c, total, sid)
            t += int(lo_gap + (hi_gap - lo_gap) * r.random())

        if variant == "fast":
            for _ in range(r.choice((0, 0, 1, 1, 2, 3, 5))):
                E("login_failed")
                t += 1_500 + int(12_000 * r.random())
            sid = _sid(r)
            E("login", sid=sid)
            t += 3_000 + int(15_000 * r.random())
            changes = [et for et, p in (("change_email", 0.7), ("change_password", 0.6),
                                        ("change_address", 0.55), ("add_payment_method", 0.7)) if r.random() < p]
            if len(changes) > 2 and r.random() < 0.3:
                r.shuffle(changes)
            for et in changes:
                E(et, sid=sid)
                t += 4_000 + int(35_000 * r.random())
            changed = "change_password" in changes or "change_email" in changes
            for _ in range(1 + (r.random() < 0.45) + (r.random() < 0.15)):
                purchase(sid, 2_000, 25_000)
            if r.random() < 0.3:
                E("logout", sid=sid)
        else:
            # recon session: looks like the victim browsing
            if r.random() < 0.4:
                E("login_failed")
                t += 20_000 + int(MIN_MS * 3 * r.random())
            sid = _sid(r)
            E("login", sid=sid)
            t += self._human_gap(r)
            for _ in range(2 + int(r.random() * 4)):
                c = r.choice(u.cats)
                E("view_item", self.item_id[self._item(r, c)], c, sid=sid)
                t += self._human_gap(r)
            if r.random() < 0.5:
                E("logout", sid=sid)
            # change session a day or more later, maybe from another exit node
            t = self._waking(r, t + int(HOUR_MS * (14 + 50 * r.random())), tz)
            if r.random() < 0.5:
                pfx, st["cc"] = self._attacker_origin(r, u.cc)
                st["ip"] = _host(r, pfx)
            sid = _sid(r)
            E("login", sid=sid)
            t += self._human_gap(r, 40)
            changes = [et for et, p in (("change_address", 0.7), ("add_payment_method", 0.6),
                                        ("change_email", 0.35), ("change_password", 0.25)) if r.random() < p]
            for et in changes or ["change_address"]:
                E(et, sid=sid)
                t += self._human_gap(r, 60)
            changed = "change_password" in changes or "change_email" in changes
            for _ in range(int(r.random() * 3)):
                c = r.choice(u.cats)
                E("view_item", self.item_id[self._item(r, c)], c, sid=sid)
                t += self._human_gap(r)
            # one to three purchase sessions spread over the following days
            for _ in range(1 + int(r.random() * 2.5)):
                t = self._waking(r, t + int(HOUR_MS * (3 + 40 * r.random())), tz)
                sid = _sid(r)
                E("login", sid=sid)
                t += self._human_gap(r)
                purchase(sid, 8_000, 90_000, big=r.random() < 0.6)
                if r.random() < 0.4:
                    E("logout", sid=sid)
        return t0, changed

    def _card_testing(self, r, uid, variant, out, cc_home=None, t0=None):
        """Many small payments, mostly declined, on freshly added cards."""
        fam = "card_testing"
        dev = None if r.random() < 0.3 else _dev(r)
        pfx, cc = self._attacker_origin(r, cc_home)
        ip = _host(r, pfx)
        W = self.end - self.start
        if t0 is None:
            t0 = self.start + int(W * (0.05 + 0.85 * r.random()))
        fixed = r.choice((None, None, 1.0, 0.5, 2.0, 0.99))
        cheap = self.cheap["digital"] + self.cheap["gift_cards"]

        def E(t, et, item=None, cat=None, amt=None, sid=None, d=None, i=None, c=None):
            out.append((t, len(out), uid, et, item, cat, amt, d or dev, i or ip, c or cc, sid, 1, fam, variant))

        def amount():
            if fixed is not None and r.random() < 0.8:
                return fixed
            return round(0.5 + 4.5 * r.random() ** 2, 2) if variant == "fast" else round(1 + 20 * r.random() ** 2, 2)

        if variant == "fast":
            t = self._fit(t0, 3 * HOUR_MS)
            period = 2_000 + 18_000 * r.random()
            p_fail = 0.7 + 0.25 * r.random()
            sid = _sid(r)
            E(t, "login", sid=sid)
            t += 3_000 + int(8_000 * r.random())
            for _ in range(1 + int(r.random() * 4)):
                E(t, "add_payment_method", sid=sid)
                t += int(period * (0.5 + r.random()))
                for _ in range(5 + int(r.random() * 25)):
                    a = amount()
                    if r.random() < 0.35:
                        it = r.choice(cheap)
                        E(t, "checkout", self.item_id[it], self.item_cat[it], a, sid)
                        t += int(period * 0.3 * (0.5 + r.random()))
                    E(t, "payment_failed" if r.random() < p_fail else "payment", None, "digital", a, sid)
                    t += int(period * math.exp(self._jitter(0.35) * r.gauss(0, 1)))
        else:
            t = self._fit(t0, 8 * DAY_MS)
            tz = _COUNTRIES.get(cc, (0, (0,)))[1][0]
            p_fail = 0.5 + 0.3 * r.random()
            for _ in range(3 + int(r.random() * 8)):
                t = self._waking(r, t, tz)
                if r.random() < 0.6:
                    pfx, cc2 = self._attacker_origin(r, cc_home)
                    ip2 = _host(r, pfx)
                else:
                    ip2, cc2 = ip, cc
                sid = _sid(r)
                E(t, "login", sid=sid, i=ip2, c=cc2)
                t += self._human_gap(r)
                if r.random() < 0.7:
                    E(t, "add_payment_method", sid=sid, i=ip2, c=cc2)
                    t += self._human_gap(r, 60)
                for _ in range(1 + int(r.random() * 5)):
                    a = amount()
                    it = r.choice(cheap)
                    E(t, "view_item", self.item_id[it], self.item_cat[it], None, sid, i=ip2, c=cc2)
                    t += self._human_gap(r)
                    E(t, "checkout", self.item_id[it], self.item_cat[it], a, sid, i=ip2, c=cc2)
                    t += self._human_gap(r, 15)
                    E(t, "payment_failed" if r.random() < p_fail else "payment", self.item_id[it],
                      self.item_cat[it], a, sid, i=ip2, c=cc2)
                    t += self._human_gap(r, 60)
                t += int(HOUR_MS * (2 + 30 * r.random()))

    def _credential_stuffing(self, r, victims, variant, out):
        """Login attempts against many existing accounts from shared attacker infrastructure."""
        fam = "credential_stuffing"
        W = self.end - self.start
        if variant == "fast":
            t = self._fit(self.start + int(W * (0.05 + 0.85 * r.random())), 3 * HOUR_MS)
            origins = [self._attacker_origin(r) for _ in range(1 + int(r.random() * 4))]
            ips = [(_host(r, p), c) for p, c in origins]
            devs = [None] if r.random() < 0.4 else [_dev(r) for _ in range(1 + int(r.random() * 3))]
            med = 300 + 2_500 * r.random()
            p_ok = 0.01 + 0.05 * r.random()
            for v in victims:
                uid = f"u{v:06d}"
                for _ in range(1 + int(r.random() * 2.5)):
                    ip, cc = ips[int(r.random() * len(ips))]
                    dev = devs[int(r.random() * len(devs))]
                    ok = r.random() < p_ok
                    sid = _sid(r) if ok else None
                    out.append((t, len(out), uid, "login" if ok else "login_failed", None, None, None,
                                dev, ip, cc, sid, 1, fam, variant))
                    t += 50 + int(med * math.exp(self._jitter(0.6) * r.gauss(0, 1)))
                    if ok:
                        if r.random() < 0.5:
                            out.append((t, len(out), uid, "logout", None, None, None, dev, ip, cc, sid, 1, fam, variant))
                            t += 50 + int(med * r.random())
                        break
        else:
            # low and slow: one attempt per account, fresh residential exit and device each time
            devs = [_dev(r) for _ in range(10 + int(r.random() * 40))]
            med_min = 10 + 60 * r.random()
            span = int(len(victims) * med_min * MIN_MS * 1.6)
            t = self._fit(self.start + int(W * (0.05 + 0.7 * r.random())), min(span, W // 2))
            p_ok = 0.02 + 0.05 * r.random()
            for v in victims:
                uid = f"u{v:06d}"
                vcc = self.user_cc[v]
                for _ in range(1 if r.random() < 0.8 else 2):
                    pfx, cc = (r.choice(self.res16[vcc]), vcc) if r.random() < 0.5 else self._attacker_origin(r)
                    ip = _host(r, pfx)
                    dev = r.choice(devs) if r.random() < 0.85 else None
                    ok = r.random() < p_ok
                    sid = _sid(r) if ok else None
                    out.append((t, len(out), uid, "login" if ok else "login_failed", None, None, None,
                                dev, ip, cc, sid, 1, fam, variant))
                    if ok:
                        t2 = t + self._human_gap(r)
                        c = r.choice(self.cat_names)
                        out.append((t2, len(out), uid, "view_item", self.item_id[self._item(r, c)], c, None,
                                    dev, ip, cc, sid, 1, fam, variant))
                    t += int(med_min * MIN_MS * math.exp(0.9 * r.gauss(0, 1)))
                    if ok:
                        break

    def _bot_scraping(self, r, uid, variant, out, n_events=None):
        """Crawler: view_item/search at machine-regular intervals, catalogue in id order.

        `n_events` (world mode): how many events this crawler emits; its cadence jitter is the world's.
        """
        fam = "bot_scraping"
        W = self.end - self.start
        pos = int(r.random() * _N_ITEMS)
        stride = r.choice((1, 1, 1, 2, 3, 7))
        p_search = 0.05 + 0.2 * r.random()
        cats = self.cat_names

        def crawl(t, n, period, jitter, dev, ip, cc, sid):
            nonlocal pos
            k = int(r.random() * len(cats))
            for _ in range(n):
                if r.random() < p_search:
                    k += 1
                    out.append((t, len(out), uid, "search", None, cats[k % len(cats)], None, dev, ip, cc, sid, 1, fam, variant))
                else:
                    pos = (pos + stride) % _N_ITEMS
                    out.append((t, len(out), uid, "view_item", self.item_id[pos], self.item_cat[pos], None,
                                dev, ip, cc, sid, 1, fam, variant))
                if self.cfg is None:
                    t += max(50, int(period * (1 + jitter * r.gauss(0, 1))))
                else:   # multiplicative, so human-like jitter (0.5+) never collapses to the 50 ms floor
                    t += max(50, int(period * math.exp(jitter * r.gauss(0, 1))))
            return t

        if n_events is not None:
            self._bot_fleet_member(r, variant, n_events, crawl)
        elif variant == "fast":
            period = 600 + 2_400 * r.random()
            n = 400 + int(r.random() * 1100)
            t = self._fit(self.start + int(W * r.random()), int(n * period * 1.2))
            pfx, cc = r.choice(self.dc16) if r.random() < 0.7 else self._attacker_origin(r)
            dev = None if r.random() < 0.4 else _dev(r)
            sid = _sid(r)
            ip = _host(r, pfx)
            if r.random() < 0.5:
                out.append((t, len(out), uid, "login", None, None, None, dev, ip, cc, sid, 1, fam, variant))
                t += int(period)
            crawl(t, n, period, 0.01 + 0.04 * r.random(), dev, ip, cc, sid)
        else:
            period = 20_000 + 70_000 * r.random()
            jitter = 0.02 + 0.03 * r.random()
            n_sess = 3 + int(r.random() * 6)
            per = 40 + int(r.random() * 80)
            t = self._fit(self.start + int(W * r.random()), int(n_sess * (per * period + 8 * HOUR_MS)))
            dev = _dev(r)
            for _ in range(n_sess):
                pfx, cc = self._attacker_origin(r)
                if r.random() < 0.5:
                    dev = _dev(r)
                t = crawl(t, per, period, jitter, dev, _host(r, pfx), cc, _sid(r) if r.random() < 0.7 else None)
                t += int(HOUR_MS * (2 + 8 * r.random()))

    def _bot_fleet(self, bots, out) -> None:
        """World mode: the crawler fleet emits `bot_event_share` of ALL events, split unevenly."""
        others = sum(1 for e in out if self.start <= e[0] < self.end)
        share = self.cfg.bot_event_share
        total = int(round(share / (1.0 - share) * others))
        rf = random.Random(f"{self.rng_key}/botfleet")
        weights = [rf.paretovariate(1.5) for _ in bots]
        for (rg, m), w in zip(bots, weights):
            variant = "fast" if rf.random() < self.cfg.bot_fast_frac else "slow"
            n_events = max(20, int(total * w / sum(weights)))
            self._bot_scraping(rg, f"u{m:06d}", variant, out, n_events=n_events)

    def _bot_fleet_member(self, r, variant, n_events, crawl):
        """World mode: a crawler of a fleet with a fixed event budget, spread over crawl sessions."""
        W = self.end - self.start
        jitter = self.cfg.attacker_jitter * math.exp(0.3 * r.gauss(0, 1))
        if variant == "fast":
            period, per = 300 + 2_700 * r.random(), 300 + int(r.random() * 3000)
        else:
            period, per = 15_000 + 75_000 * r.random(), 30 + int(r.random() * 120)
        n_sess = max(1, math.ceil(n_events / per))
        per = math.ceil(n_events / n_sess)
        # sessions spread evenly over the log; each starts from a fresh exit node, sometimes a new device
        slot = W / n_sess
        dev = None if r.random() < 0.3 else _dev(r)
        for k in range(n_sess):
            pfx, cc = r.choice(self.dc16) if r.random() < 0.5 else self._attacker_origin(r)
            if r.random() < 0.3:
                dev = _dev(r)
            t = self.start + int(slot * (k + 0.8 * r.random()))
            crawl(t, min(per, n_events), period, jitter, dev, _host(r, pfx), cc, _sid(r) if r.random() < 0.7 else None)
            n_events -= per
            if n_events <= 0:
                break

    def _jitter(self, default: float) -> float:
        """Log-sd of a fast attacker's gaps: the fixed generator's, or the world's cadence."""
        return default if self.cfg is None else self.cfg.attacker_jitter

    def _ring_span(self, r, default_ms: float) -> float:
        """A slow ring's spread in time: the fixed generator's, or drawn from the world's range."""
        if self.cfg is None:
            return default_ms
        lo, hi = self.cfg.ring_span_hours
        return math.exp(r.uniform(math.log(lo), math.log(hi))) * HOUR_MS

    def _ring_setup(self, r, variant):
        """Shared infrastructure of a fraud ring: a few devices and IPs in one country."""
        cc = r.choice(("CN", "VN", "ID", "IN", "PH", "NG", "BR", "US", "RU", "PK"))
        devs = [_dev(r) for _ in range(1 + int(r.random() * 3))]
        pfx = r.choice(self.res16[cc] + self.mob16[cc])
        base = f"{pfx}{int(r.random() * 256)}."
        ips = [f"{base}{1 + int(r.random() * 254)}" for _ in range(1 + int(r.random() * 2))]
        tz = _COUNTRIES[cc][1][0]
        return cc, devs, ips, tz

    def _ring_where(self, r, variant, k, cc, devs, ips):
        """(device, ip) for the k-th session of a ring; the slow variant rotates mobile IPs."""
        dev = devs[k % len(devs)] if r.random() < 0.9 else r.choice(devs)
        if variant == "slow" and r.random() < 0.7:
            ip = _host(r, r.choice(self.mob16[cc]))
        else:
            ip = ips[int(r.random() * len(ips))]
        return dev, ip

    def _brushing(self, r, members, variant, out):
        """Click farm: shared devices, small purchases of the same few items, then reviews."""
        fam = "brushing"
        cc, devs, ips, tz = self._ring_setup(r, variant)
        cat = r.choice(("beauty", "fashion", "home", "toys", "health", "electronics"))
        targets = r.sample(self.cheap[cat], min(len(self.cheap[cat]), 1 + int(r.random() * 3)))
        W = self.end - self.start
        span = self._ring_span(r, (1 + 12 * r.random()) * DAY_MS) if variant == "slow" else 4 * HOUR_MS
        t0 = self._fit(self.start + int(W * (0.05 + 0.8 * r.random())), int(span) + 4 * DAY_MS)
        t = t0
        k = 0
        for m in members:
            uid = f"u{m:06d}"
            rounds = 1 + int(r.random() * (2 if variant == "fast" else 3.5))
            for _ in range(rounds):
                if variant == "fast":
                    gap = lambda med=8.0: 300 + int(med * 1000 * math.exp(self._jitter(0.5) * r.gauss(0, 1)))
                    ts = t
                else:
                    gap = lambda med=25.0: self._human_gap(r, med)
                    ts = self._waking(r, t0 + int(span * r.random()), tz)
                dev, ip = self._ring_where(r, variant, k, cc, devs, ips)
                k += 1
                sid = _sid(r)
                E = lambda et, item=None, c=None, amt=None: out.append(
                    (ts, len(out), uid, et, item, c, amt, dev, ip, cc, sid, 1, fam, variant))
                E("login")
                ts += gap()
                if r.random() < 0.5:
                    E("search", None, cat)
                    ts += gap()
                it = r.choice(targets)
                iid = self.item_id[it]
                E("view_item", iid, cat)
                ts += gap()
                price = self.item_price[it]
                E("add_to_cart", iid, cat, price)
                ts += gap()
                E("checkout", iid, cat, price)
                ts += gap()
                E("payment", iid, cat, price)
                ts += gap()
                if variant == "slow" and r.random() < 0.6:
                    if r.random() < 0.5:
                        E("logout")
                    ts = self._waking(r, ts + int(DAY_MS * (0.5 + 2.5 * r.random())), tz)
                    sid = _sid(r)
                    dev, ip = self._ring_where(r, variant, k, cc, devs, ips)
                    E("login")
                    ts += gap()
                    E("view_item", iid, cat)
                    ts += gap()
                ts += gap(30.0)
                E("review", iid, cat)
                ts += gap()
                if r.random() < 0.5:
                    E("logout")
                    ts += gap()
                if variant == "fast":
                    t = ts + 20_000 + int(160_000 * r.random())

    def _promo_abuse(self, r, members, variant, out):
        """Fresh accounts on the same device(s) each redeeming the same new-customer coupon."""
        fam = "promo_abuse"
        cc, devs, ips, tz = self._ring_setup(r, variant)
        coupon = float(r.choice((5, 10, 10, 15, 20, 25)))
        min_order = coupon * (2 + 2 * r.random())
        W = self.end - self.start
        span = self._ring_span(r, (2 + 10 * r.random()) * DAY_MS) if variant == "slow" else 3 * HOUR_MS
        t0 = self._fit(self.start + int(W * (0.05 + 0.8 * r.random())), int(span))
        t = t0
        for k, m in enumerate(members):
            uid = f"u{m:06d}"
            if variant == "fast":
                gap = lambda: 500 + int(6_000 * math.exp(self._jitter(0.5) * r.gauss(0, 1)))
                ts = t
            else:
                gap = lambda: self._human_gap(r, 20)
                ts = self._waking(r, t0 + int(span * r.random()), tz)
            dev, ip = self._ring_where(r, variant, k, cc, devs, ips)
            sid = _sid(r)
            E = lambda et, item=None, c=None, amt=None: out.append(
                (ts, len(out), uid, et, item, c, amt, dev, ip, cc, sid, 1, fam, variant))
            E("login")
            ts += gap()
            cart, total = [], 0.0
            while total < min_order and len(cart) < 6:
                c = r.choice(self.cat_names)
                it = r.choice(self.cheap[c][:60])
                E("view_item", self.item_id[it], c)
                ts += gap()
                amt = self.item_price[it]
                E("add_to_cart", self.item_id[it], c, amt)
                ts += gap()
                cart.append(it)
                total = round(total + amt, 2)
            E("redeem_coupon", None, None, coupon)
            ts += gap()
            pay = round(max(0.0, total - coupon), 2)
            main = max(cart, key=lambda i: self.item_price[i])
            miid = self.item_id[main] if len(cart) == 1 else None
            E("checkout", miid, self.item_cat[main], pay)
            ts += gap()
            E("payment", miid, self.item_cat[main], pay)
            ts += gap()
            if r.random() < 0.6:
                E("logout")
            t = ts + 15_000 + int(240_000 * r.random())

    def _fake_reviews(self, r, members, variant, out):
        """Accounts writing many reviews of the same items without buying them."""
        fam = "fake_reviews"
        cc, devs, ips, tz = self._ring_setup(r, variant)
        pool = []
        for _ in range(3 + int(r.random() * 8)):
            c = r.choice(self.cat_names)
            pool.append(self._item(r, c))
        W = self.end - self.start
        span = self._ring_span(r, (3 + 15 * r.random()) * DAY_MS) if variant == "slow" else 3 * HOUR_MS
        t0 = self._fit(self.start + int(W * (0.05 + 0.8 * r.random())), int(span))
        t = t0
        for k, m in enumerate(members):
            uid = f"u{m:06d}"
            n_rev = 5 + int(r.random() * (16 if variant == "fast" else 11))
            if variant == "fast":
                dev, ip = self._ring_where(r, variant, k, cc, devs, ips)
                sid = _sid(r)
                out.append((t, len(out), uid, "login", None, None, None, dev, ip, cc, sid, 1, fam, variant))
                t += 2_000 + int(8_000 * r.random())
                for it in (r.choice(pool) for _ in range(n_rev)):
                    iid, c = self.item_id[it], self.item_cat[it]
                    if r.random() < 0.6:
                        out.append((t, len(out), uid, "view_item", iid, c, None, dev, ip, cc, sid, 1, fam, variant))
                        t += 1_000 + int(8_000 * r.random())
                    out.append((t, len(out), uid, "review", iid, c, None, dev, ip, cc, sid, 1, fam, variant))
                    t += 5_000 + int(40_000 * r.random())
                t += 30_000 + int(240_000 * r.random())
            else:
                for _ in range(n_rev):
                    ts = self._waking(r, t0 + int(span * r.random()), tz)
                    dev, ip = self._ring_where(r, variant, k, cc, devs, ips)
                    sid = _sid(r)
                    it = r.choice(pool)
                    iid, c = self.item_id[it], self.item_cat[it]
                    if r.random() < 0.7:
                        out.append((ts, len(out), uid, "login", None, None, None, dev, ip, cc, sid, 1, fam, variant))
                        ts += self._human_gap(r)
                    for _ in range(int(r.random() * 3)):
                        c2 = r.choice(self.cat_names)
                        out.append((ts, len(out), uid, "view_item", self.item_id[self._item(r, c2)], c2, None,
                                    dev, ip, cc, sid, 1, fam, variant))
                        ts += self._human_gap(r)
                    out.append((ts, len(out), uid, "view_item", iid, c, None, dev, ip, cc, sid, 1, fam, variant))
                    ts += self._human_gap(r, 60)
                    out.append((ts, len(out), uid, "review", iid, c, None, dev, ip, cc, sid, 1, fam, variant))

    # ------------------------------------------------------------------ assembly
    def build(self, progress: bool = False) -> list:
        out: list = []
        users = range(self.n)
        if progress:
            from tqdm import tqdm
            users = tqdm(users, desc="users", unit="user", file=sys.stderr, mininterval=0.5)
        seed = self.rng_key
        for idx in users:
            if idx in self.owned:
                continue
            lockout = None
            if idx in self.ato:
                ra = random.Random(f"{seed}/ato/{idx}")
                r0 = random.Random(f"{seed}/u/{idx}")
                t0, changed = self._account_takeover(ra, self._profile(r0, idx), self.ato[idx], out)
                if changed:
                    lockout = t0 + int(HOUR_MS * (1 + 48 * ra.random()))
            u = self._normal_user(idx, out, lockout)
            if idx in self.card_hijack:
                rc = random.Random(f"{seed}/card/{idx}")
                W = self.end - self.start
                self._card_testing(rc, u.uid, self.card_hijack[idx], out, u.cc,
                                   self.start + int(W * (0.4 + 0.5 * rc.random())))
        for m, v, fresh in self.card_testers:
            if fresh:
                self._card_testing(random.Random(f"{seed}/card/{m}"), f"u{m:06d}", v, out)
        bots = []
        for k, (fam, v, members) in enumerate(self.groups):
            rg = random.Random(f"{seed}/{fam}/{k}")
            if fam == "bot_scraping":
                for m in members:
                    if self.cfg is None:
                        self._bot_scraping(rg, f"u{m:06d}", v, out)
                    else:
                        bots.append((rg, m))
            else:
                getattr(self, "_" + fam)(rg, members, v, out)
        for k, (v, victims) in enumerate(self.stuffing):
            self._credential_stuffing(random.Random(f"{seed}/stuffing/{k}"), victims, v, out)
        if bots:
            self._bot_fleet(bots, out)
        lo, hi = self.start, self.end
        out = [e for e in out if lo <= e[0] < hi]
        out.sort()
        return out


def generate(n_users: int, seed: int, start_ms: int = 1_767_225_600_000, days: int = 30,
             *, progress: bool = False, world: WorldConfig | None = None) -> tuple[list[dict], list[dict]]:
    """Return (events, labels). events: list of schema-v1 dicts, sorted by (ts, event_id); labels: one dict per event.

    Deterministic in (n_users, seed, start_ms, days, world). `progress` shows a tqdm bar over users.
    `world` (training/world_config.py) draws the generator's configuration; None is the fixed one.
    With a world, `days` is the caller's choice too (pass `world.days` for the world's own span).
    """
    if n_users < 0 or days < 1:
        raise ValueError("n_users must be >= 0 and days >= 1")
    w = _World(int(n_users), int(seed), int(start_ms), int(days), world)
    rows = w.build(progress)
    if world is not None:
        rows = _apply_world_surface(rows, world, w.rng_key, w.end)
    events, labels = [], []
    ev_app, lab_app = events.append, labels.append
    prefix = f"e{seed}-" if world is None else f"w{world.world}-{seed}-"
    for i, row in enumerate(rows):
        rows[i] = None   # free the tuple as soon as its dicts exist
        ts, _, uid, et, item, cat, amt, dev, ip, cc, sid, lab, fam, var = row
        eid = f"{prefix}{i:09d}"
        ev_app({"event_id": eid, "user_id": uid, "ts": ts, "event_type": et, "item_id": item,
                "category": cat, "amount": amt, "device_id": dev, "ip": ip, "country": cc,
                "session_id": sid})
        lab_app({"event_id": eid, "user_id": uid, "label": lab, "family": fam, "variant": var})
    return events, labels


_OPTIONAL_COLUMNS = {"item_id": 4, "category": 5, "amount": 6, "device_id": 7, "ip": 8, "country": 9,
                     "session_id": 10}


def _apply_world_surface(rows: list, world: WorldConfig, rkey: str, end_ms: int) -> list:
    """What a team's logging does to the same behaviour: extra event types following some events,
    team-specific names for ours, optional fields left empty. Labels ride along unchanged (an extra
    event copies the label of the event it follows: it is the same actor's activity)."""
    r = random.Random(f"{rkey}/surface")
    extra = sorted(world.extra_types.items())
    if extra:
        grown = []
        for row in rows:
            grown.append(row)
            for name, p in extra:
                if r.random() < p:
                    t = row[0] + 200 + int(r.random() * 20_000)
                    if t < end_ms:
                        grown.append((t, row[1], row[2], name, None, None, None) + row[7:])
        rows = sorted(grown, key=lambda x: (x[0], x[1]))
    rename = world.rename
    missing = [(_OPTIONAL_COLUMNS[f], p) for f, p in sorted(world.missing.items()) if p > 0]
    out = []
    for row in rows:
        if row[3] in rename or missing:
            row = list(row)
            row[3] = rename.get(row[3], row[3])
            for col, p in missing:
                if row[col] is not None and r.random() < p:
                    row[col] = None
            row = tuple(row)
        out.append(row)
    return out


# ---------------------------------------------------------------------------- writers

def _ensure_dir(path) -> None:
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)


def write_events(events, path) -> None:
    """Write events as .jsonl (default), .csv or .parquet, chosen by the file extension."""
    path = os.fspath(path)
    _ensure_dir(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        types = {"ts": pa.int64(), "amount": pa.float64()}
        cols = {k: pa.array([e[k] for e in events], type=types.get(k, pa.string())) for k in EVENT_FIELDS}
        pq.write_table(pa.table(cols), path)
    elif ext == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(EVENT_FIELDS)
            for e in events:
                w.writerow(["" if e[k] is None else e[k] for k in EVENT_FIELDS])
    else:
        _write_jsonl(events, path)


def write_labels(labels, path) -> None:
    """Write labels as JSON Lines (one {"event_id", "user_id", "label", "family", "variant"} per line)."""
    path = os.fspath(path)
    _ensure_dir(path)
    _write_jsonl(labels, path)


def _write_jsonl(rows, path) -> None:
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    with open(path, "w", encoding="utf-8") as f:
        buf = []
        for row in rows:
            buf.append(dumps(row))
            if len(buf) >= 10_000:
                f.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            f.write("\n".join(buf) + "\n")


def summarize(events, labels) -> str:
    """Short human summary: sizes, attack events per family/variant, hard-negative events."""
    users = len({e["user_id"] for e in events})
    att = Counter((l["family"], l["variant"]) for l in labels if l["label"] == 1)
    hn = Counter(l["family"] for l in labels if l["label"] == 0 and l["family"] != "normal")
    n_att = sum(att.values())
    lines = [f"events: {len(events)}  users: {users}  attack events: {n_att} "
             f"({100.0 * n_att / max(1, len(events)):.2f}%)"]
    for fam in ATTACK_FAMILIES:
        f, s = att.get((fam, "fast"), 0), att.get((fam, "slow"), 0)
        lines.append(f"  {fam:<22} {f + s:>8}  (fast {f}, slow {s})")
    lines.append("hard-negative events (label 0):")
    for kind in HARD_NEGATIVES + tuple(k for k in WORLD_HARD_NEGATIVES if k in hn):
        lines.append(f"  {kind:<22} {hn.get(kind, 0):>8}")
    return "\n".join(lines)


def world_config_path(events_path) -> str:
    """Where `--world` writes the drawn configuration: next to the events file."""
    stem, _ = os.path.splitext(os.fspath(events_path))
    return stem + ".world.json"


def main_generate(users: int, seed: int, out: str, labels: str | None, days: int | None = 30,
                  world: int | None = None) -> None:
    """CLI entry (`seqguard generate`): generate, write events (and labels), summarise on stderr.

    `world` K: draw the generator's configuration from world K (printed, and written as JSON next to
    `out`); `days` None then means the world's own log span."""
    cfg = None
    if world is not None:
        cfg = WorldConfig.draw(world)
        days = cfg.days if days is None else days
        print("\n".join(cfg.notes), file=sys.stderr)
    elif days is None:
        days = 30
    events, labs = generate(users, seed, days=days, progress=True, world=cfg)
    write_events(events, out)
    if cfg is not None:
        path = world_config_path(out)
        with open(path, "w", encoding="utf-8") as f:
            f.write(cfg.to_json() + "\n")
        print(f"world config: {path}", file=sys.stderr)
    if labels:
        write_labels(labs, labels)
    print(f"wrote {out}" + (f" and {labels}" if labels else ""), file=sys.stderr)
    print(summarize(events, labs), file=sys.stderr)
