"""Gateway settings: the ring-size knobs come from the environment, are validated, and reach the store."""
import pytest

from seqguard.gateway.settings import Settings
from seqguard.gateway.state import RedisStateStore


def test_ring_knobs_from_environment_reach_the_store(monkeypatch):
    monkeypatch.setenv("SEQGUARD_RECENT_EVENTS", "12")
    monkeypatch.setenv("SEQGUARD_REBUILD_STEPS", "5")
    s = Settings.load(pseudonym_key="k" * 32)
    assert (s.recent_events, s.rebuild_steps) == (12, 5)
    store = RedisStateStore.from_settings(s, hidden=8)       # builds a client; connects lazily
    assert (store.ring_size, store.rebuild_steps) == (12, 5)
    assert Settings().rebuild_steps == 3 and Settings().recent_events == 8


@pytest.mark.parametrize("over, msg", [
    ({"recent_events": 0}, "recent_events"), ({"recent_events": 256}, "recent_events"),
    ({"rebuild_steps": -1}, "rebuild_steps"), ({"recent_events": 4, "rebuild_steps": 5}, "rebuild_steps"),
    ({"rebuild_steps": "three"}, "rebuild_steps"),
])
def test_ring_knobs_are_validated(over, msg):
    with pytest.raises(ValueError, match=msg):
        Settings.load(**over)


def test_rebuild_steps_zero_is_allowed():
    assert Settings.load(rebuild_steps=0, pseudonym_key="k" * 32).rebuild_steps == 0
