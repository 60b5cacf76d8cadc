"""deploy/: Kubernetes manifests valid against the Kubernetes API schemas, wired together
consistently, free of secret values; the Grafana dashboard and alert rules use the real metrics.

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
                else d["spec"]["podSelector"]["matchLabels"])
            matched = [spec for spec, labels in pods if all(labels.get(k) == v for k, v in sel.items())]
            assert matched, f"{kind}/{d['metadata']['name']} selects no pod template"
            if kind == "Service":
                names = {p["name"] for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
                for port in d["spec"]["ports"]:
                    assert port["targetPort"] in names, f"Service/{d['metadata']['name']}: no port {port['targetPort']}"
    for w in workloads():
        for c in containers(w):
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe, {})
                port = pr.get("httpGet", {}).get("port") or pr.get("grpc", {}).get("port")
                if isinstance(port, str):
                    assert port in names, f"{w['metadata'].get('name')}/{c['name']} {probe}: no port {port}"


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
    """Every SEQGUARD_* the manifests set is a real gateway setting (a typo would be ignored)."""
    from gateway.settings import Settings
    known = {f"SEQGUARD_{f.name.upper()}" for f in fields(Settings)}
    pending = {"SEQGUARD_METRICS_PORT"}    # the gateway's Prometheus endpoint (scrape annotations use 9090)
    names = set(by_name("ConfigMap")["seqguard-gateway"]["data"])
    gw = by_name("Deployment")["seqguard-gateway"]
    names |= {e["name"] for c in containers(gw) for e in c.get("env", []) if e["name"].startswith("SEQGUARD_")}
    assert names - known - pending == set()


def test_gpu_and_probe_requirements():
    triton = by_name("Deployment")["seqguard-triton"]
    c = pod_spec(triton)["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    gw = pod_spec(by_name("Deployment")["seqguard-gateway"])
    g = gw["containers"][0]
    assert g["readinessProbe"]["grpc"]["port"] == 50051 and g["livenessProbe"]["grpc"]["port"] == 50051
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
