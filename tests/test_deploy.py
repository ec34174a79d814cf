"""Deployment files, checked without a Docker engine or a cluster.

* Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate, strict).
* The KServe InferenceService (a CRD) and the adapter rules are checked for the fields we rely on.
* Every metric name the dashboard, the HPA and the adapter rules use is exported by the running
  service in its multi-process layout (two front-ends and an executor, metrics aggregated).
* The Dockerfile installs through the Makefile (no second dependency list); its HEALTHCHECK command, run
  as the container would run it, probes the port ``FLOWSERVE_PORT`` gives the server.
* ``docker compose config`` accepts the compose file where the compose plugin is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
METRIC = re.compile(r"\bflowserve_[a-z_]+")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", [p for p in K8S if p.name != "kustomization.yaml"], ids=lambda p: p.name)
def test_kubernetes_manifest_validates(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    k = docs(ROOT / "deploy/k8s/kustomization.yaml")[0]
    assert sorted(k["resources"]) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")


def test_deployment_probes_gpu_and_draining() -> None:
    dep = docs(ROOT / "deploy/k8s/deployment.yaml")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    cm = docs(ROOT / "deploy/k8s/configmap.yaml")[0]["data"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > sleep + float(cm["FLOWSERVE_DRAIN_TIMEOUT_S"])


def test_shared_memory_for_the_process_layout() -> None:
    """Front-ends pass tensors to executors through /dev/shm: every way of running the image gives it room
    (Docker's default /dev/shm is 64 MiB, one front-end's arena)."""
    pod = docs(ROOT / "deploy/k8s/deployment.yaml")[0]["spec"]["template"]["spec"]
    isvc = docs(ROOT / "deploy/kserve/inferenceservice.yaml")[0]["spec"]["predictor"]
    for spec in (pod, isvc):
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert vol["emptyDir"]["medium"] == "Memory"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for svc in ("flowserve", "flowserve-cpu"):
        assert compose["services"][svc]["shm_size"] in ("1gb", "2gb")


def test_kserve_inferenceservice_shape() -> None:
    isvc = docs(ROOT / "deploy/kserve/inferenceservice.yaml")[0]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["name"] == "kserve-container"
    port = c["ports"][0]["containerPort"]
    assert c["args"][c["args"].index("--port") + 1] == str(port)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def _used_metric_names() -> set[str]:
    names: set[str] = set()
    dash = json.loads((ROOT / "deploy/grafana/dashboards/flowserve.json").read_text())
    for panel in dash["panels"]:
        for t in panel["targets"]:
            names |= set(METRIC.findall(t["expr"]))
    hpa = docs(ROOT / "deploy/k8s/hpa.yaml")[0]
    names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    for group in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            names |= set(METRIC.findall(rule["expr"]))
    rules = yaml.safe_load(docs(ROOT / "deploy/k8s/prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])["rules"]
    adapter_exposed = {r["name"]["as"] for r in rules}
    for r in rules:
        names |= set(METRIC.findall(r["seriesQuery"] + r["metricsQuery"].replace("<<.Series>>", r["name"]["matches"])))
    return names - adapter_exposed


def test_dashboard_hpa_and_adapter_metrics_are_exported(server) -> None:  # noqa: ANN001
    with httpx.Client(base_url=server.url) as c:
        c.post("/v1/models/digits/score", json={"instances": [[[0] * 8] * 8]})
        text = c.get("/metrics").text
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    # a labelled metric has no sample until first used; its family (name and type) is always there
    exported = {f.name + sfx for f in text_string_to_metric_families(text) for sfx in suffixes.get(f.type, ("",))}
    missing = sorted(n for n in _used_metric_names() if n not in exported)
    assert not missing, f"metrics used by deploy/ but not exported: {missing}"
    hpa = docs(ROOT / "deploy/k8s/hpa.yaml")[0]
    rules = yaml.safe_load(docs(ROOT / "deploy/k8s/prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])["rules"]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= {r["name"]["as"] for r in rules}


def test_dockerfile_installs_through_the_makefile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    run_lines = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M))
    assert "make install" in run_lines
    assert "pip install" not in run_lines, "the Dockerfile must not keep its own dependency list"
    assert re.search(r"^USER (?!root)", text, re.M)
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:\d+\.\d+\.\d+-", text, re.M), "pin the CUDA base image"
    cpu_stage = text[text.index("AS base-cpu") : text.index("AS base\n")]
    assert "VARIANT_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu_stage, "the CPU image installs torch's CPU build"
    assert 'TORCH_INDEX="${TORCH_INDEX:-$VARIANT_TORCH_INDEX}"' in run_lines
    make = (ROOT / "Makefile").read_text()
    for var in ("TORCH_SPEC", "TORCH_INDEX", "ORT_EXTRA", "EXTRAS", "VENV", "PYTHON"):
        assert re.search(rf"^{var} \?=", make, re.M), f"Makefile must let the Dockerfile set {var}"


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form), with ``flowserve`` as this checkout runs it."""
    line = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", (ROOT / "Dockerfile").read_text().replace("\\\n", " "), re.M)
    assert line, "the Dockerfile has a HEALTHCHECK in exec form"
    cmd = json.loads(line.group(1))
    assert cmd[0] == "flowserve"
    return [sys.executable, "-m", "service.cli", *cmd[1:]]


def test_healthcheck_follows_flowserve_port(server) -> None:  # noqa: ANN001
    """The image's HEALTHCHECK passes against a server on the port FLOWSERVE_PORT names, and fails on any other."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
    ok = subprocess.run(healthcheck_command(), env={**env, "FLOWSERVE_PORT": str(server.port)}, capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"127.0.0.1:{server.port}/v2/health/live: 200" in ok.stdout
    from tests.server import free_port

    down = subprocess.run(healthcheck_command(), env={**env, "FLOWSERVE_PORT": str(free_port())}, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert down.returncode == 1
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert all("healthcheck" not in svc for svc in compose["services"].values() if str(svc.get("image", "")).startswith("flowserve")), \
        "compose services use the image's HEALTHCHECK, so both mean the same"


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = compose["services"]["flowserve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert compose["services"]["flowserve-cpu"]["profiles"] == ["cpu"]
    for svc in ("prometheus", "grafana"):
        for vol in compose["services"][svc]["volumes"]:
            assert (ROOT / vol.split(":")[0]).exists(), vol
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert set(prom["rule_files"]) <= mounted, "every rule file Prometheus loads is mounted into it"
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here; structure is checked by test_compose_file")
    r = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


TRAINING = ROOT / "deploy" / "training"


@pytest.mark.parametrize("path", [TRAINING / "job.yaml", TRAINING / "pvc.yaml"], ids=lambda p: p.name)
def test_training_manifests_validate(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _train_args(command: list[str]) -> list[str]:
    """What follows ``torchrun [options] -m models.cli``: the one-machine ``flowserve train`` arguments."""
    assert command[0] == "torchrun" and "-m" in command
    at = command.index("-m")
    assert command[at + 1] == "models.cli" and command[at + 2] == "train"
    return command[at + 2 :]


def test_trainjob_and_indexed_job_run_the_same_training() -> None:
    """The Kubeflow TrainJob (a CRD: the fields we rely on) and the plain indexed Job run the same command on the
    same volume; the Job's rendezvous endpoint is its pod 0 behind its headless Service."""
    tj = docs(TRAINING / "trainjob.yaml")[0]
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = tj["spec"]["trainer"]
    assert trainer["numNodes"] >= 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    [override] = tj["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    claim = {v["name"]: v for v in override["spec"]["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
    assert {"name": "data", "mountPath": "/data"} in override["spec"]["containers"][0]["volumeMounts"]

    service, job = docs(TRAINING / "job.yaml")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == trainer["numNodes"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    command = pod["containers"][0]["command"]
    endpoint = next(a for a in command if a.startswith("--rdzv-endpoint=")).split("=", 1)[1]
    host, port = endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert "--max-restarts=3" in command and "--max-restarts=3" in trainer["command"]
    assert _train_args(command) == _train_args(trainer["command"])  # the same training
    assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == claim
    assert docs(TRAINING / "pvc.yaml")[0]["metadata"]["name"] == claim
    assert docs(TRAINING / "pvc.yaml")[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    train_args = _train_args(command)
    assert (ROOT / train_args[1]).is_file()  # a config the image ships in its working directory (/app/configs)
