"""Randomised worlds for `seqguard generate --world K` (domain randomisation).

Why: every design choice so far was tuned on seeds of ONE generator configuration, and did not
hold on independent data (issue #20). A world K draws, from an RNG seeded by K alone, a whole
configuration of the generator from a WIDE distribution: persona mix and intensity, look-alike
populations (digital-goods buyers, prolific reviewers, travellers, shared and public devices,
carrier NAT, decline storms), attack prevalence per family (crawler fleets from 0.5% to 20% of
ALL events), attacker cadence from machine-regular to human-jittered, ring sizes and their
spread in time (minutes to weeks), team-specific event-type names and extra types, missing
optional fields and the log span. A design judged on several worlds, and reported on worlds
drawn after the design was fixed, is judged on structure, not on one configuration's constants.

`WorldConfig.draw(K)` is a pure function of K; `--seed` then draws the users and attacks of
that world, so a train log and a test log of the same world differ in people, not in rules.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

ATTACK_FAMILIES = ("account_takeover", "card_testing", "credential_stuffing", "bot_scraping",
                   "brushing", "promo_abuse", "fake_reviews")
PERSONAS = ("browser", "regular", "bargain", "heavy", "occasional")
OPTIONAL_FIELDS = ("item_id", "category", "amount", "device_id", "ip", "country", "session_id")

# Team-specific names a real shop might log instead of ours (each world renames a random subset,
# consistently: every occurrence of a type gets the same new name; labels are untouched).
RENAME_CHOICES = {
    "login": ("sign_in", "auth_success", "session_start"),
    "login_failed": ("sign_in_failed", "auth_failure", "bad_password"),
    "logout": ("sign_out", "session_end"),
    "search": ("search_query", "product_search", "query"),
    "view_item": ("product_view", "pdp_view", "item_viewed"),
    "add_to_cart": ("cart_add", "basket_add"),
    "remove_from_cart": ("cart_remove", "basket_remove"),
    "checkout": ("checkout_start", "begin_checkout"),
    "payment": ("purchase", "order_paid", "payment_success"),
    "payment_failed": ("payment_declined", "order_payment_error"),
    "review": ("review_submitted", "product_rating"),
    "change_password": ("password_reset", "password_update"),
    "change_email": ("email_update",),
    "change_address": ("address_update", "shipping_address_change"),
    "add_payment_method": ("card_added", "wallet_add"),
    "redeem_coupon": ("voucher_applied", "promo_code_used"),
}
# Extra event types our featuriser has never seen (some teams log far more than we do).
EXTRA_TYPE_CHOICES = ("page_scroll", "app_open", "notification_open", "filter_apply", "compare_items",
                      "newsletter_click", "size_guide_view", "chat_open", "recommendation_click")

# Defaults equal to the fixed generator's constants, so world mode with these values is the same
# world as `--world` absent, up to the RNG streams.
DEFAULT_PERSONA_SHARE = {"browser": 0.25, "regular": 0.30, "bargain": 0.15, "heavy": 0.08, "occasional": 0.22}


def _log_uniform(r: random.Random, lo: float, hi: float) -> float:
    return math.exp(r.uniform(math.log(lo), math.log(hi)))


@dataclass(frozen=True)
class WorldConfig:
    world: int
    days: int                                   # log span
    persona_share: dict                         # persona -> weight among ordinary users
    rate_scale: float                           # all personas' sessions/day multiplied by this
    lookalike_frac: dict                        # hard-negative kind -> fraction of users
    digital_rate: float                         # sessions/day median of digital-goods buyers (0.45 fixed)
    digital_multi_buy: float                    # p(another top-up in the same session)
    reviewer_rate: float                        # sessions/day median of prolific reviewers
    decline_storms: tuple                       # ((start as fraction of span, hours, p(payment fails)), ...)
    attack_scale: dict                          # family -> multiplier on the fixed generator's count
    bot_event_share: float                      # crawler fleet's share of ALL events (0.005-0.20)
    bot_fast_frac: float                        # share of crawler accounts that are fast
    attacker_jitter: float                      # cadence: 0.005 machine-regular ... 0.8 human-like
    ring_size: tuple                            # (lo, hi) accounts per brushing/promo/review ring
    ring_span_hours: tuple                      # (lo, hi) of a slow ring's spread in time
    rename: dict                                # event type -> team-specific name
    extra_types: dict                           # extra type -> probability per event of one following it
    missing: dict                               # optional field -> fraction of events without it
    notes: list = field(default_factory=list)   # plain-word summary of the draw

    @classmethod
    def draw(cls, world: int) -> "WorldConfig":
        r = random.Random(f"seqguard/worldcfg/{int(world)}")
        share = {p: DEFAULT_PERSONA_SHARE[p] * _log_uniform(r, 0.3, 3.0) for p in PERSONAS}
        tot = sum(share.values())
        share = {p: round(v / tot, 4) for p, v in share.items()}
        look = {
            "digital_goods": r.uniform(0.005, 0.10),
            "prolific_reviewer": r.uniform(0.0, 0.06),
            "traveller": r.uniform(0.005, 0.08),
            "shared_household": r.uniform(0.0, 0.10),
            "public_device": r.uniform(0.0, 0.06),
            "carrier_nat": r.uniform(0.0, 0.35),
            "big_purchase": r.uniform(0.005, 0.05),
            "decline_then_success": r.uniform(0.005, 0.06),
            "legit_account_change": r.uniform(0.005, 0.05),
        }
        look = {k: round(v, 4) for k, v in look.items()}
        storms = tuple((round(r.uniform(0.05, 0.9), 4), round(_log_uniform(r, 0.5, 12.0), 3),
                        round(r.uniform(0.3, 0.9), 3)) for _ in range(r.choice((0, 0, 1, 2, 3))))
        attack = {f: round(_log_uniform(r, 0.25, 4.0), 3) for f in ATTACK_FAMILIES}
        lo = r.randint(2, 6)
        hi = lo + r.randint(2, 30)
        span_lo = _log_uniform(r, 0.1, 24.0)               # 6 minutes .. a day
        span_hi = span_lo * _log_uniform(r, 2.0, 300.0)   # .. up to weeks
        rename_p = r.choice((0.0, 0.15, 0.3, 0.6))
        rename = {t: r.choice(names) for t, names in RENAME_CHOICES.items() if r.random() < rename_p}
        extra = {t: round(_log_uniform(r, 0.002, 0.08), 4)
                 for t in r.sample(EXTRA_TYPE_CHOICES, r.randint(0, 4))}
        miss_level = r.uniform(0.0, 0.30)
        missing = {f: round(miss_level * r.uniform(0.0, 1.0), 4) for f in OPTIONAL_FIELDS}
        cfg = cls(world=int(world), days=r.randint(14, 45), persona_share=share,
                  rate_scale=round(_log_uniform(r, 0.5, 2.0), 3), lookalike_frac=look,
                  digital_rate=round(_log_uniform(r, 0.3, 3.0), 3), digital_multi_buy=round(r.uniform(0.3, 0.8), 3),
                  reviewer_rate=round(_log_uniform(r, 0.2, 1.5), 3), decline_storms=storms,
                  attack_scale=attack, bot_event_share=round(_log_uniform(r, 0.005, 0.20), 4),
                  bot_fast_frac=round(r.uniform(0.0, 1.0), 3),
                  attacker_jitter=round(_log_uniform(r, 0.005, 0.8), 4), ring_size=(lo, hi),
                  ring_span_hours=(round(span_lo, 3), round(min(span_hi, 24 * 28.0), 3)),
                  rename=rename, extra_types=extra, missing=missing)
        return cls(**{**asdict(cfg), "notes": cfg.describe()})

    def describe(self) -> list:
        return [f"world {self.world}: {self.days} days, activity x{self.rate_scale}",
                f"crawler fleet {100 * self.bot_event_share:.1f}% of all events, attacker jitter {self.attacker_jitter}",
                f"rings {self.ring_size[0]}-{self.ring_size[1]} accounts over {self.ring_span_hours[0]:.2g}-"
                f"{self.ring_span_hours[1]:.3g} h; {len(self.decline_storms)} decline storm(s)",
                f"{len(self.rename)} event types renamed, {len(self.extra_types)} extra types, "
                f"missing optional fields up to {100 * max(self.missing.values(), default=0):.0f}%"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorldConfig":
        d = json.loads(text)
        for k in ("decline_storms",):
            d[k] = tuple(tuple(x) for x in d[k])
        for k in ("ring_size", "ring_span_hours"):
            d[k] = tuple(d[k])
        return cls(**d)

    def original_type(self, name: str) -> str:
        """The generator's own name of a (possibly renamed) event type; extra types map to themselves."""
        inverse = {v: k for k, v in self.rename.items()}
        return inverse.get(name, name)
