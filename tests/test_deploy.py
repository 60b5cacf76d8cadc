"""deploy/: Kubernetes manifests valid against the Kubernetes API schemas, wired together
consistently, free of secret values; the Grafana dashboard and alert rules use the real metrics.
Secure by default (#18 part 6): TLS + bearer tokens on, every secret a mounted file, default-deny
NetworkPolicies, the least-privilege Redis ACL rule, and the manifest's settings run for real.

Schema validation uses `kubernetes-validate` (PyPI; bundles the Kubernetes JSON schemas, so it
runs offline): pip install kubernetes-validate==1.37.0
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "seqguard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
RUNBOOK = ROOT / "docs" / "operations.md"
INSTALL = "pip install kubernetes-validate==1.37.0"
# oldest Kubernetes we support (grpc probes GA in 1.27, autoscaling/v2 in 1.23) and the newest schema bundled
K8S_VERSIONS = ("1.29.0", "1.37.0")

GATEWAY_METRICS = ("seqguard_requests_total", "seqguard_request_seconds_bucket", "seqguard_batch_events_bucket",
                   "seqguard_redis_seconds_bucket", "seqguard_triton_seconds_bucket", "seqguard_risk_bucket")
TRITON_METRICS = ("nv_inference_queue_duration_us", "nv_inference_request_success", "nv_inference_count",
                  "nv_inference_exec_count", "nv_inference_compute_infer_duration_us", "nv_gpu_utilization")

try:
    import yaml
except ImportError:          # only the dashboard test runs without it
    yaml = None


def need_yaml():
    if yaml is None:
        pytest.skip(f"PyYAML needed to read the manifests ({INSTALL} brings it)")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def load_docs() -> list[tuple[Path, dict]]:
    need_yaml()
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def docs_of(kind: str) -> list[dict]:
    return [d for _, d in load_docs() if d.get("kind") == kind]


def by_name(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs_of(kind)}


def workloads() -> list[dict]:
    return docs_of("Deployment") + docs_of("StatefulSet") + docs_of("Job")


def pod_spec(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


def containers(w: dict) -> list[dict]:
    spec = pod_spec(w)
    return spec.get("initContainers", []) + spec["containers"]


def test_manifests_exist():
    kinds = {d["kind"] for _, d in load_docs()}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "ConfigMap", "Secret",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim", "Job"} <= kinds


# ------------------------------------------------------------------ schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(version):
    kv = pytest.importorskip("kubernetes_validate", reason=f"schema validator not installed: {INSTALL}")
    problems = []
    for path, doc in load_docs():
        where = f"{path.relative_to(ROOT)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kv.validate(doc, version, strict=True)        # strict: unknown fields are errors too
        except kv.ValidationError as e:
            problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            problems.append(f"{where}: {e.message}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ wiring
def test_every_object_is_namespaced_and_labelled():
    for path, doc in load_docs():
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") in ("seqguard", "monitoring"), f"{path}: {doc['kind']} namespace"
        assert meta.get("name") or meta.get("generateName"), path


def test_selectors_match_pod_labels_and_named_ports_exist():
    pods = [(pod_spec(w), w["spec"]["template"]["metadata"]["labels"]) for w in workloads()]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for d in docs_of(kind):
            sel = d["spec"]["selector"] if kind == "Service" else (
                d["spec"]["selector"]["matchLabels"] if kind == "PodDisruptionBudget"
                else d["spec"]["podSelector"].get("matchLabels", {}))     # {} = every pod (default deny)
            matched = [spec for spec, labels in pods if all(labels.get(k) == v for k, v in sel.items())]
            assert matched, f"{kind}/{d['metadata']['name']} selects no pod template"
            if kind == "Service":
                names = {p["name"] for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
                for port in d["spec"]["ports"]:
                    assert port["targetPort"] in names, f"Service/{d['metadata']['name']}: no port {port['targetPort']}"
    for w in workloads():
        for c in containers(w):
            names = {p["name"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe, {})
                port = pr.get("httpGet", {}).get("port") or pr.get("grpc", {}).get("port")
                if isinstance(port, str):
                    assert port in names, f"{w['metadata'].get('name')}/{c['name']} {probe}: no port {port}"
                elif port is not None:
                    assert port in numbers, f"{w['metadata'].get('name')}/{c['name']} {probe}: no port {port}"


def test_references_resolve():
    configmaps, secrets, pvcs = by_name("ConfigMap"), by_name("Secret"), by_name("PersistentVolumeClaim")
    services = by_name("Service")
    for w in workloads():
        spec = pod_spec(w)
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
                keys = [i["key"] for i in v["secret"].get("items", [])]
                assert keys, "mount named keys only, so a missing key fails the pod visibly"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
        for c in containers(w):
            for ef in c.get("envFrom", []):
                assert ef["configMapRef"]["name"] in configmaps
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] in services
    for hpa in docs_of("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["name"] in by_name(ref["kind"])


def test_gateway_settings_keys_exist():
    """Every SEQGUARD_* the manifests set -- any ConfigMap key, any container's env, in any workload --
    is a real gateway setting (a typo would be ignored, e.g. auth silently off)."""
    from seqguard.gateway.settings import Settings
    known = {f"SEQGUARD_{f.name.upper()}" for f in fields(Settings)}
    names = {k for d in docs_of("ConfigMap") for k in d.get("data", {}) if k.startswith("SEQGUARD_")}
    assert set(by_name("ConfigMap")["seqguard-gateway"]["data"]) <= names | {"SEQGUARD_CONFIG"}
    env = {e["name"] for w in workloads() for c in containers(w) for e in c.get("env", [])}
    names |= {n for n in env if n.startswith("SEQGUARD_")}
    assert {"SEQGUARD_AUTH_TOKEN_FILE", "SEQGUARD_TLS_CERT_FILE", "SEQGUARD_HEALTH_PORT"} <= names
    assert names - known == set()


def test_gpu_and_probe_requirements():
    triton = by_name("Deployment")["seqguard-triton"]
    c = pod_spec(triton)["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    gw = pod_spec(by_name("Deployment")["seqguard-gateway"])
    g = gw["containers"][0]
    # the gRPC port is TLS, which kubelet grpc probes cannot speak: they use the plaintext health-only port
    cfg = by_name("ConfigMap")["seqguard-gateway"]["data"]
    health, grpc_port = int(cfg["SEQGUARD_HEALTH_PORT"]), int(cfg["SEQGUARD_PORT"])
    assert health != grpc_port
    assert {p["name"]: p["containerPort"] for p in g["ports"]} == {"grpc": grpc_port, "metrics": 9090, "health": health}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert g[probe]["grpc"]["port"] == health, probe
    assert g["lifecycle"]["preStop"] and gw["terminationGracePeriodSeconds"] >= 10
    conf = by_name("ConfigMap")["seqguard-redis-config"]["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M) and re.search(r"^appendfsync everysec$", conf, re.M)
    redis = by_name("StatefulSet")["seqguard-redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    hpas = by_name("HorizontalPodAutoscaler")
    assert hpas["seqguard-gateway"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpas["seqguard-triton"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_us_per_request"
    adapter = by_name("ConfigMap")["prometheus-adapter"]["data"]["config.yaml"]
    rule = yaml.safe_load(adapter)["rules"][0]
    assert rule["name"]["as"] == "triton_queue_us_per_request"
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    for w in docs_of("Deployment") + docs_of("StatefulSet"):
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true", w["metadata"]["name"]


# ------------------------------------------------------------------ no secrets
SECRETISH = re.compile(r"(KEY|PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL)", re.I)
LITERALS = [re.compile(p) for p in (
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"AKIA[0-9A-Z]{16}", r"\b[0-9a-fA-F]{32,}\b",
    r"(?i)\b(requirepass|password)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{8,}")]


def test_no_secret_values_in_manifests():
    for d in docs_of("Secret"):
        assert not d.get("data") and not d.get("stringData"), f"Secret/{d['metadata']['name']} carries values"
    for d in docs_of("ConfigMap"):
        for k in d.get("data", {}):
            assert not (SECRETISH.search(k) and not k.endswith("_FILE")), f"ConfigMap key {k} looks secret"
    for w in workloads():
        for c in containers(w):
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]) and not e["name"].endswith("_FILE"):
                    assert "valueFrom" in e and "value" not in e, f"{c['name']}: {e['name']} must come from a Secret"
    for path in list(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".md", ".conf") or path.name.endswith("Dockerfile"):
            text = path.read_text()
            for rx in LITERALS:
                m = rx.search(text)
                assert m is None, f"{path.relative_to(ROOT)}: looks like a secret value: {m.group(0)[:20]}..."


# ------------------------------------------------------------------ dashboard and alerts
def test_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in GATEWAY_METRICS + TRITON_METRICS:
        assert metric in exprs, f"dashboard does not use {metric}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["title"] and p["targets"] and p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    # PromQL sanity: brackets balance in every expression
    for p in panels:
        for t in p["targets"]:
            e = t["expr"]
            assert e.count("(") == e.count(")") and e.count("{") == e.count("}") and e.count("[") == e.count("]"), e
    assert any(p["type"] == "heatmap" and "seqguard_risk_bucket" in p["targets"][0]["expr"] for p in panels)


def test_alert_rules_have_runbook_sections():
    need_yaml()
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"SeqguardHighDegradedRate", "SeqguardRedisDown", "SeqguardTritonQueueTime",
            "SeqguardLatencyP99OverBudget", "SeqguardScoreDrift"} <= names
    runbook = RUNBOOK.read_text()
    for r in rules:
        assert f"### {r['alert']}" in runbook, f"docs/operations.md has no section for {r['alert']}"
        assert r["annotations"]["runbook"].endswith("#" + r["alert"].lower())
        e = r["expr"]
        assert e.count("(") == e.count(")") and e.count("[") == e.count("]"), r["alert"]


# ------------------------------------------------------------------ secure defaults (#18 part 6)
GATEWAY_SECRET_FILES = {            # setting -> (Secret, key) it must be mounted from
    "SEQGUARD_AUTH_TOKEN_FILE": ("seqguard-gateway-tokens", "scoring-tokens"),
    "SEQGUARD_ADMIN_TOKEN_FILE": ("seqguard-gateway-tokens", "admin-tokens"),
    "SEQGUARD_TLS_CERT_FILE": ("seqguard-gateway-tls", "tls.crt"),
    "SEQGUARD_TLS_KEY_FILE": ("seqguard-gateway-tls", "tls.key"),
    "SEQGUARD_REDIS_PASSWORD_FILE": ("seqguard-redis", "gateway-password"),
    "SEQGUARD_PSEUDONYM_KEY_FILE": ("seqguard-pseudonym-key", "pseudonym.key"),
}
# a secret's value may never be an env var of the gateway, inline or from a Secret
SECRET_SETTINGS = ("SEQGUARD_AUTH_TOKEN", "SEQGUARD_ADMIN_TOKEN", "SEQGUARD_REDIS_PASSWORD", "SEQGUARD_PSEUDONYM_KEY")


def secret_mounts(w: dict, c: dict) -> dict[str, tuple[str, str]]:
    """Path in container -> (Secret name, key) for every Secret volume item mounted in container c."""
    vols = {v["name"]: v["secret"] for v in pod_spec(w).get("volumes", []) if "secret" in v}
    out = {}
    for m in c.get("volumeMounts", []):
        if m["name"] in vols:
            assert m.get("readOnly") and "subPath" not in m, f"{m['name']}: mount Secrets read-only, whole (no subPath)"
            for item in vols[m["name"]]["items"]:
                out[f"{m['mountPath'].rstrip('/')}/{item['path']}"] = (vols[m["name"]]["secretName"], item["key"])
    return out


def gateway_env() -> dict[str, str]:
    """The gateway container's SEQGUARD_* environment as the manifests give it (ConfigMap, then env)."""
    gw = by_name("Deployment")["seqguard-gateway"]
    c = pod_spec(gw)["containers"][0]
    env = {}
    for ef in c.get("envFrom", []):
        assert "configMapRef" in ef, "no envFrom a Secret: that makes every key an env value"
        env.update(by_name("ConfigMap")[ef["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        assert "valueFrom" not in e, f"gateway env {e['name']} from a Secret/field: secrets are files"
        env[e["name"]] = e["value"]
    return env


def test_gateway_auth_and_tls_on_with_secrets_as_files():
    """Bearer tokens (scoring + admin) and TLS are ON in the manifests, every secret the gateway reads
    is a file from a Secret volume (named *_FILE setting -> a mounted Secret key), never an env value."""
    gw = by_name("Deployment")["seqguard-gateway"]
    c = pod_spec(gw)["containers"][0]
    env = gateway_env()
    for name in SECRET_SETTINGS:
        assert name not in env, f"{name} as an env value: use {name}_FILE and a Secret volume"
    mounts = secret_mounts(gw, c)
    for setting, want in GATEWAY_SECRET_FILES.items():
        assert setting in env, f"{setting} not set: secure default off"
        assert mounts.get(env[setting]) == want, f"{setting}={env[setting]} is not Secret {want[0]} key {want[1]}"
    assert not env.get("SEQGUARD_TLS_CLIENT_CA_FILE") or env["SEQGUARD_TLS_CLIENT_CA_FILE"] in mounts
    secrets = by_name("Secret")
    assert secrets["seqguard-gateway-tls"]["type"] == "kubernetes.io/tls"
    assert pod_spec(gw)["automountServiceAccountToken"] is False
    # Secret files are root-owned: the non-root gateway reads them through its fsGroup and a group-read mode
    sc = pod_spec(gw)["securityContext"]
    assert sc["fsGroup"] == sc["runAsGroup"]
    for v in pod_spec(gw)["volumes"]:
        if "secret" in v:
            assert v["secret"]["defaultMode"] & 0o040 and not v["secret"]["defaultMode"] & 0o007, v["name"]
    # the Secrets the workloads need are documented in the example file, with how to make them
    example = (K8S / "secrets" / "secrets.example.yaml").read_text()
    for name, key in set(GATEWAY_SECRET_FILES.values()) | {("seqguard-redis", "password")}:
        assert name in secrets and key in example, (name, key)
    # and the settings really turn auth, roles and TLS on: load them as the gateway would
    from seqguard.gateway.settings import Settings
    assert Settings.load(**{k[len("SEQGUARD_"):].lower(): v for k, v in env.items()
                            if not k.endswith("_FILE")}).health_port > 0


def test_network_policies_default_deny_and_least_access():
    """Default deny (ingress and egress) for the namespace; Redis 6379 and Triton 8001 only from the
    gateway; the gateway only from labelled clients (gRPC) and Prometheus (metrics); the gateway's
    egress only to Redis, Triton and DNS."""
    pols = by_name("NetworkPolicy")
    deny = [p for p in pols.values() if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress")
    gw_sel = {"app.kubernetes.io/name": "seqguard-gateway"}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}

    def rules(pol, direction="ingress"):
        """[(peers, {port numbers})]; every rule must name its peers and its ports (no allow-all)."""
        out = []
        for r in pol["spec"].get(direction, []):
            peers = r.get("from" if direction == "ingress" else "to")
            assert peers and r.get("ports"), f"{pol['metadata']['name']}: a {direction} rule without peers or ports"
            out.append((peers, {p["port"] for p in r["ports"]}))
        return out

    def per_component(name):
        (pol,) = [p for p in pols.values() if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": name}]
        return pol

    for comp, port, metrics in (("seqguard-redis", 6379, 9121), ("seqguard-triton", 8001, 8002)):
        r = rules(per_component(comp))
        assert r == [([{"podSelector": {"matchLabels": gw_sel}}], {port}), ([prometheus], {metrics})], comp
    gw = per_component("seqguard-gateway")
    assert set(gw["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    client = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"seqguard.io/client": "true"}}}
    assert rules(gw) == [([client], {50051}), ([prometheus], {9090})]
    cfg = by_name("ConfigMap")["seqguard-gateway"]["data"]
    assert int(cfg["SEQGUARD_HEALTH_PORT"]) not in {p for _, ports in rules(gw) for p in ports}
    out = rules(gw, "egress")
    assert out[:2] == [([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "seqguard-redis"}}}], {6379}),
                       ([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "seqguard-triton"}}}], {8001})]
    assert out[2][1] == {53} and len(out) == 3
    # the gateway's Redis and Triton addresses are the Services of those pods on those ports
    assert int(cfg["SEQGUARD_REDIS_PORT"]) == 6379 and cfg["SEQGUARD_TRITON_URL"].endswith(":8001")
    # the publish Job needs no network: default deny is all it gets
    job = docs_of("Job")[0]["spec"]["template"]["metadata"]["labels"]
    assert not [p for p in pols.values() if p["spec"]["podSelector"].get("matchLabels", {}).items() <= job.items()
                and p["spec"]["podSelector"] != {}]


def redis_gateway_acl() -> tuple[str, list[str]]:
    """(user name, ACL rules) of the gateway's Redis user: THE line in 30-redis.yaml's ConfigMap."""
    text = by_name("ConfigMap")["seqguard-redis-config"]["data"]["gateway.acl"]
    (line,) = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    word, user, *rules = line.split()
    assert word == "user"
    return user, rules


def test_redis_acl_rule_is_least_privilege():
    user, rules = redis_gateway_acl()
    assert user == by_name("ConfigMap")["seqguard-gateway"]["data"]["SEQGUARD_REDIS_USERNAME"]
    assert rules[:2] == ["reset", "on"] and "-@all" in rules and "resetchannels" in rules
    assert [r for r in rules if r.startswith(("~", "%", "&", "allkeys", "allchannels"))] == ["~sg:*"]
    allowed = {r[1:] for r in rules if r.startswith("+")}
    assert not [r for r in rules if r.startswith("+@") or r.startswith(">") or r.startswith("#")
                or r in ("nopass", "allcommands")], "categories, passwords and nopass do not belong in the rule"
    assert allowed == {"ping", "client|setinfo", "get", "mget", "set", "evalsha", "script|load", "getrange",
                       "incrby", "del", "xadd", "multi", "exec", "scan"}
    assert not allowed & {"flushall", "flushdb", "keys", "config", "debug", "eval", "script", "acl", "shutdown"}
    # Redis builds its config from exactly this file and the gateway-password Secret key
    redis = by_name("StatefulSet")["seqguard-redis"]
    c = pod_spec(redis)["containers"][0]
    script = " ".join(c["args"])
    assert "/etc/redis/gateway.acl" in script and "sha256sum" in script and "/run/redis/auth.conf" in script
    assert secret_mounts(redis, c)["/var/run/secrets/seqguard-redis/gateway-password"] == ("seqguard-redis",
                                                                                         "gateway-password")
    assert "/var/run/secrets/seqguard-redis/gateway-password" in script
    conf = by_name("ConfigMap")["seqguard-redis-config"]["data"]["redis.conf"]
    assert re.search(r"^include /run/redis/auth.conf$", conf, re.M)


@pytest.mark.slow
def test_manifest_settings_serve_tls_tokens_and_a_plaintext_health_port(small_model, gateway_factory, tmp_path,
                                                                        monkeypatch):
    """The gateway as the manifests configure it -- the ConfigMap + Deployment env, each *_FILE pointing
    at a file laid out like its Secret volume -- serves TLS + bearer tokens on the gRPC port (several
    tokens per file: rotation), admin-only labels, and plaintext grpc.health.v1 and NOTHING else on
    the probe port. Only the addresses are overridden (loopback, free ports, a test Redis)."""
    import subprocess

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc
    from seqguard.services import RedisServer, ServiceNotInstalled, free_port

    gw_doc = by_name("Deployment")["seqguard-gateway"]
    mounts = secret_mounts(gw_doc, pod_spec(gw_doc)["containers"][0])
    san = "seqguard-gateway.seqguard.svc"
    d = tmp_path / "secrets"
    d.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt"), "-subj", "/CN=seqguard-gateway",
                    "-addext", f"subjectAltName=DNS:{san}"], check=True, capture_output=True, timeout=30)
    contents = {"scoring-tokens": "old-scoring-token\nnew-scoring-token\n", "admin-tokens": "admin-token\n",
                "gateway-password": "redis-gateway-pass\n", "pseudonym.key": "ab" * 32 + "\n"}
    for key, text in contents.items():
        (d / key).write_text(text)
    for name, value in gateway_env().items():
        if name.endswith("_FILE"):
            value = str(d / mounts[value][1])           # the Secret key's file, as the volume would mount it
        monkeypatch.setenv(name, value)
    try:
        redis = RedisServer(run_dir=tmp_path / "redis", password="redis-gateway-pass")
    except ServiceNotInstalled as exc:
        pytest.skip(str(exc))
    redis.start()
    try:
        redis.wait_ready(timeout=15)
        gw = gateway_factory(model_dir=str(small_model), host="127.0.0.1", port=free_port(), health_port=free_port(),
                             metrics_port=0, redis_host=redis.host, redis_port=redis.port,
                             redis_username="",              # the test Redis has no ACL user (test_security.py has)
                             triton_url="127.0.0.1:1", pseudonym_key="")
        s = gw.gateway.settings
        assert s.tls_cert_file and len(s.auth_tokens()) == 2 and len(s.admin_tokens()) == 1
        assert s.redis_password == "redis-gateway-pass" and s.key_bytes() == b"ab" * 32

        def code(fn):
            try:
                fn()
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        state = risk_pb2.UserStateRequest(user_id="u-deploy")
        with grpc.insecure_channel(f"127.0.0.1:{gw.gateway.health_port}") as ch:     # what the kubelet does
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
            only_health = risk_pb2_grpc.RiskScoringStub(ch).GetUserState
            assert code(lambda: only_health(state, metadata=[("authorization", "Bearer admin-token")], timeout=5)) \
                == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(gw.address) as ch:                                  # plaintext to the TLS port
            assert code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)) \
                == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(root_certificates=(d / "tls.crt").read_bytes())
        with grpc.secure_channel(gw.address, creds, options=[("grpc.ssl_target_name_override", san)]) as ch:
            stub = risk_pb2_grpc.RiskScoringStub(ch)
            md = lambda tok: [("authorization", f"Bearer {tok}")]  # noqa: E731
            assert code(lambda: stub.GetUserState(state, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            for tok in ("old-scoring-token", "new-scoring-token", "admin-token"):
                assert code(lambda: stub.GetUserState(state, metadata=md(tok), timeout=5)) == grpc.StatusCode.OK
            outcome = risk_pb2.OutcomeRequest(event_id="e-deploy", label=risk_pb2.GENUINE)
            assert code(lambda: stub.ReportOutcome(outcome, metadata=md("new-scoring-token"), timeout=5)) \
                == grpc.StatusCode.PERMISSION_DENIED
            assert code(lambda: stub.ReportOutcome(outcome, metadata=md("admin-token"), timeout=5)) == grpc.StatusCode.OK
        health_port = gw.gateway.health_port
        gw.stop()
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:                  # closed with the gateway
            assert code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)) \
                == grpc.StatusCode.UNAVAILABLE
    finally:
        redis.stop()


def test_settings_the_manifests_rely_on(tmp_path):
    """redis_password_file (the Redis password as a mounted file) and health_port, validated."""
    from seqguard.gateway.settings import Settings
    f = tmp_path / "password"
    f.write_text("from-a-file\n")
    assert Settings.load(redis_password_file=str(f)).redis_password == "from-a-file"
    with pytest.raises(ValueError, match="not both"):
        Settings.load(redis_password_file=str(f), redis_password="inline")
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Settings.load(redis_password_file=str(f))
    with pytest.raises(FileNotFoundError):
        Settings.load(redis_password_file=str(tmp_path / "missing"))
    assert Settings.load().health_port == 0                       # off unless configured
    with pytest.raises(ValueError, match="health_port"):
        Settings.load(port=50051, health_port=50051)
    with pytest.raises(ValueError, match="health_port"):
        Settings.load(health_port=70000)


@pytest.mark.slow
def test_redis_start_command_builds_the_acl_user(tmp_path):
    """30-redis.yaml's start script and redis.conf, run for real (paths, port and bind moved into tmp):
    Redis starts; the gateway-password Secret file authenticates as the gateway ACL user with the
    gateway.acl rule; the admin password is the default user's; the plaintext gateway password is in
    no file Redis reads; an empty gateway-password stops Redis from starting."""
    import os
    import subprocess
    import time

    import redis as redis_py

    from seqguard.services import ServiceNotInstalled, find_redis_server, free_port
    try:
        exe = find_redis_server()
    except ServiceNotInstalled as exc:
        pytest.skip(str(exc))
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(x) for x in re.search(r"v=(\d+)\.(\d+)", version).groups())
    cm = by_name("ConfigMap")["seqguard-redis-config"]["data"]
    redis_doc = by_name("StatefulSet")["seqguard-redis"]
    c = pod_spec(redis_doc)["containers"][0]
    assert c["command"] == ["sh", "-c"]
    port = free_port()
    sec, etc, run, data = (tmp_path / n for n in ("sec", "etc", "run", "data"))
    for p in (sec, etc, run, data):
        p.mkdir()
    (etc / "redis.conf").write_text(cm["redis.conf"].replace("bind * -::*", "bind 127.0.0.1")
                                    .replace("port 6379", f"port {port}").replace("dir /data", f"dir {data}")
                                    .replace("/run/redis/auth.conf", f"{run}/auth.conf"))
    acl = cm["gateway.acl"]
    if (major, minor) < (7, 2):          # CLIENT SETINFO (redis-py's connect-time call) is new in 7.2
        acl = acl.replace(" +client|setinfo", "")
    (etc / "gateway.acl").write_text(acl)
    script = (c["args"][0].replace("/var/run/secrets/seqguard-redis", str(sec)).replace("/etc/redis", str(etc))
              .replace("/run/redis", str(run)).replace("exec redis-server", f"exec {exe}"))
    env = {**os.environ, "REDIS_PASSWORD": "admin-pass"}

    (sec / "gateway-password").write_text("")
    bad = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "no gateway-password" in bad.stderr

    (sec / "gateway-password").write_text("gw-secret-pass\n")
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        admin = redis_py.Redis(port=port, password="admin-pass")
        for _ in range(100):
            try:
                admin.ping()
                break
            except redis_py.exceptions.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        user = by_name("ConfigMap")["seqguard-gateway"]["data"]["SEQGUARD_REDIS_USERNAME"]
        gw = redis_py.Redis(port=port, username=user, password="gw-secret-pass")
        assert gw.set("sg:probe", "1") and gw.get("sg:probe") == b"1"
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            gw.flushall()
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            gw.set("other:key", "1")
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port, username=user, password="admin-pass").ping()
        conf = (run / "auth.conf").read_text()
        assert "gw-secret-pass" not in conf and (run / "auth.conf").stat().st_mode & 0o077 == 0
        assert admin.acl_getuser(user)["enabled"]
        gw.close()
        admin.close()
    finally:
        if proc.poll() is None:
            proc.terminate()                 # sh exec'd redis-server: this is Redis' own pid
        proc.wait(10)
