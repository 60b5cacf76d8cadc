"""Rules in the gateway (real Redis + real Triton): online == offline rule hits and actions on a
generated log; hot reload of the rules file, a bad file rejected while the running rules stay."""
import logging
import time

import grpc
import numpy as np
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events_with_rules
from seqguard.detector import ACTIONS
from seqguard.rules import DEFAULT_RULES_PATH, load_rules
from seqguard.schema import read_events

pytestmark = pytest.mark.slow

# the shipped pack plus rules that read the model (risk, a model-only reason, the session stage)
MODEL_RULES = """
[[rule]]
name = "very_risky"
description = "risk in the top 1 per mille of training events"
when = ["risk >= 0.999"]
action = "BLOCK"

[[rule]]
name = "odd_sequence"
description = "an unusual sequence"
when = ["reasons contains UNUSUAL_SEQUENCE"]
score = 1.0

[[rule]]
name = "risky_session_payment"
description = "a payment attempt in a risky session"
when = ["reasons contains RISKY_SESSION", "event_type in [payment, checkout, payment_failed]"]
action = "CHALLENGE"
"""


def _to_proto(ev) -> risk_pb2.Event:
    return risk_pb2.Event(**{k: v for k, v in ev._asdict().items() if v is not None})


def test_rules_online_equal_offline(small_model, small_log, redis_server, triton, gateway_factory, tmp_path):
    pack = tmp_path / "rules.toml"
    pack.write_text(DEFAULT_RULES_PATH.read_text() + MODEL_RULES)
    rules = load_rules(pack)
    redis_server.client().flushall()
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                         deadline_ms=3000, triton_timeout_ms=3000, rules_path=str(pack))
    events = list(read_events(str(small_log[0])))
    _, _, want = score_events_with_rules(ModelArtifact.load(small_model), events, rules)
    order = sorted(range(len(events)), key=lambda i: (events[i].ts, i))
    online_rules: list = [None] * len(events)
    online_action = np.full(len(events), -1)
    with grpc.insecure_channel(gw.address) as ch:
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        head, tail = order[:-200], order[-200:]       # batches of varying size, then one Score call at a time
        for a, size in zip(range(0, len(head), 173), [173] * len(head)):
            idx = head[a:a + size]
            rep = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[_to_proto(events[i]) for i in idx]), timeout=30)
            for i, r in zip(idx, rep.results):
                assert r.status == risk_pb2.OK, r.status_detail
                online_rules[i], online_action[i] = list(r.rules), ACTIONS.index(risk_pb2.Action.Name(r.action))
        for i in tail:
            r = stub.Score(risk_pb2.ScoreRequest(event=_to_proto(events[i])), timeout=10)
            assert r.status == risk_pb2.OK, r.status_detail
            online_rules[i], online_action[i] = list(r.rules), ACTIONS.index(risk_pb2.Action.Name(r.action))
    offline_rules = want.fired_lists()
    mismatches = [i for i in range(len(events)) if online_rules[i] != offline_rules[i]]
    assert not mismatches, [(events[i].event_id, online_rules[i], offline_rules[i]) for i in mismatches[:5]]
    assert np.array_equal(online_action, want.action)
    fired = {n for f in offline_rules for n in f}
    assert {"very_risky", "risky_session_payment", "high_velocity_1m", "shared_device"} <= fired, fired
    assert len(events) > 5000 and sum(map(bool, offline_rules)) > 500


def test_rules_hot_reload_rejects_a_bad_file(small_model, redis_server, triton, gateway_factory, tmp_path, caplog):
    pack = tmp_path / "rules.toml"
    pack.write_text('version = 1\nname = "one"\n[[rule]]\nname = "every_login"\ndescription = "all logins"\n'
                    'when = ["event_type == login"]\naction = "REVIEW"\n')
    redis_server.client().flushall()
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                         deadline_ms=3000, triton_timeout_ms=3000, rules_path=str(pack), rules_poll_s=0.05)
    reloader = gw.gateway.rules_reloader
    t0 = 1_767_225_600_000

    def score(k, event_type="login"):
        with grpc.insecure_channel(gw.address) as ch:
            return risk_pb2_grpc.RiskScoringStub(ch).Score(risk_pb2.ScoreRequest(event=risk_pb2.Event(
                event_id=f"hr{k}", user_id=f"hr-user{k}", ts=t0 + k, event_type=event_type)), timeout=10)

    def wait_for(cond):
        end = time.time() + 10
        while not cond():
            assert time.time() < end, "reloader did not pick the file up"
            time.sleep(0.05)

    r = score(0)
    assert list(r.rules) == ["every_login"] and r.action >= risk_pb2.REVIEW
    # a bad edit: rejected, logged with rule and field, the running rules stay
    with caplog.at_level(logging.ERROR, logger="seqguard.gateway"):
        pack.write_text('version = 1\nname = "two"\n[[rule]]\nname = "every_login"\ndescription = "all logins"\n'
                        'when = ["event_kind == login"]\naction = "BLOCK"\n')
        wait_for(lambda: reloader.rejected == 1)
    assert any("rules file rejected, still enforcing one@" in m and "rule 'every_login': field 'when[0]'" in m
               for m in caplog.messages), caplog.messages
    r = score(1)
    assert list(r.rules) == ["every_login"] and r.action == risk_pb2.REVIEW
    # a good edit goes live between batches
    pack.write_text('version = 1\nname = "three"\n[[rule]]\nname = "every_view"\ndescription = "all views"\n'
                    'when = ["event_type == view_item"]\naction = "CHALLENGE"\n')
    wait_for(lambda: reloader.reloads == 1)
    assert list(score(2).rules) == []
    r = score(3, "view_item")
    assert list(r.rules) == ["every_view"] and r.action == risk_pb2.CHALLENGE


def test_gateway_refuses_to_start_on_a_bad_rules_file(small_model, redis_server, triton, gateway_factory, tmp_path):
    from seqguard.rules import RulesError
    pack = tmp_path / "bad.toml"
    pack.write_text('version = 1\n[[rule]]\nname = "x"\ndescription = "d"\nwhen = ["risk >= 2 3"]\nscore = 1\n')
    with pytest.raises(RulesError, match="rule 'x': field 'when\\[0\\]'"):
        gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=triton.grpc_url,
                        rules_path=str(pack))
