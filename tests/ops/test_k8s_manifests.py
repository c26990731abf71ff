"""deploy/k8s/ offline: every built-in resource validates (strict: no unknown field) against
the schema of current Kubernetes versions (kubernetes-validate, whose schemas ship in the
package); yamllint passes; and the invariants that tie the manifests to the server and its
image hold: probes on the right paths and port, a grace period that outlasts preStop and
drain, the image's user, volumes where the server writes, the HPA's metric a gauge the
server exports and the adapter's rule serves.

The ServiceMonitor is a custom resource (the Prometheus Operator's CRD), which
kubernetes-validate has no schema for: it is not schema-validated, only checked here
against the Service it selects."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from yamllint import linter
from yamllint.config import YamlLintConfig

from palm_serve.engine.stats import EngineStats
from palm_serve.model.compiled import cache_directory
from palm_serve.server.metrics import Metrics
from palm_serve.server.serve import GRACEFUL_SHUTDOWN_SECONDS
from palm_serve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DOCKERFILE = (ROOT / "docker" / "Dockerfile.cpu").read_text()
# The oldest version still supported upstream when this was written, and the newest the
# validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}
YAMLLINT = """
extends: default
rules:
  line-length: {max: 100}
  document-start: disable
  comments: {min-spaces-from-content: 1}
"""


def resources() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def one(kind: str) -> dict:
    [doc] = [d for d in resources() if d["kind"] == kind]
    return doc


def container() -> dict:
    [c] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config() -> dict[str, str]:
    return one("ConfigMap")["data"]


def test_the_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    kinds = sorted(d["kind"] for d in resources())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_resources_validate_strictly(version):
    built_in = [d for d in resources() if d["apiVersion"] not in CUSTOM_RESOURCES]
    assert len(built_in) == 5
    for doc in built_in:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field():
    # So that the test above could fail: an unknown field and a wrong type both raise.
    misspelt = copy.deepcopy(one("Deployment"))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    wrong_type = copy.deepcopy(one("Service"))
    wrong_type["spec"]["ports"][0]["port"] = "eight thousand"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_yamllint_passes():
    rules = YamlLintConfig(YAMLLINT)
    problems = []
    for path in sorted(K8S.rglob("*.yaml")):
        problems += [f"{path.name}:{p.line}: {p}" for p in linter.run(path.read_text(), rules)]
    assert problems == []


def test_probes_ask_the_server_on_its_port():
    c = container()
    [port] = c["ports"]
    assert port["containerPort"] == int(re.search(r"PALM_PORT=(\d+)", DOCKERFILE)[1])
    assert f"EXPOSE {port['containerPort']}" in DOCKERFILE
    paths = {probe: c[probe]["httpGet"] for probe in ("readinessProbe", "livenessProbe")}
    assert paths["readinessProbe"]["path"] == "/ready"
    assert paths["livenessProbe"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])


def test_the_startup_probe_waits_out_a_cold_compile():
    start_period = int(re.search(r"--start-period=(\d+)s", DOCKERFILE)[1])
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > start_period


def test_the_grace_period_outlasts_prestop_and_the_drain():
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    settings = Settings(**{k.removeprefix("PALM_").lower(): v for k, v in config().items()})
    # The engine core's own shutdown comes after these: some seconds must be left for it.
    needed = (
        int(command[1]) + settings.drain_delay + settings.drain_timeout + GRACEFUL_SHUTDOWN_SECONDS
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + 10


def test_the_config_map_holds_valid_settings_and_the_pod_reads_it():
    data = config()
    fields = set(Settings.model_fields)
    for key in data:
        assert key.startswith("PALM_") and key.removeprefix("PALM_").lower() in fields, key
    Settings(**{k.removeprefix("PALM_").lower(): v for k, v in data.items()})
    [source] = container()["envFrom"]
    assert source["configMapRef"]["name"] == one("ConfigMap")["metadata"]["name"]


def test_resources_are_bounded_and_leave_the_front_a_cpu():
    limits, requests = container()["resources"]["limits"], container()["resources"]["requests"]
    assert limits == requests  # Guaranteed QoS: whole cores under the static CPU manager
    assert int(config()["PALM_ENGINE_THREADS"]) == int(limits["cpu"]) - 1


def test_the_pod_runs_as_the_images_user_on_a_read_only_root():
    uid = int(re.search(r"^USER (\d+)$", DOCKERFILE, re.M)[1])
    assert re.search(rf"useradd --create-home --uid {uid} .*\bpalm$", DOCKERFILE, re.M)
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_the_server_writes_only_into_mounted_volumes(monkeypatch):
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    assert "/tmp" in mounts  # the core's ZMQ sockets, the compilers' scratch files
    # The compiled step's cache, where the server puts it for the image's user.
    monkeypatch.setenv("HOME", "/home/palm")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    inductor = cache_directory()
    assert any(inductor.is_relative_to(path) for path in mounts), inductor


def test_selectors_pick_the_pods():
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = [
        deployment["spec"]["selector"]["matchLabels"],
        one("Service")["spec"]["selector"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selected:
        assert selector.items() <= labels.items()
    service_port = one("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == container()["ports"][0]["name"]


def test_rollouts_and_evictions_keep_a_replica_serving():
    deployment = one("Deployment")["spec"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one("HorizontalPodAutoscaler")["spec"]
    pdb = one("PodDisruptionBudget")["spec"]
    # minAvailable below every replica count, or a node drain could never evict one.
    assert 1 <= pdb["minAvailable"] < hpa["minReplicas"] <= deployment["replicas"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])


def exported_gauges() -> set[str]:
    text = Metrics(lambda: EngineStats(), lambda: 0).exposition().decode()
    return {f.name for f in text_string_to_metric_families(text) if f.type == "gauge"}


def adapter_rule() -> dict:
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def test_the_hpa_scales_on_a_gauge_the_server_exports_and_the_adapter_serves():
    [metric] = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "palm_num_requests_waiting"
    assert name in exported_gauges()
    rule = adapter_rule()
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["name"]["as"] == name
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="no promtool on this machine (Debian's prometheus package has it; .ci/run installs it)",
)
def test_the_adapters_query_is_promql(tmp_path):
    # The adapter's template filled in as it would for one pod of the HPA.
    rule = adapter_rule()
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "palm_num_requests_waiting")
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"palm-serve-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = {"groups": [{"name": "adapter", "rules": [{"record": "adapter:q", "expr": query}]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    run = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_finds_the_metrics_either_way():
    service = one("Service")
    monitor = one("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container()["ports"][0]["containerPort"]
