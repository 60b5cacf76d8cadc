"""Security on real servers: TLS (and mTLS) on the gateway, bearer-token auth, Redis with a password.

These tests call GetUserState, which reads Redis only, so they need no Triton: the point is the
transport and auth layer, which sits in front of every RPC alike.
"""
import subprocess

import grpc
import pytest

from gateway.proto import risk_pb2, risk_pb2_grpc
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


def test_redis_acl_user(small_model, gateway_factory, tmp_path):
    """A least-privilege ACL user (keys sg:* only, no dangerous commands) is enough for the gateway;
    a user without access to the sg:* keys is refused rather than served stale or empty state."""
    import redis as redis_py

    redis = RedisServer(run_dir=tmp_path / "redis", password="admin-pass-for-tests")
    redis.start()
    try:
        redis.wait_ready(timeout=15)
        admin = redis_py.Redis(host=redis.host, port=redis.port, password="admin-pass-for-tests")
        admin.execute_command("ACL", "SETUSER", "seqguard", "on", ">gw-pass", "~sg:*", "+@all", "-@dangerous")
        admin.execute_command("ACL", "SETUSER", "outsider", "on", ">out-pass", "~other:*", "+@all", "-@dangerous")
        admin.close()
        good = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                               redis_username="seqguard", redis_password="gw-pass", redis_timeout_ms=500)
        outsider = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                                   redis_username="outsider", redis_password="out-pass", redis_timeout_ms=500)
        wrong = gateway_factory(model_dir=str(small_model), redis_port=redis.port, triton_url=DEAD_TRITON,
                                redis_username="seqguard", redis_password="admin-pass-for-tests",
                                redis_timeout_ms=500)
        with grpc.insecure_channel(good.address) as ch:
            assert _code(lambda: _state(ch)) == grpc.StatusCode.OK
        for gw in (outsider, wrong):
            with grpc.insecure_channel(gw.address) as ch:
                assert _code(lambda: _state(ch)) != grpc.StatusCode.OK
    finally:
        redis.stop()
