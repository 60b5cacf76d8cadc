"""The committed gateway/proto code must be what proto/generate.sh makes from risk.proto."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("risk_pb2.py", "risk_pb2.pyi", "risk_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools not installed (pip install -e '.[dev]')")
    out = tmp_path / "gen"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "proto" / "generate.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"generate.sh failed:\n{proc.stdout}\n{proc.stderr}"
    stale = [name for name in GENERATED
             if (out / name).read_bytes() != (ROOT / "gateway" / "proto" / name).read_bytes()]
    if stale:
        from importlib.metadata import version
        pytest.fail(f"gateway/proto/{{{','.join(stale)}}} differ from a fresh generation of "
                    "proto/seqguard/v1/risk.proto: run proto/generate.sh and commit both "
                    f"(generated here with grpcio-tools {version('grpcio-tools')})")


def test_generated_code_imports_and_round_trips():
    from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc

    assert risk_pb2.DESCRIPTOR.package == "seqguard.v1"
    service = risk_pb2.DESCRIPTOR.services_by_name["RiskScoring"]
    assert [m.name for m in service.methods] == ["Score", "ScoreBatch", "Ingest", "GetUserState", "ReportOutcome",
                                                   "SetHold", "ReleaseHold", "ListHolds"]
    assert service.methods_by_name["Ingest"].client_streaming
    assert hasattr(risk_pb2_grpc, "RiskScoringStub")
    assert hasattr(risk_pb2_grpc, "add_RiskScoringServicer_to_server")

    # Event mirrors schema v1 field for field, same names and order.
    from seqguard.schema import FIELDS
    assert tuple(f.name for f in risk_pb2.Event.DESCRIPTOR.fields) == FIELDS

    e = risk_pb2.Event(event_id="e1", user_id="u1", ts=1_700_000_000_000, event_type="login")
    assert not e.HasField("amount") and not e.HasField("country")   # absence is visible
    e.amount = 0.0
    assert e.HasField("amount")
    back = risk_pb2.Event.FromString(e.SerializeToString())
    assert back == e and back.HasField("amount")

    r = risk_pb2.ScoreResponse(event_id="e1", risk=0.9, action=risk_pb2.BLOCK,
                               status=risk_pb2.OK,
                               reasons=[risk_pb2.Reason(code="X", weight=1.0, event_ids=["e1"])])
    assert risk_pb2.ScoreResponse.FromString(r.SerializeToString()) == r
    s = risk_pb2.UserState(user_key="k", context={"n_login": 3.0},
                           recent=[risk_pb2.RecentEvent(event_id="e1", event_type="login", ts=1)])
    assert dict(risk_pb2.UserState.FromString(s.SerializeToString()).context) == {"n_login": 3.0}
