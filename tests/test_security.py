"""Security on real servers: TLS (and mTLS) on the gateway, bearer-token auth, Redis with a password.

Most tests call GetUserState, which reads Redis only, so they need no Triton: the point is the
transport and auth layer, which sits in front of every RPC alike. test_redis_acl_user runs the write
paths through a real Triton under the deployed Redis ACL rule.
"""
import subprocess
from pathlib import Path

import grpc
import pytest

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from seqguard.services import RedisServer

pytestmark = pytest.mark.slow
DEAD_TRITON = "127.0.0.1:1"      # never contacted by GetUserState


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server cert for localhost/127.0.0.1 and a client cert, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=seqguard-test-ca", cwd=d)
    (d / "srv.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("srv", ["-extfile", "srv.ext"]), ("cli", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", *ext, cwd=d)
    # a second, unrelated CA: a client trusting only it must not accept the server
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "1", "-subj", "/CN=other", cwd=d)
    return d


def _state(channel, metadata=None, timeout=5):
    return risk_pb2_grpc.RiskScoringStub(channel).GetUserState(
        risk_pb2.UserStateRequest(user_id="u-security"), metadata=metadata, timeout=timeout)


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _tls_channel(gw, pki, ca="ca.pem", client_cert=False):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / ca).read_bytes(),
        private_key=(pki / "cli.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "cli.pem").read_bytes() if client_cert else None)
    return grpc.secure_channel(gw.address, creds, options=[("grpc.ssl_target_name_override", "localhost")])


def test_bearer_token_auth(small_model, redis_server, gateway_factory):
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                         auth_token="s3cret-token-for-tests")
    with grpc.insecure_channel(gw.address) as ch:
        assert _code(lambda: _state(ch)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _state(ch, [("authorization", "Bearer wrong-token")])) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _state(ch, [("authorization", "s3cret-token-for-tests")])) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _state(ch, [("authorization", "Bearer s3cret-token-for-tests")])) == grpc.StatusCode.OK
        # client-streaming RPCs are guarded too
        stub = risk_pb2_grpc.RiskScoringStub(ch)
        assert _code(lambda: stub.Ingest(iter([]), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        # probes stay open: health answers without a token
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_role_guards_labels_and_reflection_needs_a_token(small_model, redis_server, gateway_factory):
    """ReportOutcome writes the labels retraining learns from: a scoring token may not call it (and with
    no admin token configured nobody may); reflection is behind auth too, health is not."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                         auth_token="scoring-token-for-tests", admin_token="admin-token-for-tests")
    only_scoring = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                                   auth_token="scoring-token-for-tests")
    outcome = risk_pb2.OutcomeRequest(event_id="e-sec", label=risk_pb2.FRAUD)
    r = redis_server.client()
    r.delete("sg:outcomes")

    def report(ch, token):
        md = [("authorization", f"Bearer {token}")] if token else None
        return _code(lambda: risk_pb2_grpc.RiskScoringStub(ch).ReportOutcome(outcome, metadata=md, timeout=5))

    def reflect(ch, token):
        md = [("authorization", f"Bearer {token}")] if token else None
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        return _code(lambda: next(stub.ServerReflectionInfo(req, metadata=md, timeout=5)))

    with grpc.insecure_channel(gw.address) as ch:
        assert report(ch, None) == grpc.StatusCode.UNAUTHENTICATED
        assert report(ch, "scoring-token-for-tests") == grpc.StatusCode.PERMISSION_DENIED
        assert r.xlen("sg:outcomes") == 0                          # nothing written by a refused caller
        assert report(ch, "admin-token-for-tests") == grpc.StatusCode.OK
        assert r.xlen("sg:outcomes") == 1
        assert _code(lambda: _state(ch, [("authorization", "Bearer admin-token-for-tests")])) == grpc.StatusCode.OK
        assert reflect(ch, None) == grpc.StatusCode.UNAUTHENTICATED
        assert reflect(ch, "scoring-token-for-tests") == grpc.StatusCode.OK
    with grpc.insecure_channel(only_scoring.address) as ch:
        assert report(ch, "scoring-token-for-tests") == grpc.StatusCode.PERMISSION_DENIED


def test_bearer_token_file_accepts_each_listed_token(small_model, redis_server, gateway_factory, tmp_path):
    f = tmp_path / "tokens"
    f.write_text("token-one\n\ntoken-two\n")
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                         auth_token_file=str(f))
    with grpc.insecure_channel(gw.address) as ch:
        for tok in ("token-one", "token-two"):
            assert _code(lambda: _state(ch, [("authorization", f"Bearer {tok}")])) == grpc.StatusCode.OK
        assert _code(lambda: _state(ch, [("authorization", "Bearer token-three")])) == grpc.StatusCode.UNAUTHENTICATED


def test_tls_gateway(small_model, redis_server, gateway_factory, pki):
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                         tls_cert_file=str(pki / "srv.pem"), tls_key_file=str(pki / "srv.key"))
    with _tls_channel(gw, pki) as ch:                     # trusts our CA
        assert _code(lambda: _state(ch)) == grpc.StatusCode.OK
    with _tls_channel(gw, pki, ca="other.pem") as ch:     # trusts another CA: handshake fails
        assert _code(lambda: _state(ch, timeout=3)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(gw.address) as ch:         # plaintext to a TLS port
        assert _code(lambda: _state(ch, timeout=3)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_client_certificate(small_model, redis_server, gateway_factory, pki):
    gw = gateway_factory(model_dir=str(small_model), redis_port=redis_server.port, triton_url=DEAD_TRITON,
                         tls_cert_file=str(pki / "srv.pem"), tls_key_file=str(pki / "srv.key"),
                         tls_client_ca_file=str(pki / "ca.pem"), auth_token="tls-and-token")
    ok = [("authorization", "Bearer tls-and-token")]
    with _tls_channel(gw, pki, client_cert=True) as ch:
        assert _code(lambda: _state(ch, ok)) == grpc.StatusCode.OK
        assert _code(lambda: _state(ch)) == grpc.StatusCode.UNAUTHENTICATED   # mTLS does not replace the token
    with _tls_channel(gw, pki, client_cert=False) as ch:   # no client cert: rejected in the handshake
        assert _code(lambda: _state(ch, ok, timeout=3)) == grpc.StatusCode.UNAVAILABLE


def test_redis_password(small_model, gateway_factory, tmp_path):
    redis = RedisServer(run_dir=tmp_path / "redis", password="redis-pass-for-tests")
    redis.start()
    try:
        redis.wait_ready(timeout=15)
        good = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                               redis_password="redis-pass-for-tests", redis_timeout_ms=500)
        bad = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                              redis_password="wrong", redis_timeout_ms=500)
        none = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                               redis_timeout_ms=500)
        with grpc.insecure_channel(good.address) as ch:
            assert _code(lambda: _state(ch)) == grpc.StatusCode.OK
        for gw in (bad, none):
            with grpc.insecure_channel(gw.address) as ch:
                assert _code(lambda: _state(ch)) == grpc.StatusCode.UNAVAILABLE
    finally:
        redis.stop()


REDIS_MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "30-redis.yaml"


def deployed_gateway_acl() -> tuple[str, list[str]]:
    """(user, rules) of the gateway's Redis ACL user, read from THE rule the Redis manifest uses
    (ConfigMap seqguard-redis-config, key gateway.acl): no copy of it lives in the tests."""
    yaml = pytest.importorskip("yaml", reason="PyYAML needed to read deploy/k8s/30-redis.yaml")
    (cm,) = [d for d in yaml.safe_load_all(REDIS_MANIFEST.read_text())
             if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "seqguard-redis-config"]
    (line,) = [ln for ln in cm["data"]["gateway.acl"].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    word, user, *rules = line.split()
    assert word == "user"
    return user, rules


def test_redis_acl_user(small_model, triton_server_factory, gateway_factory, tmp_path):
    """The deployed least-privilege ACL user (deploy/k8s/30-redis.yaml gateway.acl) is enough for every
    gateway path that writes -- Score, ScoreBatch, a duplicate, Ingest, ReportOutcome (admin token),
    SetHold / ListHolds / ReleaseHold -- and for GetUserState, through a real Triton, with no command
    refused along the way (ACL LOG stays empty); commands outside the rule (FLUSHALL, KEYS, CONFIG,
    EVAL, keys outside sg:*) are refused for that user. A user without access to the sg:* keys, or
    the wrong password, is refused rather than served stale or empty state."""
    import time

    import redis as redis_py

    user, rules = deployed_gateway_acl()
    redis = RedisServer(run_dir=tmp_path / "redis", password="admin-pass-for-tests")
    redis.start()
    try:
        redis.wait_ready(timeout=15)
        admin = redis_py.Redis(host=redis.host, port=redis.port, password="admin-pass-for-tests")
        # a subcommand this redis-server does not have (CLIENT SETINFO is 7.2+, production runs 7.2;
        # Debian 12 ships 7.0, where redis-py's connect-time SETINFO is an unknown command anyway)
        # cannot be granted; everything else of the rule is applied exactly as written
        missing = []
        for r in rules:
            if r.startswith("+") and "|" in r:
                try:
                    admin.execute_command("ACL", "SETUSER", "probe-subcommand", r)
                except redis_py.exceptions.ResponseError:
                    missing.append(r)
        admin.execute_command("ACL", "DELUSER", "probe-subcommand")
        assert set(missing) <= {"+client|setinfo"}, missing
        version = tuple(int(x) for x in admin.info("server")["redis_version"].split(".")[:2])
        assert not missing or version < (7, 2)
        admin.execute_command("ACL", "SETUSER", user, *[r for r in rules if r not in missing], ">gw-pass")
        admin.execute_command("ACL", "SETUSER", "outsider", "on", ">out-pass", "~other:*", "+@all", "-@dangerous")
        admin.execute_command("ACL", "LOG", "RESET")

        triton = triton_server_factory(small_model / "model_repository")
        common = dict(model_dir=str(small_model), redis_port=redis.port, triton_url=triton.grpc_url,
                      deadline_ms=5000, triton_timeout_ms=5000, redis_timeout_ms=2000,
                      local_encoder_fallback=False,       # a refused Triton call must show, not be scored locally
                      auth_token="score-token", admin_token="admin-token")
        good = gateway_factory(**common, redis_username=user, redis_password="gw-pass")
        score_md, admin_md = [("authorization", "Bearer score-token")], [("authorization", "Bearer admin-token")]
        now = int(time.time() * 1000)

        def ev(i, user_id="acl-alice", event_type="login", **kw):
            return risk_pb2.Event(event_id=f"acl-{user_id}-{i}", user_id=user_id, event_type=event_type,
                                  ts=now - 60_000 + i * 1000, device_id="dev-acl", ip="10.1.2.3", country="DE", **kw)

        with grpc.insecure_channel(good.address) as ch:
            stub = risk_pb2_grpc.RiskScoringStub(ch)
            first = stub.Score(risk_pb2.ScoreRequest(event=ev(0)), metadata=score_md, timeout=30)
            assert first.status == risk_pb2.OK and first.sequence > 0, first.status_detail
            again = stub.Score(risk_pb2.ScoreRequest(event=ev(0)), metadata=score_md, timeout=30)   # idempotent replay
            assert again.status == risk_pb2.OK and again.sequence == first.sequence
            batch = stub.ScoreBatch(risk_pb2.ScoreBatchRequest(events=[
                ev(1, event_type="view_item"), ev(2, event_type="add_to_cart"),
                ev(3, event_type="payment", amount=42.0), ev(4, user_id="acl-bob")]), metadata=score_md, timeout=30)
            assert [r.status for r in batch.results] == [risk_pb2.OK] * 4, [r.status_detail for r in batch.results]
            ingested = stub.Ingest(iter([ev(5, event_type="logout")]), metadata=score_md, timeout=30)
            assert (ingested.accepted, ingested.rejected) == (1, 0), ingested.errors
            ack = stub.ReportOutcome(risk_pb2.OutcomeRequest(event_id="acl-acl-alice-3", user_id="acl-alice",
                                                             label=risk_pb2.FRAUD, family="card_testing"),
                                     metadata=admin_md, timeout=10)
            assert ack is not None
            hold = stub.SetHold(risk_pb2.SetHoldRequest(kind=risk_pb2.HOLD_USER, id="acl-alice", action=risk_pb2.REVIEW,
                                                        reason="acl test", who="tests", ttl_s=3600),
                                metadata=admin_md, timeout=10)
            assert [h.key for h in stub.ListHolds(risk_pb2.ListHoldsRequest(), metadata=admin_md, timeout=10).holds] \
                == [hold.key]
            state = stub.GetUserState(risk_pb2.UserStateRequest(user_id="acl-alice"), metadata=score_md, timeout=10)
            assert state.n_events == 5 and [h.key for h in state.holds] == [hold.key]
            assert stub.ReleaseHold(risk_pb2.ReleaseHoldRequest(kind=risk_pb2.HOLD_USER, id="acl-alice", who="tests"),
                                    metadata=admin_md, timeout=10).released
            held = stub.Score(risk_pb2.ScoreRequest(event=ev(6, event_type="search")), metadata=score_md, timeout=30)
            assert held.status == risk_pb2.OK, held.status_detail
        # nothing the gateway sent was refused, and what it wrote is where the rule allows
        assert admin.execute_command("ACL", "LOG") == []
        assert admin.xlen("sg:outcomes") == 1 and admin.xlen("sg:audit") == 2
        keys = admin.keys("*")
        assert keys and all(k.startswith(b"sg:") for k in keys)

        # outside the rule: refused for the gateway's user
        as_gw = redis_py.Redis(host=redis.host, port=redis.port, username=user, password="gw-pass")
        for cmd in (("FLUSHALL",), ("KEYS", "sg:*"), ("CONFIG", "GET", "maxmemory"), ("EVAL", "return 1", "0"),
                    ("GET", "other:key"), ("SET", "other:key", "x"), ("HSET", "sg:h", "f", "v"), ("SUBSCRIBE", "sg:c"),
                    ("SCRIPT", "FLUSH"), ("FLUSHDB",), ("ACL", "LIST"), ("SELECT", "1"), ("RENAME", "sg:seq", "sg:x")):
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                as_gw.execute_command(*cmd)
        assert admin.dbsize() == len(keys)                 # FLUSHALL really did nothing
        as_gw.close()

        outsider = gateway_factory(**common, redis_username="outsider", redis_password="out-pass")
        wrong = gateway_factory(**common, redis_username=user, redis_password="admin-pass-for-tests")
        for gw in (outsider, wrong):
            with grpc.insecure_channel(gw.address) as ch:
                assert _code(lambda: _state(ch, score_md)) != grpc.StatusCode.OK
        admin.close()
    finally:
        redis.stop()
