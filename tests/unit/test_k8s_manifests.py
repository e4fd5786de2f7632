"""k8s/: every kustomization renders, passes the strict Kubernetes schemas, and passes the checks
schemas cannot express (scripts.k8s_manifests), which are themselves shown to catch broken manifests.

Rendering needs kubectl; if none is installed, the module installs it (tests/unit/kubectl_setup.py).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from truss.templates.shared.secrets_resolver import SecretsResolver

from scripts import REPO_ROOT, TRUSS_DIR
from scripts import k8s_manifests as k8s
from scripts.engine_spec import load_spec
from tests.unit.kubectl_setup import ensure_kubectl

IMAGE = "us-docker.pkg.dev/my-project/llm/llm-trtllm-server:v1"
KUSTOMIZATIONS = k8s.kustomizations()
OVERLAYS = [path for path in KUSTOMIZATIONS if path.parent == k8s.OVERLAYS_DIR]
HPA_COMPONENT = k8s.K8S_DIR / "components" / "hpa"
SEED_OVERLAYS = {"gke-a100", "gke-h100", "generic-gfd"}
Objects = list[k8s.Manifest]


@pytest.fixture(scope="module", autouse=True)
def kubectl() -> str:
    return ensure_kubectl()


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    return {path.name: k8s.render(path) for path in KUSTOMIZATIONS}


def server(objects: Objects) -> k8s.Manifest:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == k8s.SERVER_NAME]
    return deployment


def pod(objects: Objects) -> k8s.Manifest:
    return server(objects)["spec"]["template"]["spec"]


def container(objects: Objects) -> k8s.Manifest:
    (found,) = k8s.server_containers(objects)
    return found


def env_configmap(objects: Objects) -> k8s.Manifest:
    (found,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(k8s.ENV_CONFIGMAP)]
    return found


def layered(tmp_path: Path, overlay: Path, **extra: object) -> Path:
    """A kustomization in tmp_path on top of `overlay` (kustomize wants relative paths)."""
    layer = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    layer |= {"resources": [os.path.relpath(overlay, tmp_path)], **extra}
    (tmp_path / k8s.KUSTOMIZATION).write_text(yaml.safe_dump(layer))
    return tmp_path


def test_the_issue_s_layout_is_there() -> None:
    assert {path.name for path in OVERLAYS} >= SEED_OVERLAYS
    assert (k8s.K8S_DIR / "base" / k8s.KUSTOMIZATION).is_file()
    if k8s.ENGINE_BUILD_DIR.is_dir():  # another team's Job: validated here like the overlays
        assert any(path.is_relative_to(k8s.ENGINE_BUILD_DIR) for path in KUSTOMIZATIONS)


# -- every kustomization under k8s/overlays and k8s/engine-build --------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_passes_the_strict_kubernetes_schemas(path: Path, rendered: dict[str, Objects]) -> None:
    objects = rendered[path.name]
    assert objects
    assert k8s.schema_problems(objects) == []


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_passes_the_checks_schemas_cannot_make(path: Path, rendered: dict[str, Objects]) -> None:
    assert k8s.check_manifests(rendered[path.name]) == []


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overlay_with_the_hpa_component_validates(path: Path, tmp_path: Path) -> None:
    objects = k8s.render(layered(tmp_path, path, components=[os.path.relpath(HPA_COMPONENT, tmp_path)]))
    (hpa,) = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s.SERVER_NAME
    assert "replicas" not in server(objects)["spec"]  # the HPA owns the count; an apply must not reset it
    assert k8s.schema_problems(objects) == []
    assert k8s.check_manifests(objects) == []


# -- the overlays ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overlay_sets_image_and_engine_in_its_kustomization_only(path: Path, rendered: dict[str, Objects]) -> None:
    files = sorted(p.name for p in path.iterdir())
    assert files == [k8s.KUSTOMIZATION]
    kustomization = yaml.safe_load((path / k8s.KUSTOMIZATION).read_text())
    (image,) = kustomization["images"]
    assert image["name"] == k8s.BASE_IMAGE_PLACEHOLDER
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == k8s.ENV_CONFIGMAP and generator["behavior"] == "merge"
    assert any(literal.startswith("LLM_MODEL_REPO=") for literal in generator["literals"])
    objects = rendered[path.name]
    assert container(objects)["image"] == f"{image['newName']}:{image['newTag']}"
    assert env_configmap(objects)["data"]["LLM_BACKEND"] == "tensorrt_llm"


def test_base_image_placeholder_is_what_the_overlays_replace() -> None:
    objects = k8s.render(k8s.K8S_DIR / "base")
    assert container(objects)["image"] == k8s.BASE_IMAGE_PLACEHOLDER
    assert any("base placeholder" in problem for problem in k8s.check_manifests(objects))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overrides_fill_the_placeholders_and_rehash_the_configmap(path: Path, rendered: dict[str, Objects]) -> None:
    assert k8s.placeholders(rendered[path.name])  # the image is left for the user to set
    objects = k8s.render(path, image=IMAGE, env={"LLM_MODEL_REPO": "me/my-engines", "LLM_REVISION": "v2"})
    assert k8s.placeholders(objects) == []
    assert container(objects)["image"] == IMAGE
    configmap = env_configmap(objects)
    assert configmap["data"]["LLM_MODEL_REPO"] == "me/my-engines" and configmap["data"]["LLM_REVISION"] == "v2"
    assert configmap["metadata"]["name"] != env_configmap(rendered[path.name])["metadata"]["name"]
    (ref,) = [s["configMapRef"]["name"] for s in container(objects)["envFrom"]]
    assert ref == configmap["metadata"]["name"]  # the pods see the new values: a new name rolls them
    assert k8s.check_manifests(objects) == []


def test_gke_overlays_select_gke_accelerators_and_generic_selects_gfd_labels(rendered: dict[str, Objects]) -> None:
    assert pod(rendered["gke-a100"])["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert pod(rendered["gke-h100"])["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    generic = pod(rendered["generic-gfd"])["nodeSelector"]
    assert generic["nvidia.com/gpu.present"] == "true" and generic["nvidia.com/gpu.product"].startswith("NVIDIA-")
    for name in SEED_OVERLAYS:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(rendered[name])[
            "tolerations"
        ]


def test_overlays_point_at_engines_built_for_their_gpu(rendered: dict[str, Objects]) -> None:
    """Where an overlay's engine has a spec in engines/, the spec's GPU, count and version are the overlay's."""
    specs = {(s.publish.repo, s.engine_subfolder): s for s in map(load_spec, (REPO_ROOT / "engines").glob("*.yaml"))}
    base_version = yaml.safe_load((TRUSS_DIR / "config.yaml").read_text())["base_image"]["image"].rsplit(":", 1)[1]
    matched = []
    for path in OVERLAYS:
        objects = rendered[path.name]
        data = env_configmap(objects)["data"]
        spec = specs.get((data["LLM_MODEL_REPO"], data.get("LLM_SUBFOLDER")))
        if spec is None:
            continue
        matched.append(path.name)
        selector = pod(objects)["nodeSelector"]
        gpu = spec.gpu.gpu
        if "cloud.google.com/gke-accelerator" in selector:
            assert selector["cloud.google.com/gke-accelerator"] == gpu.gke_accelerator, path.name
        else:
            assert selector["nvidia.com/gpu.product"] == gpu.product.replace(" ", "-"), path.name
        assert container(objects)["resources"]["limits"]["nvidia.com/gpu"] == spec.gpu.count, path.name
        assert spec.tensorrt_llm_version == base_version, path.name
    assert "gke-a100" in matched and "generic-gfd" in matched


# -- what the server needs -------------------------------------------------------------------------------


def test_probes_hit_routes_of_truss_s_own_server(rendered: dict[str, Objects]) -> None:
    routes = k8s.server_routes()
    assert any(route.match("/v1/models/model:predict") for route in routes)
    assert not any(route.match("/healthz") for route in routes)
    probes = {
        kind: container(rendered["gke-a100"])[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {
        "startupProbe": {"path": "/v1/models/model", "port": "http"},
        "readinessProbe": {"path": "/v1/models/model", "port": "http"},
        "livenessProbe": {"path": "/", "port": "http"},
    }


def test_truss_reads_the_token_from_the_mounted_secret(
    rendered: dict[str, Objects], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lay the Secret volume out as the kubelet would, then ask truss's own SecretsResolver for the token."""
    config = yaml.safe_load((TRUSS_DIR / "config.yaml").read_text())
    assert config["model_metadata"]["hf_token_secret"] == k8s.HF_SECRET_KEY and k8s.HF_SECRET_KEY in config["secrets"]
    spec = pod(rendered["gke-a100"])
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == k8s.HF_SECRET_NAME]
    (mount,) = [m for m in container(rendered["gke-a100"])["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == SecretsResolver.SECRETS_MOUNT_DIR and mount["readOnly"]
    assert k8s.truss_secret_path(server(rendered["gke-a100"])) == "/secrets/hf_access_token"
    for item in volume["secret"]["items"]:  # the kubelet writes one file per item, named by its path
        (tmp_path / item["path"]).write_text({k8s.HF_SECRET_KEY: "hf_from_the_secret"}[item["key"]])
    monkeypatch.setattr(SecretsResolver, "SECRETS_MOUNT_DIR", str(tmp_path))
    assert SecretsResolver.get_secrets(config)[k8s.HF_SECRET_KEY] == "hf_from_the_secret"
    assert not [e for e in container(rendered["gke-a100"]).get("env", []) if "TOKEN" in e["name"]]  # never inline


def test_the_docs_create_the_secret_the_manifests_mount() -> None:
    docs = (REPO_ROOT / "README.md").read_text()
    created = set(re.findall(r"create secret generic (\S+) --from-literal=(\w+)=", docs))
    assert created == {(k8s.HF_SECRET_NAME, k8s.HF_SECRET_KEY)}


def test_one_service_on_8080_as_in_the_seed(rendered: dict[str, Objects]) -> None:
    (service,) = [o for o in rendered["gke-a100"] if o["kind"] == "Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    assert {"name": "INFERENCE_SERVER_PORT", "value": "8080"} in container(rendered["gke-a100"])["env"]


# -- the checks catch what they claim to -----------------------------------------------------------------


def _set(*path: str | int, value: object) -> Callable[[Objects], None]:
    """A mutation that sets `value` at `path` inside the server Deployment."""

    def mutate(objects: Objects) -> None:
        node = server(objects)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _service_selector(objects: Objects) -> None:
    next(o for o in objects if o["kind"] == "Service")["spec"]["selector"] = {"app.kubernetes.io/name": "other"}


POD = ("spec", "template", "spec")
C = (*POD, "containers", 0)
BROKEN = {
    "service selects nothing": (_service_selector, "Service/llm-server: selector"),
    "gpu limit != request": (_set(*C, "resources", "limits", "nvidia.com/gpu", value=2), "request 1 != limit 2"),
    "readiness on a made-up path": (_set(*C, "readinessProbe", "httpGet", "path", value="/healthz"), "must GET"),
    "probe on a missing port": (_set(*C, "livenessProbe", "httpGet", "port", value="metrics"), "not a container port"),
    "startup window too short": (_set(*C, "startupProbe", "failureThreshold", value=3), "startupProbe must allow"),
    "server port moved": (_set(*C, "env", 0, "value", value="9000"), "INFERENCE_SERVER_PORT"),
    "image placeholder kept": (_set(*C, "image", value="llm-server"), "base placeholder"),
    "image floating on latest": (_set(*C, "image", value="us-docker.pkg.dev/p/llm/x:latest"), "no fixed tag"),
    "secret key renamed": (_set(*POD, "volumes", 0, "secret", "items", 0, "key", value="token"), "HF token read as"),
    "token mounted elsewhere": (_set(*C, "volumeMounts", 0, "mountPath", value="/etc/hf"), "not mounted as /secrets"),
    "shm on disk": (_set(*POD, "volumes", 2, "emptyDir", value={}), "/dev/shm"),
    "no gpu node selector": (_set(*POD, "nodeSelector", value={}), "nodeSelector names no GPU"),
    "no gpu toleration": (_set(*POD, "tolerations", value=[]), "taint"),
    "short grace period": (_set(*POD, "terminationGracePeriodSeconds", value=5), "cuts running streams"),
    "selector off template": (
        _set("spec", "selector", "matchLabels", value={"app": "x"}),
        "Deployment/llm-server: sel",
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), BROKEN.values(), ids=BROKEN.keys())
def test_checks_catch_a_broken_manifest(
    rendered: dict[str, Objects], mutate: Callable[[Objects], None], expected: str
) -> None:
    objects = copy.deepcopy(rendered["gke-a100"])
    assert pod(objects)["volumes"][0]["name"] == "hf-token" and pod(objects)["volumes"][2]["name"] == "dshm"
    mutate(objects)
    problems = k8s.check_manifests(objects)
    assert any(expected in problem for problem in problems), problems


def test_schema_validation_is_strict(rendered: dict[str, Objects]) -> None:
    objects = copy.deepcopy(rendered["gke-a100"])
    container(objects)["resource"] = {"limits": {"nvidia.com/gpu": 1}}  # a typo a lenient apply would drop
    problems = k8s.schema_problems(objects)
    assert problems and all("resource" in p for p in problems)
    assert {p.split("(Kubernetes ")[1].split(")")[0] for p in problems} == set(k8s.K8S_VERSIONS)
