"""The user record's codec (gateway/codec.py): exact round trip, the one migration (feature rows
written by a narrower featuriser read zero-padded), and refusal of any other format version."""
import numpy as np
import pytest

from seqguard.encoding import carried_state
from seqguard.featurizer import N_FEATURES, UserContext
from seqguard.gateway.codec import (USER_FORMAT, RingCipher, UserState, pack_features, pack_user, ring_entry,
                                    unpack_features, unpack_user)


def _user(rows, pending_rows, session=0.0) -> UserState:
    rng = np.random.default_rng(4)
    ring = [ring_entry(f"e{k}", "login", 1767225600000 + k, row) for k, row in enumerate(rows)]
    # a carried state, as every step leaves it (seqguard.encoding.carried_state)
    h, c = carried_state(rng.standard_normal(16)), carried_state(5 * rng.standard_normal(16))
    return UserState("sg:u:k", h, c,
                     UserContext(), ring, [(3, row, "ab" * 16) for row in pending_rows], "v-1", 7, 7, True, session)


def test_session_average_and_state_round_trip_exactly():
    st = _user([], [], session=4.123456789012345)
    back = unpack_user(st.key, pack_user(st, ring_size=8, rebuild_steps=3))
    assert back.session == st.session and (back.n, back.version, back.existed) == (7, 7, True)
    assert back.h.tobytes() == st.h.tobytes() and back.c.tobytes() == st.c.tobytes()
    assert back.h.dtype == np.float32


def test_the_carried_state_is_float16_and_its_record_half_the_float32_size():
    """Issue #22 part 6: h and c are the largest part of a user's record; carried as float16 they take
    2 bytes per unit. carried_state is what every stepping path applies, so the record holds it exactly."""
    x = np.array([0.1, -1 / 3, 70000.0, -1e9, 0.0], np.float32)
    kept = carried_state(x)
    assert kept.dtype == np.float32 and np.isfinite(kept).all()
    assert kept.tolist() == x.astype(np.float16).astype(np.float32).tolist()[:2] + [65504.0, -65504.0, 0.0]
    st = _user([], [])
    small = len(pack_user(st, ring_size=8, rebuild_steps=3))
    st.h, st.c = np.zeros(144, np.float32), np.zeros(144, np.float32)
    assert len(pack_user(st, ring_size=8, rebuild_steps=3)) - small == 2 * 2 * 128


def test_other_format_versions_are_refused():
    raw = pack_user(_user([], []), ring_size=8, rebuild_steps=3)
    assert raw[8] == USER_FORMAT
    for fmt in (USER_FORMAT - 1, USER_FORMAT + 1):
        with pytest.raises(ValueError, match="format"):
            unpack_user("sg:u:k", raw[:8] + bytes([fmt]) + raw[9:])


def test_rows_of_a_narrower_featuriser_are_zero_padded():
    """A featuriser that appends a signal reads what the previous one wrote: the ring's feature rows
    (which a model upgrade replays, engine._rebuild) and the deferred steps come back at the new width,
    the new columns 0 (no evidence); written back, they keep the new width."""
    old_width = N_FEATURES - 2
    rows = np.random.default_rng(5).standard_normal((2, old_width)).astype(np.float32)
    rows[:, ::4] = 1.0
    st = _user(rows, rows[1:])
    cipher = RingCipher(b"k" * 32)
    back = unpack_user(st.key, pack_user(st, ring_size=8, rebuild_steps=3, cipher=cipher), cipher)
    for e, row in zip(back.ring, rows):
        got = unpack_features(e.feat, N_FEATURES)
        assert got[:old_width].tobytes() == row.tobytes() and not got[old_width:].any()
    pend = back.pending[0][1]
    assert pend.shape == (N_FEATURES,) and pend[:old_width].tobytes() == rows[1].tobytes()
    assert back.pending[0][2] == "ab" * 16
    again = unpack_user(st.key, pack_user(back, ring_size=8, rebuild_steps=3))
    assert again.pending[0][1].tobytes() == pend.tobytes()


def test_a_wider_row_than_this_featuriser_is_refused():
    """Only a rollback writes rows wider than the running featuriser: refused, not silently cut."""
    with pytest.raises(ValueError, match="wider"):
        unpack_features(pack_features(np.ones(N_FEATURES + 1, np.float32)), N_FEATURES)
