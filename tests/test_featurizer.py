"""The shared featuriser: chunking- and serialisation-invariant, unknown types tolerated."""
import numpy as np
import pytest

from seqguard.featurizer import (FEATURE_INDEX, N_FEATURES, ContextStore, EntityContext, Featurizer, TokenHasher,
                                 UserContext, Vocabulary, featurize_log)
from seqguard.schema import events_from_dicts
from training.generate import generate


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
    for u in list(store.users.values())[:50]:
        b = u.to_bytes()
        assert UserContext.from_bytes(b).to_bytes() == b
        assert len(b) < 400
    for e in list(store.devices.values())[:50]:
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
