"""The shared featuriser: chunking- and serialisation-invariant, unknown types tolerated."""
import numpy as np
import pytest

from seqguard.featurizer import (FEATURE_INDEX, N_FEATURES, ContextStore, EntityContext, Featurizer, TokenHasher,
                                 UserContext, Vocabulary, decode_entity_contexts, decode_user_contexts,
                                 featurize_log)
from seqguard.schema import events_from_dicts
from seqguard.training.generate import generate


@pytest.fixture(scope="module")
def log():
    events, _ = generate(120, seed=5, days=5)
    return events_from_dicts(events)


def test_identical_however_the_stream_is_chunked(log):
    fz = Featurizer(Vocabulary.learn(e.event_type for e in log), TokenHasher())
    order, types_ref, feats_ref = featurize_log(fz, log)
    replay = [log[i] for i in order]
    rng = np.random.default_rng(0)
    # online-style: contexts serialised to bytes (as in Redis) between random chunk boundaries
    users, ents = {}, {}
    rows = []
    cuts = sorted(set(rng.integers(0, len(replay), 40).tolist())) + [len(replay)]
    a = 0
    for b in cuts:
        live_users, live_ents = {}, {}
        for ev in replay[a:b]:
            t = fz.tokens(ev)
            if t.user not in live_users:
                live_users[t.user] = UserContext.from_bytes(users[t.user]) if t.user in users else UserContext()
            ctxs = []
            for kind, key in (("d", t.device), ("i", t.ip), ("p", t.prefix)):
                if not key:
                    ctxs.append(None)
                    continue
                k = (kind, key)
                if k not in live_ents:
                    live_ents[k] = EntityContext.from_bytes(ents[k]) if k in ents else EntityContext()
                ctxs.append(live_ents[k])
            rows.append(fz.featurize(t, live_users[t.user], *ctxs))
        users.update({k: v.to_bytes() for k, v in live_users.items()})
        ents.update({k: v.to_bytes() for k, v in live_ents.items()})
        a = b
    assert np.array_equal(np.asarray(rows, np.float32), feats_ref)


def test_context_bytes_round_trip_and_size(log):
    fz = Featurizer(Vocabulary.learn(e.event_type for e in log), TokenHasher())
    store = ContextStore()
    featurize_log(fz, log, store)
    for h in list(store.user_rows)[:50]:
        b = store.user(h).to_bytes()
        assert UserContext.from_bytes(b).to_bytes() == b
        assert len(b) < 400
    devices = store.entities(0)
    assert any(len(e.users) > 1 for e in devices)
    for e in devices[:50]:
        b = e.to_bytes()
        assert EntityContext.from_bytes(b).to_bytes() == b


def test_unknown_and_custom_types():
    vocab = Vocabulary.learn(["login"] * 3 + ["team_type"] * 5 + ["rare_type"] * 2, min_count=5)
    assert vocab.id("team_type") > 0            # seen >= 5 times: own token
    assert vocab.id("rare_type") == 0           # rare: shares "unknown"
    assert vocab.id("never_seen") == 0          # unseen at scoring time: unknown, not an error
    assert vocab.id("payment") > 0              # common types always have tokens


def test_signals_mean_what_they_say():
    fz = Featurizer(Vocabulary.learn([]), TokenHasher())
    base = dict(user_id="u", item_id=None, category=None, amount=None, session_id=None)
    evs = events_from_dicts([
        dict(base, event_id="1", ts=1767225600000, event_type="login", device_id="d1", ip="1.2.3.4", country="DE"),
        dict(base, event_id="2", ts=1767225660000, event_type="login_failed", device_id="d1", ip="1.2.3.4", country="DE"),
        dict(base, event_id="3", ts=1767225720000, event_type="login", device_id="d9", ip="9.9.9.9", country="BR"),
    ])
    _, _, f = featurize_log(fz, evs)
    assert f.shape == (3, N_FEATURES)
    assert f[2, FEATURE_INDEX["new_device"]] == 1 and f[2, FEATURE_INDEX["new_country"]] == 1
    assert f[1, FEATURE_INDEX["new_device"]] == 0 and f[0, FEATURE_INDEX["new_device"]] == 0
    assert f[1, FEATURE_INDEX["log_login_failed_1h"]] > 0.5


def test_sparse_events_only_required_fields():
    fz = Featurizer(Vocabulary.learn([]), TokenHasher())
    evs = events_from_dicts([dict(event_id=str(i), user_id=f"u{i % 3}", ts=1767225600000 + i * 1000,
                                  event_type=["x_custom", "login", "y_custom"][i % 3]) for i in range(30)])
    _, types, f = featurize_log(fz, evs)
    assert np.isfinite(f).all() and f[:, FEATURE_INDEX["has_device"]].sum() == 0


def _login_failed(eid, user, ts, device="shared-dev", ip=None):
    return dict(event_id=eid, user_id=user, ts=ts, event_type="login_failed", device_id=device,
                ip=ip or f"10.0.{eid}.1", country="DE", item_id=None, category=None, amount=None, session_id=None)


def test_failed_accounts_per_device_counts_other_accounts_for_seven_days():
    """The slow-stuffing ring counter: other accounts with a failed login on this device in the last
    7 days. A user's own failures never count against them, and a failure 8 days old has left."""
    fz = Featurizer(Vocabulary.learn([]), TokenHasher())
    day, t0 = 86_400_000, 1767225600000
    evs = events_from_dicts([
        _login_failed("1", "a", t0),
        _login_failed("2", "a", t0 + 1000),                 # own account again: still 0 others
        _login_failed("3", "b", t0 + 2 * day),              # a day later, a second account: 1 other (a)
        _login_failed("4", "c", t0 + 3 * day),              # 2 others (a, b), outside every 1 h / 24 h window
        dict(_login_failed("5", "d", t0 + 3 * day + 5), event_type="login"),   # any event on the device sees them
        _login_failed("6", "e", t0 + 3 * day + 10, device="other-dev"),        # another device: 0
        _login_failed("7", "f", t0 + 9 * day + 1000),       # a, b left the 7-day window; c is 6 days old
    ])
    _, _, f = featurize_log(fz, evs)
    got = np.rint(np.expm1(f[:, FEATURE_INDEX["log_device_failed_accounts_7d"]])).astype(int).tolist()
    assert got == [0, 0, 1, 2, 3, 0, 1]
    # the 1-hour failure counter never saw the ring: at most one failure per hour on the device
    assert np.expm1(f[3, FEATURE_INDEX["log_device_failed_1h"]]) < 1.01


def test_failed_accounts_list_round_trips_and_other_versions_are_refused():
    """An entity context round-trips with its failed-accounts list; a context of another featuriser
    version is refused (never misread), by the single reader and by the bulk codec."""
    e = EntityContext()
    e.first_ts, e.last_ts, e.events_1h, e.failed_1h = 5, 9, 2.5, 1.25
    e.users = [[11, 9], [12, 7]]
    e.failed_users = [[12, 7], [13, 3]]
    b = e.to_bytes()
    back = EntityContext.from_bytes(b)
    assert back.failed_users == e.failed_users and back.users == e.users and back.to_bytes() == b
    for version in (1, 7):
        with pytest.raises(ValueError, match="version"):
            EntityContext.from_bytes(bytes([version]) + b[1:])
        with pytest.raises(ValueError, match="corrupt"):
            decode_entity_contexts([b, bytes([version]) + b[1:]])
    user = UserContext().to_bytes()
    with pytest.raises(ValueError, match="corrupt"):
        decode_user_contexts([user, bytes([1]) + user[1:]])


def test_gap_jitter_sees_a_machine_cadence_within_a_dozen_events():
    """gap_jitter (EWMA of |log gap - previous log gap|) falls under 0.15 within ~12 events of a script
    with 2% jitter, while gap_std (the slow, encoder-side regularity) is still far from its bot range;
    a person's irregular gaps keep it near 1."""
    fz = Featurizer(Vocabulary.learn([]), TokenHasher())
    rng = np.random.default_rng(3)
    t0 = 1767225600000

    def views(user, gaps_ms):
        ts = t0 + np.concatenate([[0], np.cumsum(gaps_ms)]).astype(np.int64)
        return [dict(event_id=f"{user}{k}", user_id=user, ts=int(t), event_type="view_item", item_id=f"i{k}",
                     device_id=f"{user}-dev", ip="1.2.3.4", country="DE", category=None, amount=None, session_id=None)
                for k, t in enumerate(ts)]
    bot = views("bot", 2000 * (1 + 0.02 * rng.standard_normal(39)))
    human = views("hum", rng.lognormal(np.log(30_000), 1.0, 39))
    order, _, f = featurize_log(fz, events_from_dicts(bot + human))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    fb, fh = f[inv[:40]], f[inv[40:]]
    j, s = FEATURE_INDEX["gap_jitter"], FEATURE_INDEX["gap_std"]
    assert fb[0, j] == 2.0 and fb[12, j] < 0.15 and fb[12, s] > 0.4
    assert fh[5:, j].min() > 0.4
