"""What a valid schema still gets wrong in the rendered manifests; each problem names the object and the fix.

    problems = check_manifests(k8s_manifests.render(path))  # [] when everything lines up

The checks take plain dicts, so they apply to every kustomization (overlays with any components,
the engine-build Job). `deploy` runs them before it sends anything; the tests run them on every
overlay and show that each one catches the mistake it is for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from kubernetes.utils import parse_quantity

from model.settings import PORT_VARIABLE
from scripts import REPO_ROOT
from scripts.k8s_manifests import (
    API_KEY_SECRET_KEY,
    API_KEY_SECRET_NAME,
    BASE_IMAGE_PLACEHOLDER,
    ENV_CONFIGMAP,
    HF_SECRET_KEY,
    HF_SECRET_NAME,
    READINESS_PATH,
    SERVER_CONTAINER,
    SERVER_NAME,
    SERVER_PORT,
    Manifest,
    containers,
    pod_spec,
    secret_files,
    secret_refs,
    server_routes,
    truss_secrets_dir,
)

MIN_STARTUP_WINDOW_S = 20 * 60  # engine download + load + warm-up
GPU_NODE_LABELS = ("cloud.google.com/gke-accelerator", "nvidia.com/gpu.product", "nvidia.com/gpu.present")
GPU_RESOURCE = "nvidia.com/gpu"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)
DRAIN_TIMEOUT_ENV = "LLM_DRAIN_TIMEOUT_S"  # the server's SIGTERM drain bound (settings: drain_timeout_s)
# truss's APP_HOME (templates/base.Dockerfile.jinja); its model_wrapper creates data_dir = ./data there.
TRUSS_DATA_DIR = "/app/data"
# The server's run-time writes besides $HOME and $TMPDIR: truss's data_dir and the download caches.
SERVER_WRITE_ENV = ("LLM_CACHE_DIR", "HF_HOME")
ENGINE_CACHE_VOLUME = "engine-cache"
ENGINE_BUILD_CONFIGMAP = "llm-engine-build-env"
ENGINE_BUILD_VOLUME = "build"
GIB = 2**30
ENGINE_MARGIN = 1.10  # engine files beyond the weights (plugins' workspace, tokenizer, config)
BUILD_MARGIN = 1.15
# An HPA metric served by the Custom Metrics Stackdriver Adapter from GKE Managed Prometheus.
GMP_METRIC = re.compile(r"^prometheus\.googleapis\.com\|(?P<metric>[A-Za-z_:][\w:]*)\|(?P<kind>gauge|counter)$")
GMP_QUERY_HOST = "monitoring.googleapis.com"


def check_manifests(objects: list[Manifest]) -> list[str]:
    """Every problem of `objects` that the Kubernetes JSON schemas cannot see."""
    workloads = [obj for obj in objects if pod_spec(obj) is not None]
    problems = []
    for obj in workloads:
        problems += _check_pod(obj, objects) + _check_security(obj) + _check_storage(obj) + _check_labels(obj)
    by_kind = {
        "Deployment": lambda o: (
            _check_selects(o, o["spec"]["selector"].get("matchLabels", {}), [o])
            + (_check_server(o, objects) if o["metadata"]["name"] == SERVER_NAME else [])
        ),
        "Service": lambda o: _check_service(o, workloads),
        "PodDisruptionBudget": lambda o: _check_selects(o, o["spec"]["selector"].get("matchLabels", {}), workloads),
        "NetworkPolicy": lambda o: _check_network_policy(o, workloads),
        "PodMonitoring": lambda o: _check_pod_monitoring(o, workloads),
        "ServiceMonitor": lambda o: _check_service_monitor(o, objects),
    }
    for obj in objects:
        problems += by_kind.get(obj["kind"], lambda _: [])(obj)
    return problems + _check_autoscalers(objects) + _check_secrets(objects) + _check_engine_sizes(objects)


# -- helpers ----------------------------------------------------------------------------------


def _name(obj: Manifest) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _template(obj: Manifest) -> Manifest:
    return obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]


def _template_labels(obj: Manifest) -> dict[str, str]:
    return _template(obj).get("metadata", {}).get("labels", {})


def _ports(container: Manifest) -> dict[str | None, int]:
    return {p.get("name"): p["containerPort"] for p in container.get("ports", [])}


def _resolve_port(port: int | str, ports: Mapping[str | None, int]) -> int | None:
    """A probe's or Service's port (number or name) as a container port number; None if there is none."""
    return ports.get(port) if isinstance(port, str) else port if port in ports.values() else None


def _env(container: Manifest) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gib(quantity: Any) -> float:
    return float(parse_quantity(quantity)) / GIB


def _selects(selector: Mapping[str, str], workload: Manifest) -> bool:
    return bool(selector) and selector.items() <= _template_labels(workload).items()


def _check_selects(obj: Manifest, selector: Mapping[str, str], workloads: list[Manifest]) -> list[str]:
    if any(_selects(selector, w) for w in workloads):
        return []
    return [f"{_name(obj)}: selector {dict(selector)} matches no pod template's labels"]


def _configmap_data(objects: list[Manifest], name: str) -> dict[str, str]:
    """The data of the (generated, hash-suffixed) ConfigMap `name`."""
    for obj in objects:
        if obj["kind"] == "ConfigMap" and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]+)?", obj["metadata"]["name"]):
            return obj.get("data", {})
    return {}


# -- pods ---------------------------------------------------------------------------------------


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


def _check_security(obj: Manifest) -> list[str]:
    """Non-root, no privilege escalation, no capabilities, read-only root; every run-time write on a volume."""
    spec = pod_spec(obj) or {}
    pod_context = spec.get("securityContext", {})
    problems = []
    if not pod_context.get("runAsNonRoot") or not pod_context.get("runAsUser"):
        problems.append(
            f"{_name(obj)}: set securityContext.runAsNonRoot: true and a non-zero runAsUser "
            "(60000, the `app` user truss creates in its images)"
        )
    writable_volumes = {
        v["name"]
        for v in spec.get("volumes", [])
        if "emptyDir" in v or "persistentVolumeClaim" in v or "ephemeral" in v
    }
    for c in containers(spec):
        at = f"{_name(obj)} container {c['name']}"
        context = c.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: set securityContext.allowPrivilegeEscalation: false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: set securityContext.capabilities.drop: [ALL]")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: set securityContext.readOnlyRootFilesystem: true (writes go to emptyDirs)")
        writable = [
            m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in writable_volumes and not m.get("readOnly")
        ]
        env = _env(c)
        needed = {"HOME": env.get("HOME"), "TMPDIR": env.get("TMPDIR") or "/tmp"}
        if c["name"] == SERVER_CONTAINER:
            needed |= {name: env.get(name) for name in SERVER_WRITE_ENV} | {"truss data_dir": TRUSS_DATA_DIR}
        for what, path in needed.items():
            if not path or not any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable):
                problems.append(f"{at}: {what} ({path}) is not on a writable volume; the root filesystem is read-only")
    return problems


def _check_storage(obj: Manifest) -> list[str]:
    """One source per volume; disk emptyDirs bounded, requested as ephemeral storage, so the scheduler counts them."""
    spec = pod_spec(obj) or {}
    problems, disk_gib = [], 0.0
    for volume in spec.get("volumes", []):
        sources = sorted(set(volume) - {"name"})
        if len(sources) != 1:
            problems.append(
                f"{_name(obj)}: volume {volume['name']} has {len(sources)} sources ({', '.join(sources)}); keep one "
                "(components/local-ssd and components/model-cache-pvc exclude each other)"
            )
        empty_dir = volume.get("emptyDir")
        if empty_dir is None or empty_dir.get("medium") == "Memory":
            continue
        if "sizeLimit" not in empty_dir:
            problems.append(f"{_name(obj)}: emptyDir {volume['name']} has no sizeLimit; it could fill the node's disk")
        else:
            disk_gib += _gib(empty_dir["sizeLimit"])
    requested = sum(
        _gib(c.get("resources", {}).get("requests", {}).get("ephemeral-storage", 0)) for c in containers(spec)
    )
    if requested < disk_gib:
        problems.append(
            f"{_name(obj)}: requests {requested:g}Gi of ephemeral-storage but its emptyDirs may hold {disk_gib:g}Gi; "
            f"request {disk_gib:g}Gi so the scheduler only places it where that fits"
        )
    return problems


def _check_labels(obj: Manifest) -> list[str]:
    problems = []
    for where, labels in (("", obj["metadata"].get("labels", {})), (" pod template", _template_labels(obj))):
        missing = [label for label in STANDARD_LABELS if label not in labels]
        if missing:
            problems.append(f"{_name(obj)}{where}: no {', '.join(missing)} label(s)")
    return problems


# -- the server ---------------------------------------------------------------------------------


def _probe_window_s(probe: Manifest) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _check_server(obj: Manifest, objects: list[Manifest]) -> list[str]:
    """The serving Deployment: truss's port, probes on truss's routes, GPU scheduling, /dev/shm, shutdown."""
    where, spec = _name(obj), obj["spec"]["template"]["spec"]
    server = [c for c in spec["containers"] if c["name"] == SERVER_CONTAINER]
    if not server:
        return [f"{where}: no container named {SERVER_CONTAINER}"]
    c, problems = server[0], []
    port_env = _env(c).get(PORT_VARIABLE)
    if port_env != str(SERVER_PORT) or SERVER_PORT not in _ports(c).values():
        problems.append(f"{where}: {PORT_VARIABLE} ({port_env}) and a container port must both be {SERVER_PORT}")
    routes = server_routes()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(kind, {}).get("httpGet", {})
        if get.get("path") != READINESS_PATH or _resolve_port(get.get("port", 0), _ports(c)) != SERVER_PORT:
            problems.append(f"{where}: {kind} must GET {READINESS_PATH} on port {SERVER_PORT} (got {get or None})")
        elif not any(route.match(READINESS_PATH) for route in routes):
            problems.append(f"{where}: {kind} path {READINESS_PATH} is not a route of truss's server")
    if _probe_window_s(c.get("startupProbe", {})) < MIN_STARTUP_WINDOW_S:
        problems.append(f"{where}: startupProbe must allow >= {MIN_STARTUP_WINDOW_S}s for engine download and load")
    if _probe_window_s(c.get("livenessProbe", {})) <= _probe_window_s(c.get("readinessProbe", {})):
        problems.append(
            f"{where}: livenessProbe must wait longer than readinessProbe, so a busy pod leaves the Service first"
        )
    if obj["spec"].get("progressDeadlineSeconds", 600) < _probe_window_s(c.get("startupProbe", {})):
        problems.append(f"{where}: progressDeadlineSeconds is shorter than the startupProbe's window")
    requests = c.get("resources", {}).get("requests", {})
    problems += [f"{where}: requests no {r}" for r in ("cpu", "memory", GPU_RESOURCE) if r not in requests]
    if not any(t.get("key") == GPU_RESOURCE and t.get("operator") == "Exists" for t in spec.get("tolerations", [])):
        problems.append(f"{where}: does not tolerate the {GPU_RESOURCE} taint of GPU nodes")
    if not set(GPU_NODE_LABELS) & set(spec.get("nodeSelector", {})):
        problems.append(f"{where}: nodeSelector names no GPU node label ({', '.join(GPU_NODE_LABELS)})")
    shm = {m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    if not any(v["name"] in shm and v.get("emptyDir", {}).get("medium") == "Memory" for v in spec.get("volumes", [])):
        problems.append(f"{where}: /dev/shm must be a memory-backed emptyDir (NCCL/MPI need more than 64 MB)")
    return problems + _check_shutdown(obj, c, objects)


def _check_shutdown(obj: Manifest, container: Manifest, objects: list[Manifest]) -> list[str]:
    """terminationGracePeriodSeconds > the preStop sleep + the server's drain, or SIGKILL cuts streams off."""
    drain = _configmap_data(objects, ENV_CONFIGMAP).get(DRAIN_TIMEOUT_ENV)
    if drain is None:
        return [f"{_name(obj)}: set {DRAIN_TIMEOUT_ENV} in {ENV_CONFIGMAP} so the grace period can be checked"]
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop = int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0
    grace = (pod_spec(obj) or {}).get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + float(drain):
        return [
            f"{_name(obj)}: terminationGracePeriodSeconds ({grace}) must exceed the preStop sleep ({pre_stop}) "
            f"plus {DRAIN_TIMEOUT_ENV} ({drain}), or running generations are killed"
        ]
    return []


def _check_secrets(objects: list[Manifest]) -> list[str]:
    """Every pod reads the token as one Secret and key; the server finds its secrets where truss looks."""
    refs = {ref for ref in secret_refs(objects) if HF_SECRET_NAME in ref or HF_SECRET_KEY in ref}
    problems = []
    if refs - {(HF_SECRET_NAME, HF_SECRET_KEY)}:
        problems.append(f"HF token read as {sorted(refs, key=str)}; use Secret {HF_SECRET_NAME} key {HF_SECRET_KEY}")
    for obj in objects:
        if obj["kind"] != "Deployment" or obj["metadata"]["name"] != SERVER_NAME:
            continue
        files = secret_files(obj, SERVER_CONTAINER)
        for secret, key in ((HF_SECRET_NAME, HF_SECRET_KEY), (API_KEY_SECRET_NAME, API_KEY_SECRET_KEY)):
            path = f"{truss_secrets_dir()}/{key}"
            if files.get(path, (None, None))[:2] != (secret, key):
                problems.append(f"{_name(obj)}: Secret {secret} key {key} is not mounted as {path}")
    return problems


# -- storage sized from the engine spec --------------------------------------------------------


@cache
def _specs() -> dict[str, Any]:
    from scripts.engine_spec import load_spec

    return {path.stem: load_spec(path) for path in sorted((REPO_ROOT / "engines").glob("*.yaml"))}


def engine_gib(spec: Any) -> float:
    """Disk for the built engine (all ranks): its weights plus ENGINE_MARGIN."""
    return spec.weights_gb * 1e9 / GIB * ENGINE_MARGIN


def build_gib(spec: Any) -> float:
    """Disk for a build: the 16-bit source checkpoint, the converted checkpoint and the engine, plus BUILD_MARGIN."""
    return (spec.checkpoint.params_billion * 2 + 2 * spec.weights_gb) * 1e9 / GIB * BUILD_MARGIN


def _empty_dir_gib(workload: Manifest, volume: str) -> float | None:
    for v in (pod_spec(workload) or {}).get("volumes", []):
        if v["name"] == volume and "sizeLimit" in v.get("emptyDir", {}):
            return _gib(v["emptyDir"]["sizeLimit"])
    return None  # not an emptyDir (a PVC), or no such volume


def _check_engine_sizes(objects: list[Manifest]) -> list[str]:
    """The engine cache holds the overlay's engine; the build Job's disk holds its spec's build."""
    problems = []
    env = _configmap_data(objects, ENV_CONFIGMAP)
    served = next(
        (
            s
            for s in _specs().values()
            if (s.publish.repo, s.engine_subfolder) == (env.get("LLM_MODEL_REPO"), env.get("LLM_SUBFOLDER"))
        ),
        None,
    )
    built = _specs().get(_configmap_data(objects, ENGINE_BUILD_CONFIGMAP).get("ENGINE_SPEC", ""))
    for obj in objects:
        if pod_spec(obj) is None:
            continue
        for spec, volume, need in (
            (served, ENGINE_CACHE_VOLUME, served and engine_gib(served)),
            (built, ENGINE_BUILD_VOLUME, built and build_gib(built)),
        ):
            size = _empty_dir_gib(obj, volume)
            if spec is not None and size is not None and size < need:
                problems.append(
                    f"{_name(obj)}: emptyDir {volume} ({size:g}Gi) is smaller than the {need:.0f}Gi the spec "
                    f"{spec.name} needs; raise its sizeLimit (and the ephemeral-storage request) or use a PVC"
                )
    return problems


# -- traffic, scraping and autoscaling -----------------------------------------------------------


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


def _check_network_policy(obj: Manifest, workloads: list[Manifest]) -> list[str]:
    """A policy selecting the server's pods must still let clients and scrapers reach its port."""
    selector = obj["spec"].get("podSelector", {}).get("matchLabels", {})
    problems = []
    for w in (w for w in workloads if _selects(selector, w)):
        ports = {name: num for c in containers(pod_spec(w) or {}) for name, num in _ports(c).items()}
        allowed = {
            _resolve_port(p.get("port"), ports)
            for rule in obj["spec"].get("ingress", [])
            for p in rule.get("ports", [])
        }
        if SERVER_PORT in ports.values() and SERVER_PORT not in allowed:
            problems.append(f"{_name(obj)}: allows no ingress to port {SERVER_PORT} of {_name(w)}")
    return problems


def _check_pod_monitoring(obj: Manifest, workloads: list[Manifest]) -> list[str]:
    selector = obj["spec"]["selector"].get("matchLabels", {})
    problems = _check_selects(obj, selector, workloads)
    for w in (w for w in workloads if _selects(selector, w)):
        ports = {name: num for c in containers(pod_spec(w) or {}) for name, num in _ports(c).items()}
        problems += [
            f"{_name(obj)}: endpoint port {e['port']!r} is not a container port of {_name(w)} ({ports})"
            for e in obj["spec"]["endpoints"]
            if _resolve_port(e["port"], ports) is None
        ]
    return problems


def _check_service_monitor(obj: Manifest, objects: list[Manifest]) -> list[str]:
    selector = obj["spec"]["selector"].get("matchLabels", {})
    services = [
        o for o in objects if o["kind"] == "Service" and selector.items() <= o["metadata"].get("labels", {}).items()
    ]
    if not services:
        return [f"{_name(obj)}: selector {selector} matches no Service's labels"]
    names = {p.get("name") for s in services for p in s["spec"]["ports"]}
    return [
        f"{_name(obj)}: endpoint port {e.get('port')!r} is not a named port of the selected Service ({sorted(names)})"
        for e in obj["spec"].get("endpoints", [])
        if e.get("port") not in names
    ]


def _check_autoscalers(objects: list[Manifest]) -> list[str]:
    """One autoscaler per Deployment, targets that exist without spec.replicas, and a scrape for GMP metrics."""
    scalers = [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    monitors = [o for o in objects if o["kind"] == "PodMonitoring"]
    problems, targets = [], {}
    for obj in scalers:
        ref = obj["spec"]["scaleTargetRef"]
        kind = ref.get("kind", "Deployment")
        targets.setdefault((kind, ref["name"]), []).append(_name(obj))
        matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == ref["name"]]
        if not matches:
            problems.append(f"{_name(obj)}: scaleTargetRef {kind}/{ref['name']} is not in the manifests")
            continue
        if "replicas" in matches[0]["spec"]:
            problems.append(
                f"{_name(obj)}: {_name(matches[0])} sets spec.replicas, so every apply resets what it scaled"
            )
        if _reads_managed_prometheus(obj) and not any(
            _selects(m["spec"]["selector"].get("matchLabels", {}), matches[0]) for m in monitors
        ):
            problems.append(
                f"{_name(obj)}: its metric comes from GKE Managed Prometheus, but no PodMonitoring scrapes "
                f"{_name(matches[0])}'s pods; add components/pod-monitoring"
            )
    problems += [
        f"{kind}/{name} is scaled by {' and '.join(names)}; keep one (components/hpa or components/keda)"
        for (kind, name), names in targets.items()
        if len(names) > 1
    ]
    return problems


def _reads_managed_prometheus(scaler: Manifest) -> bool:
    if scaler["kind"] == "ScaledObject":
        return any(GMP_QUERY_HOST in t.get("metadata", {}).get("serverAddress", "") for t in scaler["spec"]["triggers"])
    names = [
        m.get(m["type"][0].lower() + m["type"][1:], {}).get("metric", {}).get("name", "")
        for m in scaler["spec"].get("metrics", [])
    ]
    return any(GMP_METRIC.match(name) for name in names)
