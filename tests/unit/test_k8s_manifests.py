"""k8s/: every kustomization and component renders, passes the strict schemas (Kubernetes 1.30 and
1.37, and scripts.crd_schemas for custom resources), and passes the checks schemas cannot express
(scripts.k8s_checks), which are themselves shown to catch broken manifests.

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
from kubernetes.utils import parse_quantity
from truss.templates.shared.secrets_resolver import SecretsResolver

from scripts import REPO_ROOT, TRUSS_DIR
from scripts import k8s_manifests as k8s
from scripts.engine_spec import load_spec
from scripts.k8s_checks import build_gib, check_manifests, engine_gib
from tests.unit.kubectl_setup import ensure_kubectl

IMAGE = "us-docker.pkg.dev/my-project/llm/llm-trtllm-server:v1"
KUSTOMIZATIONS = k8s.kustomizations()
OVERLAYS = [path for path in KUSTOMIZATIONS if path.parent == k8s.OVERLAYS_DIR]
COMPONENTS = sorted(path.name for path in k8s.COMPONENTS_DIR.iterdir())
GKE_OVERLAYS = [path for path in OVERLAYS if path.name.startswith("gke-")]
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


def layered(tmp_path: Path, overlay: Path, *components: str) -> Path:
    """A kustomization in tmp_path: `overlay` plus k8s/components/<name>s (kustomize wants relative paths)."""
    layer = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    layer |= {
        "resources": [os.path.relpath(overlay, tmp_path)],
        "components": [os.path.relpath(k8s.COMPONENTS_DIR / name, tmp_path) for name in components],
    }
    (tmp_path / k8s.KUSTOMIZATION).write_text(yaml.safe_dump(layer))
    return tmp_path


def volume(objects: Objects, name: str) -> k8s.Manifest:
    (found,) = [v for v in pod(objects)["volumes"] if v["name"] == name]
    return found


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
    assert check_manifests(rendered[path.name]) == []


COMBINATIONS = [(path, c) for path in GKE_OVERLAYS for c in COMPONENTS if c != "pod-monitoring"]  # theirs already
COMBINATIONS += [
    (k8s.OVERLAYS_DIR / "generic-gfd", c) for c in ("pod-monitoring", "service-monitor", "require-api-key")
]


@pytest.mark.parametrize(("path", "component"), COMBINATIONS, ids=lambda v: getattr(v, "name", v))
def test_every_component_validates_and_checks_out(path: Path, component: str, tmp_path: Path) -> None:
    objects = k8s.render(layered(tmp_path, path, component), image=IMAGE)
    assert k8s.schema_problems(objects) == []
    assert check_manifests(objects) == []
    unset = k8s.placeholders(objects)
    assert unset == ([] if component != "keda" else unset) and all("ScaledObject" in u for u in unset)


def test_components_do_what_they_say(tmp_path: Path) -> None:
    def with_(*components: str) -> Objects:
        target = tmp_path / str(len(list(tmp_path.iterdir())))
        target.mkdir()
        return k8s.render(layered(target, k8s.OVERLAYS_DIR / "gke-a100", *components), image=IMAGE)

    (hpa,) = [o for o in with_("hpa") if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "prometheus.googleapis.com|llm_requests_waiting|gauge"
    assert "replicas" not in server(with_("hpa"))["spec"]  # the HPA owns the count; an apply must not reset it
    keda = with_("keda")
    (scaled,) = [o for o in keda if o["kind"] == "ScaledObject"]
    assert "llm_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in server(keda)["spec"]
    pvc = with_("model-cache-pvc")
    assert volume(pvc, "engine-cache") == {
        "name": "engine-cache",
        "persistentVolumeClaim": {"claimName": "llm-model-cache"},
    }
    assert container(pvc)["resources"]["requests"]["ephemeral-storage"] == "6Gi"
    ssd = with_("local-ssd")
    assert pod(ssd)["nodeSelector"]["cloud.google.com/gke-ephemeral-storage-local-ssd"] == "true"
    assert pod(with_("image-pull-secret"))["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert ("registry-credentials", None) in k8s.secret_refs(with_("image-pull-secret"))  # deploy checks it exists
    priority = with_("priority-class")
    assert pod(priority)["priorityClassName"] == "llm-server"
    assert any(o["kind"] == "PriorityClass" and o["metadata"]["name"] == "llm-server" for o in priority)
    assert (k8s.API_KEY_SECRET_NAME, k8s.API_KEY_SECRET_KEY) not in k8s.secret_refs(rendered_overlay("gke-a100"))
    assert (k8s.API_KEY_SECRET_NAME, k8s.API_KEY_SECRET_KEY) in k8s.secret_refs(with_("require-api-key"))
    (monitor,) = [o for o in with_("service-monitor") if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]


def rendered_overlay(name: str) -> Objects:
    return k8s.render(k8s.OVERLAYS_DIR / name, image=IMAGE)


def test_gmp_autoscaling_without_a_pod_monitoring_is_caught(tmp_path: Path) -> None:
    """generic-gfd has no PodMonitoring: the HPA's prometheus.googleapis.com metric would never exist."""
    objects = k8s.render(layered(tmp_path, k8s.OVERLAYS_DIR / "generic-gfd", "hpa"), image=IMAGE)
    assert any("no PodMonitoring scrapes" in problem for problem in check_manifests(objects))


def test_components_that_exclude_each_other_are_caught(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    both_caches = k8s.render(layered(tmp_path / "a", k8s.OVERLAYS_DIR / "gke-a100", "model-cache-pvc", "local-ssd"))
    assert any("volume engine-cache has 2 sources" in p for p in check_manifests(both_caches))
    both_scalers = k8s.render(layered(tmp_path / "b", k8s.OVERLAYS_DIR / "gke-a100", "hpa"))
    both_scalers += yaml.safe_load_all((k8s.COMPONENTS_DIR / "keda" / "scaledobject.yaml").read_text())
    assert any(
        "is scaled by HorizontalPodAutoscaler/llm-server and ScaledObject/llm-server" in p
        for p in check_manifests(both_scalers)
    )


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
    assert any("base placeholder" in problem for problem in check_manifests(objects))


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
    assert check_manifests(objects) == []


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


def test_probes_hit_the_readiness_route_of_truss_s_own_server(rendered: dict[str, Objects]) -> None:
    """Liveness too: /v1/models/model answers 503 when the engine thread is dead or wedged; / always 200."""
    routes = k8s.server_routes()
    assert any(route.match("/v1/models/model:predict") for route in routes)
    assert not any(route.match("/healthz") for route in routes)
    probes = {
        kind: container(rendered["gke-a100"])[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert {kind: probe["httpGet"] for kind, probe in probes.items()} == {
        kind: {"path": "/v1/models/model", "port": "http"} for kind in probes
    }
    window = {kind: probe["periodSeconds"] * probe["failureThreshold"] for kind, probe in probes.items()}
    assert window["readinessProbe"] < window["livenessProbe"] <= 300  # out of the Service first, restarted later


def test_truss_reads_both_secrets_from_the_projected_volume(
    rendered: dict[str, Objects], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lay the volume out as the kubelet would, then ask truss's own SecretsResolver for the secrets."""
    config = yaml.safe_load((TRUSS_DIR / "config.yaml").read_text())
    assert config["model_metadata"]["hf_token_secret"] == k8s.HF_SECRET_KEY and k8s.HF_SECRET_KEY in config["secrets"]
    secrets = volume(rendered["gke-a100"], "secrets")
    (mount,) = [m for m in container(rendered["gke-a100"])["volumeMounts"] if m["name"] == "secrets"]
    assert mount["mountPath"] == SecretsResolver.SECRETS_MOUNT_DIR and mount["readOnly"]
    files = k8s.secret_files(server(rendered["gke-a100"]), k8s.SERVER_CONTAINER)
    assert files == {
        "/secrets/hf_access_token": (k8s.HF_SECRET_NAME, k8s.HF_SECRET_KEY, False),
        "/secrets/llm_api_key": (
            k8s.API_KEY_SECRET_NAME,
            k8s.API_KEY_SECRET_KEY,
            True,
        ),  # optional: auth off without it
    }
    values = {k8s.HF_SECRET_KEY: "hf_from_the_secret", k8s.API_KEY_SECRET_KEY: "key_from_the_secret"}
    for source in secrets["projected"]["sources"]:  # the kubelet writes one file per item, named by its path
        for item in source["secret"]["items"]:
            (tmp_path / item["path"]).write_text(values[item["key"]])
    monkeypatch.setattr(SecretsResolver, "SECRETS_MOUNT_DIR", str(tmp_path))
    resolved = SecretsResolver.get_secrets({**config, "secrets": {**config["secrets"], k8s.API_KEY_SECRET_KEY: None}})
    assert (
        resolved[k8s.HF_SECRET_KEY] == "hf_from_the_secret"
        and resolved[k8s.API_KEY_SECRET_KEY] == "key_from_the_secret"
    )
    assert not [e for e in container(rendered["gke-a100"]).get("env", []) if "TOKEN" in e["name"]]  # never inline


def test_the_docs_create_the_secrets_the_manifests_mount() -> None:
    docs = (REPO_ROOT / "docs" / "deployment.md").read_text()
    created = set(re.findall(r"create secret generic (\S+) --from-literal=(\w+)=", docs))
    assert created == {(k8s.HF_SECRET_NAME, k8s.HF_SECRET_KEY), (k8s.API_KEY_SECRET_NAME, k8s.API_KEY_SECRET_KEY)}


def test_one_service_on_8080_as_in_the_seed(rendered: dict[str, Objects]) -> None:
    (service,) = [o for o in rendered["gke-a100"] if o["kind"] == "Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    assert {"name": "INFERENCE_SERVER_PORT", "value": "8080"} in container(rendered["gke-a100"])["env"]


def test_pods_run_as_the_user_truss_creates_and_write_only_where_truss_does() -> None:
    """uid 60000 is truss's `app` user; truss's data_dir is ./data under APP_HOME /app: both from truss's sources."""
    import truss
    from truss.base.constants import DEFAULT_NON_ROOT_USER_ID

    from scripts.k8s_checks import TRUSS_DATA_DIR

    templates = Path(truss.__file__).parent / "templates"
    assert 'set app_username = "app"' in (templates / "base.Dockerfile.jinja").read_text()
    assert "ENV APP_HOME=/{{ app_username }}" in (templates / "base.Dockerfile.jinja").read_text()
    assert 'data_dir = Path("data")' in (templates / "server" / "model_wrapper.py").read_text()
    assert TRUSS_DATA_DIR == "/app/data"
    for path in KUSTOMIZATIONS:
        objects = k8s.render(path)
        for obj in (o for o in objects if k8s.pod_spec(o) is not None):
            assert k8s.pod_spec(obj)["securityContext"]["runAsUser"] == DEFAULT_NON_ROOT_USER_ID, path.name


GKE_200GB_ALLOCATABLE_GIB = 90  # about half a 200 GB boot disk: GKE's node-sizing guide shows 47 of 101 GB


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_several_pods_share_a_node_s_boot_disk(path: Path, rendered: dict[str, Objects]) -> None:
    """One pod per GPU of an a2-highgpu-4g (200 GB boot disk): four single-GPU pods fit its ephemeral storage."""
    requested = parse_quantity(container(rendered[path.name])["resources"]["requests"]["ephemeral-storage"])
    gpus = container(rendered[path.name])["resources"]["limits"]["nvidia.com/gpu"]
    pods_per_node = 4 // gpus
    assert pods_per_node * requested <= GKE_200GB_ALLOCATABLE_GIB * 2**30


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_the_engine_cache_holds_the_overlay_s_engine(path: Path, rendered: dict[str, Objects]) -> None:
    specs = {(s.publish.repo, s.engine_subfolder): s for s in map(load_spec, (REPO_ROOT / "engines").glob("*.yaml"))}
    data = env_configmap(rendered[path.name])["data"]
    spec = specs[data["LLM_MODEL_REPO"], data["LLM_SUBFOLDER"]]
    size = parse_quantity(volume(rendered[path.name], "engine-cache")["emptyDir"]["sizeLimit"])
    assert engine_gib(spec) * 2**30 <= size < 2 * engine_gib(spec) * 2**30 + 4 * 2**30  # fits, without waste


def test_the_engine_build_job_reads_its_token_from_a_file_and_requests_its_disk(rendered: dict[str, Objects]) -> None:
    objects = rendered["engine-build"]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (build,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in build["env"]}
    assert not any("valueFrom" in e for e in env.values())  # the token is in no environment variable
    assert env["HF_TOKEN_PATH"]["value"] == "/secrets/hf_access_token"  # huggingface_hub reads the file
    assert k8s.secret_files(job, "build") == {
        "/secrets/hf_access_token": (k8s.HF_SECRET_NAME, k8s.HF_SECRET_KEY, False)
    }
    spec = load_spec(
        REPO_ROOT / "engines" / f"{env_configmap_named(objects, 'llm-engine-build-env')['ENGINE_SPEC']}.yaml"
    )
    (disk,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "build"]
    assert build_gib(spec) * 2**30 <= parse_quantity(disk["emptyDir"]["sizeLimit"])
    assert parse_quantity(build["resources"]["requests"]["ephemeral-storage"]) >= parse_quantity(
        disk["emptyDir"]["sizeLimit"]
    )


def env_configmap_named(objects: Objects, prefix: str) -> dict[str, str]:
    (found,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)]
    return found["data"]


def test_standard_labels_are_on_objects_and_pod_templates(rendered: dict[str, Objects]) -> None:
    labels = server(rendered["gke-a100"])["spec"]["template"]["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "llm-server",
        "app.kubernetes.io/instance": "llm-server",
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/part-of": "llm-trtllm-server",
    }
    assert server(rendered["gke-a100"])["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "llm-server"}


# -- the checks catch what they claim to -----------------------------------------------------------------


def _set(*path: str | int, value: object) -> Callable[[Objects], None]:
    """A mutation that sets `value` at `path` inside the server Deployment (str keys, int list indexes,
    or `volume:<name>` / `env:<name>` for the list item of that name)."""

    def mutate(objects: Objects) -> None:
        node: object = server(objects)
        for key in path[:-1]:
            node = _step(node, key)
        last = path[-1]
        if isinstance(last, str) and ":" in last:
            kind, name = last.split(":")
            items = node[{"volume": "volumes", "env": "env", "mount": "volumeMounts"}[kind]]
            index = next(i for i, item in enumerate(items) if item["name"] == name)
            items[index] = value
        else:
            node[last] = value

    return mutate


def _step(node: object, key: str | int) -> object:
    if isinstance(key, str) and ":" in key:
        kind, name = key.split(":")
        items = node[{"volume": "volumes", "env": "env", "mount": "volumeMounts"}[kind]]
        return next(item for item in items if item["name"] == name)
    return node[key]


def _service_selector(objects: Objects) -> None:
    next(o for o in objects if o["kind"] == "Service")["spec"]["selector"] = {"app.kubernetes.io/name": "other"}


def _of_kind(kind: str, mutate: Callable[[k8s.Manifest], None]) -> Callable[[Objects], None]:
    return lambda objects: mutate(next(o for o in objects if o["kind"] == kind))


def _drain(objects: Objects) -> None:
    env_configmap(objects)["data"]["LLM_DRAIN_TIMEOUT_S"] = "295"


POD = ("spec", "template", "spec")
C = (*POD, "containers", 0)
BROKEN = {
    "service selects nothing": (_service_selector, "Service/llm-server: selector"),
    "gpu limit != request": (_set(*C, "resources", "limits", "nvidia.com/gpu", value=2), "request 1 != limit 2"),
    "readiness on a made-up path": (_set(*C, "readinessProbe", "httpGet", "path", value="/healthz"), "must GET"),
    "liveness that cannot see a wedged engine": (
        _set(*C, "livenessProbe", "httpGet", "path", value="/"),
        "livenessProbe must GET",
    ),
    "liveness faster than readiness": (_set(*C, "livenessProbe", "failureThreshold", value=1), "must wait longer"),
    "probe on a missing port": (_set(*C, "livenessProbe", "httpGet", "port", value="metrics"), "not a container port"),
    "startup window too short": (_set(*C, "startupProbe", "failureThreshold", value=3), "startupProbe must allow"),
    "server port moved": (
        _set(*C, "env:INFERENCE_SERVER_PORT", value={"name": "INFERENCE_SERVER_PORT", "value": "9000"}),
        "INFERENCE_SERVER_PORT",
    ),
    "image placeholder kept": (_set(*C, "image", value="llm-server"), "base placeholder"),
    "image floating on latest": (_set(*C, "image", value="us-docker.pkg.dev/p/llm/x:latest"), "no fixed tag"),
    "secret key renamed": (
        _set(*POD, "volume:secrets", "projected", "sources", 0, "secret", "items", 0, "key", value="token"),
        "HF token read as",
    ),
    "secrets mounted elsewhere": (
        _set(*C, "mount:secrets", "mountPath", value="/etc/hf"),
        "is not mounted as /secrets/hf_access_token",
    ),
    "api key not mounted": (
        _set(*POD, "volume:secrets", "projected", "sources", 1, "secret", "name", value="other"),
        "Secret llm-api-key key llm_api_key is not mounted",
    ),
    "shm on disk": (_set(*POD, "volume:dshm", value={"name": "dshm", "emptyDir": {"sizeLimit": "8Gi"}}), "/dev/shm"),
    "no gpu node selector": (_set(*POD, "nodeSelector", value={}), "nodeSelector names no GPU"),
    "no gpu toleration": (_set(*POD, "tolerations", value=[]), "taint"),
    "grace period within the drain": (_drain, "must exceed the preStop sleep (10) plus LLM_DRAIN_TIMEOUT_S (295)"),
    "selector off template": (
        _set("spec", "selector", "matchLabels", value={"app": "x"}),
        "Deployment/llm-server: sel",
    ),
    "runs as root": (_set(*POD, "securityContext", "runAsUser", value=0), "non-zero runAsUser"),
    "writable root filesystem": (
        _set(*C, "securityContext", "readOnlyRootFilesystem", value=False),
        "readOnlyRootFilesystem",
    ),
    "capabilities kept": (_set(*C, "securityContext", "capabilities", value={}), "capabilities.drop: [ALL]"),
    "HOME on the read-only root": (
        _set(*C, "env:HOME", value={"name": "HOME", "value": "/root"}),
        "HOME (/root) is not on a writable volume",
    ),
    "truss data_dir not mounted": (
        _set(*C, "mount:truss-data", "mountPath", value="/data"),
        "truss data_dir (/app/data) is not on a writable volume",
    ),
    "unbounded emptyDir": (
        _set(*POD, "volume:tmp", value={"name": "tmp", "emptyDir": {}}),
        "emptyDir tmp has no sizeLimit",
    ),
    "storage requested below the emptyDirs": (
        _set(*C, "resources", "requests", "ephemeral-storage", value="10Gi"),
        "request 22Gi so the scheduler",
    ),
    "engine cache too small for the spec": (
        _set(*POD, "volume:engine-cache", value={"name": "engine-cache", "emptyDir": {"sizeLimit": "8Gi"}}),
        "emptyDir engine-cache (8Gi) is smaller than the 15Gi the spec mistral-7b-instruct-v0.2-fp16-a100 needs",
    ),
    "template without standard labels": (
        _set(*POD[:-1], "metadata", "labels", value={"app.kubernetes.io/name": "llm-server"}),
        "pod template: no app.kubernetes.io/instance",
    ),
    "network policy shuts the port": (
        _of_kind("NetworkPolicy", lambda o: o["spec"]["ingress"][0].update(ports=[{"port": 9999}])),
        "allows no ingress to port 8080",
    ),
    "pod monitoring on a missing port": (
        _of_kind("PodMonitoring", lambda o: o["spec"]["endpoints"][0].update(port="metrics")),
        "endpoint port 'metrics' is not a container port",
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), BROKEN.values(), ids=BROKEN.keys())
def test_checks_catch_a_broken_manifest(
    rendered: dict[str, Objects], mutate: Callable[[Objects], None], expected: str
) -> None:
    objects = copy.deepcopy(rendered["gke-a100"])
    assert check_manifests(objects) == []
    mutate(objects)
    problems = check_manifests(objects)
    assert any(expected in problem for problem in problems), problems


def test_schema_validation_is_strict(rendered: dict[str, Objects]) -> None:
    objects = copy.deepcopy(rendered["gke-a100"])
    container(objects)["resource"] = {"limits": {"nvidia.com/gpu": 1}}  # a typo a lenient apply would drop
    problems = k8s.schema_problems(objects)
    assert problems and all("resource" in p for p in problems)
    assert {p.split("(Kubernetes ")[1].split(")")[0] for p in problems} == set(k8s.K8S_VERSIONS)


def test_custom_resources_are_validated_strictly_too(rendered: dict[str, Objects]) -> None:
    objects = copy.deepcopy(rendered["gke-a100"])
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitoring"]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"  # typo
    monitor["spec"]["endpoints"][0].pop("interval")  # required by the CRD
    problems = k8s.schema_problems(objects)
    assert any("'intervall' was unexpected" in p for p in problems) and any(
        "'interval' is a required" in p for p in problems
    )
