"""The compiled featuriser kernel gives the rows and context bytes of the per-event Python
featuriser it replaced (tests/reference_featurizer.py, the oracle), bit for bit."""
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

import reference_featurizer as ref
from seqguard.featurizer import (ACCOUNT_CHANGES, ContextStore, EntityContext, Featurizer, TokenHasher, UserContext, Vocabulary,
                                 featurize_log)
from seqguard.schema import events_from_dicts
from seqguard.training.generate import generate


@pytest.fixture(scope="module")
def log():
    events, _ = generate(150, seed=11, days=6)
    return events_from_dicts(events)


def _featurizers(log):
    vocab = Vocabulary.learn((e.event_type for e in log), min_count=5)
    return Featurizer(vocab, TokenHasher()), ref.Featurizer(vocab, TokenHasher())


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_log_has_what_the_parity_needs(log):
    """A few thousand events with devices and IPs shared across users, failed logins and payments."""
    users_per = defaultdict(set)
    for e in log:
        if e.device_id:
            users_per[e.device_id].add(e.user_id)
    assert len(log) > 3000
    assert sum(len(u) > 1 for u in users_per.values()) >= 5 and max(map(len, users_per.values())) >= 5
    types = {e.event_type for e in log}
    assert {"login_failed", "payment_failed", "payment", "checkout", "review", "redeem_coupon"} <= types
    assert types & ACCOUNT_CHANGES


@pytest.mark.parametrize("shuffled", [False, True], ids=["time-order", "arrival-order"])
def test_rows_and_contexts_bit_identical_to_the_python_reference(log, shuffled):
    """Global time order (training, score-file) and an arbitrary arrival order (the gateway applies
    events as they come: timestamps go backwards, gaps clamp at 0) give the same bits either way."""
    fz, old = _featurizers(log)
    order = np.random.default_rng(3).permutation(len(log)) if shuffled else None
    old_store, store = ref.ContextStore(), ContextStore()
    o_ref, t_ref, f_ref = ref.featurize_log(old, log, old_store, order=order)
    o, t, f = featurize_log(fz, log, store, order=order)
    assert np.array_equal(o, o_ref) and np.array_equal(t, t_ref)
    assert f.dtype == np.float32 and np.array_equal(_bits(f), _bits(f_ref))
    assert np.count_nonzero(f[:, 32]) > len(log) // 2                      # device accounts really counted
    # every context ends in the same state, as its Redis bytes show
    assert set(store.user_rows) == set(old_store.users)
    for h, u in old_store.users.items():
        assert store.user(h).to_bytes() == u.to_bytes()
    for kind, table in enumerate((old_store.devices, old_store.ips, old_store.prefixes)):
        rows = store.entity_rows[kind]
        assert set(rows) == set(table)
        for h, e in table.items():
            assert EntityContext(store.EI[rows[h]], store.EF[rows[h]]).to_bytes() == e.to_bytes()


def test_batch_api_on_redis_bytes_equals_the_log_replay(log):
    """The gateway's path: contexts read from bytes, a batch featurised in one call, written back as
    bytes, at random batch boundaries; the rows equal the offline replay's."""
    fz, _ = _featurizers(log)
    order, types_ref, feats_ref = featurize_log(fz, log)
    replay = [log[i] for i in order]
    users, ents = {}, {}
    got_types, got = [], []
    cuts = sorted(set(np.random.default_rng(1).integers(1, len(replay), 60).tolist())) + [len(replay)]
    a = 0
    for b in cuts:
        batch = replay[a:b]
        live_users = {}
        live_ents = {}
        for ev in batch:
            if ev.user_id not in live_users:
                raw = users.get(ev.user_id)
                live_users[ev.user_id] = UserContext.from_bytes(raw) if raw else UserContext()
            for k in (("d", ev.device_id), ("i", ev.ip), ("p", ev.ip and ev.ip.rsplit(".", 1)[0])):
                if k[1] and k not in live_ents:
                    live_ents[k] = EntityContext.from_bytes(ents[k]) if k in ents else EntityContext()
        types, feats = fz.featurize_batch(
            batch, [live_users[ev.user_id] for ev in batch],
            [tuple(live_ents[k] if k[1] else None for k in (("d", ev.device_id), ("i", ev.ip),
                                                              ("p", ev.ip and ev.ip.rsplit(".", 1)[0])))
             for ev in batch])
        got_types.append(types)
        got.append(feats)
        users.update({k: v.to_bytes() for k, v in live_users.items()})
        ents.update({k: v.to_bytes() for k, v in live_ents.items()})
        a = b
    assert all(e.ip is None or ":" not in e.ip for e in log)     # (the IPv4 prefix shortcut above)
    assert np.array_equal(np.concatenate(got_types), types_ref)
    assert np.array_equal(_bits(np.concatenate(got)), _bits(feats_ref))


def test_single_event_featurize_equals_reference_float64(log):
    """`Featurizer.featurize` (one event, float64 row, the gateway's old per-event call) keeps the
    un-rounded values of the Python featuriser."""
    fz, old = _featurizers(log)
    old_store = ref.ContextStore()
    objs: dict = {}
    for ev in sorted(log[:800], key=lambda e: e.ts):
        t = fz.tokens(ev)
        u_old, *e_old = old_store.contexts_for(t)
        u = objs.setdefault(("u", t.user), UserContext())
        ents = [None if not key else objs.setdefault((kind, key), EntityContext())
                for kind, key in (("d", t.device), ("i", t.ip), ("p", t.prefix))]
        row = fz.featurize(t, u, *ents)
        assert row.dtype == np.float64 and row.tolist() == old.featurize(t, u_old, *e_old)


@pytest.mark.slow
def test_compiled_cache_works_from_a_read_only_install():
    """Installed read-only (no __pycache__ can be written next to the module), the kernel caches under
    the user's cache directory instead, and a second process loads it instead of compiling. Run as
    an unprivileged user when the tests run as root (root may write anywhere)."""
    import shutil
    import tempfile
    import seqguard.featurize_kernel as fk
    as_user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a read-only install")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    root = tempfile.mkdtemp(prefix="seqguard-ro-")
    try:
        os.chmod(root, 0o755)
        pkg = os.path.join(root, "seqguard")
        os.mkdir(pkg)
        shutil.copy(fk.__file__, os.path.join(pkg, "featurize_kernel.py"))
        open(os.path.join(pkg, "__init__.py"), "w").close()
        home = os.path.join(root, "home")
        os.mkdir(home)
        if as_user:
            os.chown(home, 65534, 65534)
        for p in (os.path.join(pkg, "featurize_kernel.py"), os.path.join(pkg, "__init__.py")):
            os.chmod(p, 0o444)
        os.chmod(pkg, 0o555)
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
        env.update(HOME=home, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
        code = ("import time, numpy as np; t = time.perf_counter(); from seqguard import featurize_kernel as k; "
                "ui, uf = k.new_user_rows(1); ei, ef = k.new_entity_rows(1); z = np.zeros(1, np.int64); "
                "k.featurize_events(z + 1767225600000, z, z, np.full(1, np.nan), z + 7, z + 3, z, z, z, z, z, "
                "z - 1, z - 1, ui, uf, ei, ef, np.empty((1, k.N_FEATURES), np.float32)); print(time.perf_counter() - t)")
        run = lambda: float(subprocess.run(as_user + [sys.executable, "-c", code], env=env, check=True,  # noqa: E731
                                           capture_output=True, text=True, timeout=300, cwd=root).stdout)
        first, second = run(), run()
        cached = [f for _, _, fs in os.walk(os.path.join(home, ".cache", "seqguard-numba")) for f in fs
                  if f.endswith(".nbi")]
        assert cached and not os.path.exists(os.path.join(pkg, "__pycache__"))
        assert second < first / 2, (first, second)
    finally:
        os.chmod(os.path.join(root, "seqguard"), 0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_corrupt_context_bytes_are_refused_not_read_past_their_end(log):
    """The bulk decoder checks version, list lengths and size before reading a blob (no bounds checks
    in compiled code): a truncated or garbled context from Redis is a ValueError naming it."""
    fz, _ = _featurizers(log)
    store = ContextStore()
    featurize_log(fz, log, store)
    u = store.user(next(iter(store.user_rows))).to_bytes()
    ring = max(store.entities(0), key=lambda e: len(e.users)).to_bytes()
    for blob, cls in ((u, UserContext), (ring, EntityContext)):
        assert cls.from_bytes(blob).to_bytes() == blob
        for bad in (blob[:-1], blob[:40], blob[:1] + bytes([255]) * (len(blob) - 1)):
            with pytest.raises(ValueError, match="corrupt|version"):
                _ = cls.from_bytes(bad).ints
    with pytest.raises(ValueError, match="version"):
        UserContext.from_bytes(bytes([9]) + u[1:])
    ev = log[0]                                          # in a batch (one compiled call): refused, nothing kept
    good, broken = UserContext.from_bytes(u), EntityContext.from_bytes(ring[:-1])
    with pytest.raises(ValueError, match="corrupt"):
        fz.featurize_batch([ev], [good], [(broken, None, None)])
    assert good.to_bytes() == u


def test_one_event_from_the_future_does_not_freeze_a_shared_ip():
    """Issue #18 part 5: an event stamped 20 h ahead (inside the gateway's 1-day skew bound) used to pin
    the IP's clock, so its decaying counters stopped decaying for every user behind it (measured before
    the fix: log_ip_events_1h 3.71 on the 40th event, i.e. all 41 events counted, vs 1.89 without the
    outlier). Now the next ordinary event resets the clock and the counters decay as before."""
    from seqguard.featurizer import FEATURE_INDEX, EntityContext, Featurizer, TokenHasher, UserContext, Vocabulary
    from seqguard.schema import Event
    fz = Featurizer(Vocabulary.learn(["view_item"], 1), TokenHasher(b"k" * 16))
    t0 = 1_767_225_600_000

    def last_ip_events(with_outlier: bool) -> float:
        ip = EntityContext()
        evs = ([Event("x", "outlier-user", t0 + 20 * 3_600_000, "view_item", ip="10.0.0.1")] if with_outlier else [])
        evs += [Event(f"e{k}", f"user{k}", t0 + 600_000 * k, "view_item", ip="10.0.0.1") for k in range(40)]
        users = {e.user_id: UserContext() for e in evs}
        _, feats = fz.featurize_batch(evs, [users[e.user_id] for e in evs], [(None, ip, EntityContext()) for e in evs])
        return float(feats[-1, FEATURE_INDEX["log_ip_events_1h"]])

    clean, outlier = last_ip_events(False), last_ip_events(True)
    assert clean < 2.5
    assert abs(outlier - clean) < 0.05, (outlier, clean)


def test_an_entity_idle_past_its_windows_starts_again_from_empty():
    """Issue #22 part 6: an entity context untouched for 8 days (its longest window, 7 days, plus one)
    is reset before its next event, offline and online alike, so the gateway may let Redis expire the
    key after that long. Its next event then sees exactly what a never-seen device would: before the
    rule a decayed remnant of the old day's new-account counter was still added."""
    from seqguard.featurizer import FEATURE_INDEX, EntityContext, Featurizer, TokenHasher, UserContext, Vocabulary
    from seqguard.featurize_kernel import ENTITY_IDLE_RESET_MS
    from seqguard.schema import Event
    fz = Featurizer(Vocabulary.learn(["login"], 1), TokenHasher(b"k" * 16))
    t0 = 1_767_225_600_000
    column = FEATURE_INDEX["log_device_new_accounts_24h"]

    def late_event_on(device: EntityContext) -> np.ndarray:
        ev = Event("late", "late-user", t0 + ENTITY_IDLE_RESET_MS + 60_000, "login", device_id="d1")
        _, feats = fz.featurize_batch([ev], [UserContext()], [(device, None, None)])
        return feats[0]

    device = EntityContext()
    early = [Event(f"e{k}", f"user{k}", t0 + k * 1000, "login", device_id="d1") for k in range(20)]
    fz.featurize_batch(early, [UserContext() for _ in early], [(device, None, None) for _ in early])
    assert device.users and device.new_accounts_24h > 10
    idle, fresh = late_event_on(device), late_event_on(EntityContext())
    assert idle[column] == fresh[column] and _bits(idle).tolist() == _bits(fresh).tolist()
    assert len(device.users) == 1 and device.first_ts == t0 + ENTITY_IDLE_RESET_MS + 60_000

    near = EntityContext()                                # inside the windows nothing is reset
    fz.featurize_batch(early, [UserContext() for _ in early], [(near, None, None) for _ in early])
    ev = Event("soon", "late-user", t0 + 6 * 86_400_000, "login", device_id="d1")
    fz.featurize_batch([ev], [UserContext()], [(near, None, None)])
    assert near.first_ts == t0
