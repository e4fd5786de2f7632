"""`main.py deploy`: apply one overlay of k8s/ with the kubernetes client and wait for the rollout.

    python main.py deploy --overlay gke-a100 --image us-docker.pkg.dev/PROJECT/llm/llm-trtllm-server:v1
    python main.py deploy --overlay gke-h100 --image ... --env LLM_SUBFOLDER=my-h100-engine -n llm
    python main.py deploy --overlay generic-gfd --image ... --dry-run     # render and check; print the YAML

1. render the overlay with kustomize, apply the --image / --env overrides, check the result
   (scripts.k8s_manifests) and refuse values an overlay leaves as `change-me`;
2. connect with the kubeconfig (--kubeconfig, --context) and check that the Secrets the pods
   mount exist with their keys;
3. create each object, or patch it with server-side apply when it exists;
4. wait until every replica is ready, with a progress display; stop early, naming the condition,
   when an image cannot be pulled or a container keeps crashing, and at --timeout name what
   blocks it (no GPU for the pod, image pull, probe failures);
5. print the port-forward and request commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client import ApiClient, ApiException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from urllib3.exceptions import HTTPError

from scripts.cli import CliError
from scripts.k8s_manifests import (
    OVERLAYS_DIR,
    SERVER_NAME,
    SERVER_PORT,
    Manifest,
    check_manifests,
    overlay_names,
    placeholders,
    render,
    secret_refs,
    to_yaml,
)

FIELD_MANAGER = "llm-server-deploy"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply: fields removed from a manifest go away
DEFAULT_TIMEOUT_S = 2400  # a large image pull + the startupProbe's 30 minutes for engine download and load
POLL_S = 5.0
REQUEST_TIMEOUT_S = 30
FIRST_PROMPT = "What is a mistral?"

# (apiVersion, kind) -> (API class, the method suffix: read_namespaced_<suffix>, create_..., patch_...)
API_KINDS: dict[tuple[str, str], tuple[type, str]] = {
    ("v1", "ConfigMap"): (client.CoreV1Api, "config_map"),
    ("v1", "Service"): (client.CoreV1Api, "service"),
    ("v1", "ServiceAccount"): (client.CoreV1Api, "service_account"),
    ("v1", "PersistentVolumeClaim"): (client.CoreV1Api, "persistent_volume_claim"),
    ("apps/v1", "Deployment"): (client.AppsV1Api, "deployment"),
    ("policy/v1", "PodDisruptionBudget"): (client.PolicyV1Api, "pod_disruption_budget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): (client.AutoscalingV2Api, "horizontal_pod_autoscaler"),
}
QUANTITY_MAPS = frozenset({"requests", "limits", "hard", "capacity", "overhead"})  # name -> Quantity maps
QUANTITY_FIELDS = frozenset({"sizeLimit"})
IMAGE_PULL_FAILED = {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONTAINER_CONFIG_FAILED = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlay", required=True, choices=overlay_names(), help="which k8s/overlays/<name>")
    parser.add_argument("--image", help="the server image, REGISTRY/PATH/NAME:TAG (overrides the overlay's)")
    parser.add_argument(
        "--env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="set an LLM_* setting in the overlay's llm-server-env ConfigMap, e.g. LLM_MODEL_REPO=me/engines",
    )
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait (default %(default)s)"
    )
    parser.add_argument("--dry-run", action="store_true", help="render and check only; print the manifests")
    parser.set_defaults(func=run)


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("LLM_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not LLM_<SETTING>=VALUE (see model-truss/model/settings.py)")
    return key, value


def run(args: argparse.Namespace) -> int:
    objects = render(OVERLAYS_DIR / args.overlay, image=args.image, env=dict(args.env))
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    problems = check_manifests(objects)
    problems += [f"no {kind} {SERVER_NAME}" for kind in ("Deployment", "Service") if (kind, SERVER_NAME) not in names]
    problems += [
        f"deploy cannot apply {o['apiVersion']} {o['kind']}; use kubectl apply -k"
        for o in objects
        if (o["apiVersion"], o["kind"]) not in API_KINDS
    ]
    if problems:
        raise CliError(f"k8s/overlays/{args.overlay} does not check out: " + "; ".join(problems))
    unset = placeholders(objects)
    if unset:
        raise CliError(
            f"k8s/overlays/{args.overlay} still has placeholder values ({'; '.join(unset)}); pass --image "
            f"(and --env LLM_MODEL_REPO=...) or set them in k8s/overlays/{args.overlay}/kustomization.yaml"
        )
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    server = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == SERVER_NAME)
    service = next(o["metadata"]["name"] for o in objects if o["kind"] == "Service")
    api, context_namespace = connect(args.kubeconfig, args.context)
    namespace = args.namespace or context_namespace
    check_secrets(api, namespace, objects)
    for obj in objects:
        print(f"{kubectl_name(obj)} {apply_object(api, namespace, obj)}")
    ready = wait_for_rollout(api, namespace, server, args.timeout)
    print(f"deployment/{SERVER_NAME} is ready in namespace {namespace} ({ready} replica(s)). Send a first request:")
    for line in next_steps(namespace, service):
        print(f"  {line}")
    return 0


def next_steps(namespace: str, service: str) -> list[str]:
    url = f"http://127.0.0.1:{SERVER_PORT}/v1/models/model:predict"
    request = f"import requests; print(requests.post({url!r}, json={{'prompt': {FIRST_PROMPT!r}}}).json())"
    return [
        f"kubectl -n {namespace} port-forward svc/{service} {SERVER_PORT}:{SERVER_PORT}",
        f'python -c "{request}"',
    ]


# -- the API server ------------------------------------------------------------------------------


def connect(kubeconfig: Path | None, context: str | None) -> tuple[ApiClient, str]:
    """An API client for the kubeconfig's (or --context's) cluster, and that context's namespace."""
    path = str(kubeconfig) if kubeconfig else None
    try:
        contexts, current = config.list_kube_config_contexts(config_file=path)
        api = config.new_client_from_config(config_file=path, context=context, persist_config=False)
    except (config.ConfigException, OSError) as exc:
        raise CliError(
            f"no usable kubeconfig ({exc}); point --kubeconfig or $KUBECONFIG at one, e.g. on GKE: "
            "gcloud container clusters get-credentials CLUSTER --location LOCATION"
        ) from exc
    chosen = next((c for c in contexts if c["name"] == context), current) if context else current
    return api, (chosen or {}).get("context", {}).get("namespace") or "default"


@contextlib.contextmanager
def api_errors(action: str, api: ApiClient) -> Iterator[None]:
    """The one place API failures become one-line errors: refused requests and an unreachable server."""
    try:
        yield
    except ApiException as exc:
        raise CliError(f"cannot {action}: {exc.status} {exc.reason}: {_api_message(exc)}") from exc
    except HTTPError as exc:
        host = api.configuration.host
        raise CliError(f"cannot {action}: the Kubernetes API at {host} does not answer ({exc})") from exc


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body or "").strip()


def read_or_none(read: Callable[..., Any], *args: str, **query: str) -> dict | None:
    """The object (or list) as a dict, or None if the API server has none by that name (404)."""
    try:
        response = read(*args, **query, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)
        return json.loads(response.data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def check_secrets(api: ApiClient, namespace: str, objects: list[Manifest]) -> None:
    """Every Secret (and key) the pods mount exists, or a pod would hang in ContainerCreating."""
    core = client.CoreV1Api(api)
    for name, key in sorted(secret_refs(objects), key=str):
        create = f"kubectl -n {namespace} create secret generic {name} --from-literal={key or 'KEY'}=..."
        with api_errors(f"read Secret {name}", api):
            secret = read_or_none(core.read_namespaced_secret, name, namespace)
        if secret is None:
            raise CliError(f"Secret {name} is missing in namespace {namespace}; create it: {create}")
        if key and key not in (secret.get("data") or {}):
            raise CliError(f"Secret {name} in namespace {namespace} has no key {key}; recreate it: {create}")


def kubectl_name(obj: Manifest) -> str:
    """How kubectl names an object: deployment.apps/llm-server, configmap/llm-server-env-..."""
    group = obj["apiVersion"].rpartition("/")[0]
    return f"{obj['kind'].lower()}{'.' + group if group else ''}/{obj['metadata']['name']}"


def api_body(obj: Manifest, namespace: str) -> Manifest:
    """The object as the client sends it: in `namespace`, quantities as strings.

    YAML reads `nvidia.com/gpu: 1` as a number; the API server takes either, but the client's typed
    models accept only the string form the server itself returns.
    """

    def convert(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            if key in QUANTITY_MAPS:
                return {k: str(v) if isinstance(v, int | float) else v for k, v in node.items()}
            return {k: convert(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [convert(v) for v in node]
        return str(node) if key in QUANTITY_FIELDS and isinstance(node, int | float) else node

    return convert({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})


def apply_object(api: ApiClient, namespace: str, obj: Manifest) -> str:
    """Create the object, or server-side apply it over the live one; returns what happened (kubectl's words)."""
    api_class, suffix = API_KINDS[obj["apiVersion"], obj["kind"]]
    resource, name = api_class(api), obj["metadata"]["name"]
    body = api_body(obj, namespace)
    options = {"field_manager": FIELD_MANAGER, "_preload_content": False, "_request_timeout": REQUEST_TIMEOUT_S}
    with api_errors(f"apply {kubectl_name(obj)}", api):
        if read_or_none(getattr(resource, f"read_namespaced_{suffix}"), name, namespace) is None:
            getattr(resource, f"create_namespaced_{suffix}")(namespace, body, **options)
            return "created"
        patch = getattr(resource, f"patch_namespaced_{suffix}")
        patch(name, namespace, body, force=True, _content_type=APPLY_PATCH, **options)
    return "configured"


# -- the rollout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    """Why a pod is not ready yet: `condition` names it in the progress line and in errors."""

    condition: str  # unschedulable | image pull | container config | crash loop | probe failures | loading | starting
    detail: str = ""
    fatal: bool = False  # waiting longer cannot help


# Which pod's state explains a stalled rollout best, most telling first.
SEVERITY = ("crash loop", "container config", "image pull", "unschedulable", "probe failures", "loading", "starting")


def pod_state(pod: Manifest, events: list[Manifest]) -> PodState | None:
    """What keeps a pod from being ready, from its status and its events; None when it is ready."""
    status = pod.get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return PodState("unschedulable", condition.get("message", ""))
    for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        waiting = container.get("state", {}).get("waiting")
        if waiting:
            reason, message = waiting.get("reason", ""), waiting.get("message", "")
            if reason in IMAGE_PULL_FAILED or reason == "ErrImagePull":
                return PodState("image pull", f"{reason}: {message}", fatal=reason in IMAGE_PULL_FAILED)
            if reason in CONTAINER_CONFIG_FAILED:
                return PodState("container config", f"{reason}: {message}", fatal=True)
            if reason == "CrashLoopBackOff":
                last = container.get("lastState", {}).get("terminated", {})
                detail = (
                    f"exit code {last.get('exitCode')} ({last.get('reason')}), {container.get('restartCount')} restarts"
                )
                return PodState("crash loop", detail, fatal=True)
            return PodState("starting", reason)
        if container.get("state", {}).get("running") and not container.get("ready"):
            unhealthy = [e["message"] for e in events if e.get("reason") == "Unhealthy"]
            return PodState("probe failures", unhealthy[-1]) if unhealthy else PodState("loading", "model loading")
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    return None if ready else PodState("starting", status.get("phase", "Pending"))


def rollout_progress(deployment: Manifest) -> tuple[int, int, bool]:
    """(available new replicas, desired replicas, done), as `kubectl rollout status` judges a Deployment."""
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    desired = spec.get("replicas", 1)
    updated, available = status.get("updatedReplicas", 0), status.get("availableReplicas", 0)
    for condition in status.get("conditions", []):
        if condition["type"] == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise CliError(f"deployment/{SERVER_NAME} exceeded its progressDeadlineSeconds: {condition.get('message')}")
        if condition["type"] == "ReplicaFailure" and condition["status"] == "True":
            raise CliError(f"deployment/{SERVER_NAME} cannot create pods: {condition.get('message')}")
    observed = status.get("observedGeneration", 0) >= deployment.get("metadata", {}).get("generation", 0)
    done = observed and updated >= desired and status.get("replicas", 0) <= updated and available >= updated
    return min(available, updated), desired, done


def wait_for_rollout(api: ApiClient, namespace: str, deployment: Manifest, timeout_s: float) -> int:
    """Poll until the Deployment's rollout is done; returns the ready replicas or raises naming the blocker."""
    name = deployment["metadata"]["name"]
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            return _poll_rollout(api, namespace, deployment, time.monotonic() + timeout_s, progress)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped waiting; the rollout goes on: kubectl -n {namespace} rollout status deployment/{name}"
        ) from None
    except TimeoutError as exc:
        raise CliError(f"not ready after {timeout_s:.0f}s: {exc}") from None


def _poll_rollout(api: ApiClient, namespace: str, deployment: Manifest, deadline: float, progress: Progress) -> int:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    name = deployment["metadata"]["name"]
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    task = progress.add_task(f"deployment/{name}", total=None)
    while True:
        with api_errors(f"read deployment/{name}", api):
            ready, desired, done = rollout_progress(
                read_or_none(apps.read_namespaced_deployment, name, namespace) or {}
            )
            if done:
                return ready
            state = worst_state(core, namespace, selector)
        progress.update(task, total=desired, completed=ready, description=_describe(name, state))
        if state is not None and state.fatal:
            raise CliError(stall_message(name, namespace, deployment, state, ready, desired))
        if time.monotonic() >= deadline:
            raise TimeoutError(stall_message(name, namespace, deployment, state, ready, desired))
        time.sleep(POLL_S)


def worst_state(core: client.CoreV1Api, namespace: str, selector: str) -> PodState | None:
    """The most telling reason any of the Deployment's pods is not ready; None if all are."""
    pods = read_or_none(core.list_namespaced_pod, namespace, label_selector=selector) or {}
    states = []
    for pod in pods.get("items", []):
        events: list[Manifest] = []
        if _running_unready(pod):  # only then do probe events tell more than the status
            selector_field = f"involvedObject.name={pod['metadata']['name']}"
            items = (read_or_none(core.list_namespaced_event, namespace, field_selector=selector_field) or {}).get(
                "items", []
            )
            events = [e for e in items if e.get("involvedObject", {}).get("name") == pod["metadata"]["name"]]
        state = pod_state(pod, events)
        if state is not None:
            states.append(state)
    fatal = [s for s in states if s.fatal]
    return (fatal or sorted(states, key=lambda s: SEVERITY.index(s.condition)) or [None])[0]


def _running_unready(pod: Manifest) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return any(c.get("state", {}).get("running") and not c.get("ready") for c in statuses)


def _describe(name: str, state: PodState | None) -> str:
    if state is None:
        return f"deployment/{name}"
    detail = state.detail if len(state.detail) <= 70 else state.detail[:67] + "..."
    return f"deployment/{name}: {state.condition}" + (f" ({detail})" if detail else "")


def stall_message(
    name: str, namespace: str, deployment: Manifest, state: PodState | None, ready: int, desired: int
) -> str:
    """Which condition holds the rollout, its details, and what to do about it."""
    where = f"deployment/{name} in namespace {namespace} ({ready}/{desired} ready)"
    if state is None:
        return f"{where}: no pod reports a problem; see kubectl -n {namespace} describe deployment {name}"
    logs = f"kubectl -n {namespace} logs deployment/{name}"
    describe = f"kubectl -n {namespace} describe pods -l app.kubernetes.io/name={name}"
    node_selector = deployment["spec"]["template"]["spec"].get("nodeSelector", {})
    hints = {
        "unschedulable": (
            "no node has a free GPU: add GPU nodes or let the node pool autoscale (a rolling update needs a spare GPU)"
            if "nvidia.com/gpu" in state.detail
            else f"no node matches the GPU nodeSelector {node_selector}: does the overlay match your node pool?"
        ),
        "image pull": "check the image name and tag, that `docker push` finished, and that the nodes may pull "
        "from the registry (Artifact Registry: roles/artifactregistry.reader for the node service account)",
        "container config": f"a Secret or ConfigMap key is missing; see {describe}",
        "crash loop": (
            "the container ran out of memory: raise the memory limit in the overlay"
            if "OOMKilled" in state.detail
            else f"the server exits while starting; see {logs} --previous (engine built for another GPU or "
            "TensorRT-LLM version, wrong LLM_MODEL_REPO/LLM_SUBFOLDER, or a token without access)"
        ),
        "probe failures": f"the server answers but is not ready: {logs} shows the engine download and load; "
        "allow more time with --timeout for large engines",
        "loading": f"the model is still loading; {logs} shows how far it got",
        "starting": f"the pod is still being created (the TensorRT-LLM image takes minutes to pull); see {describe}",
    }
    return f"{where}: {state.condition}: {state.detail.rstrip('.')}. {hints[state.condition]}"
