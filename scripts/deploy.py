"""`main.py deploy`: server-side apply one overlay of k8s/, prune what it no longer has, wait for the rollout.

    python main.py deploy --overlay gke-a100 --image us-docker.pkg.dev/PROJECT/llm/llm-trtllm-server:v1
    python main.py deploy --overlay gke-h100 --image ... --env LLM_SUBFOLDER=my-h100-engine -n llm
    python main.py deploy --overlay generic-gfd --image ... --dry-run     # render and check; print the YAML

1. render the overlay with kustomize, apply the --image / --env overrides, check the result
   (scripts.k8s_checks) and refuse values an overlay leaves as `change-me`;
2. connect with the kubeconfig (--kubeconfig, --context); check that the namespace exists, that
   the server serves every apiVersion/kind of the manifests, and that the Secrets (and keys) and
   the PriorityClass the pods need exist. Nothing is sent before all of that holds;
3. server-side apply every object, creating and updating alike, as the one field manager
   `llm-server-deploy` (so a field an overlay drops disappears from the live object), each
   labelled app.kubernetes.io/managed-by=llm-server-deploy;
4. prune: delete the objects carrying that label that this render no longer has (an HPA whose
   component was removed, ConfigMaps of older settings), except ConfigMaps a kept ReplicaSet
   still uses (`kubectl rollout undo` needs them), PersistentVolumeClaims (they hold data) and
   cluster-scoped objects (other namespaces may use them);
5. wait for the rollout, watching only the newest ReplicaSet's pods (scripts.rollout);
6. print the port-forward and request commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.cli import CliError
from scripts.k8s_checks import check_manifests
from scripts.k8s_manifests import (
    OVERLAYS_DIR,
    SERVER_NAME,
    SERVER_PORT,
    Manifest,
    overlay_names,
    placeholders,
    pod_spec,
    render,
    secret_refs,
    server_deployment,
    to_yaml,
)
from scripts.kube_api import FIELD_MANAGER, KubeApi, Resource
from scripts.rollout import REPLICA_SETS, wait_for_rollout

MANAGED_BY = "app.kubernetes.io/managed-by"
TIMEOUT_MARGIN_S = 60  # past progressDeadlineSeconds, so the controller's own verdict comes first
FIRST_PROMPT = "What is a mistral?"
NAMESPACES = Resource("v1", "Namespace", "namespaces", namespaced=False)
SECRETS = Resource("v1", "Secret", "secrets", namespaced=True)
PRIORITY_CLASSES = Resource("scheduling.k8s.io/v1", "PriorityClass", "priorityclasses", namespaced=False)
# What an earlier deploy may have created in a namespace: every namespaced kind k8s/ renders.
PRUNABLE = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
)


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
        "--timeout",
        type=float,
        help=f"seconds to wait (default: the Deployment's progressDeadlineSeconds + {TIMEOUT_MARGIN_S})",
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
    server = server_deployment(objects)
    assert server is not None  # checked above
    service = next(o["metadata"]["name"] for o in objects if o["kind"] == "Service")
    api = KubeApi.connect(args.kubeconfig, args.context)
    namespace = args.namespace or api.namespace
    check_namespace(api, namespace)
    kinds = api.discover({(o["apiVersion"], o["kind"]) for o in objects})
    check_references(api, namespace, objects)
    for obj in sorted(objects, key=lambda o: kinds[o["apiVersion"], o["kind"]].namespaced):  # PriorityClass first
        resource = kinds[obj["apiVersion"], obj["kind"]]
        created = api.apply(resource, namespace, labelled(obj, resource, namespace))
        print(f"{resource.kubectl_name}/{obj['metadata']['name']} {'created' if created else 'configured'}")
    for line in prune(api, namespace, objects, server):
        print(line)
    ready = wait_for_rollout(api, namespace, server, rollout_timeout(server, args.timeout))
    print(f"deployment/{SERVER_NAME} is ready in namespace {namespace} ({ready} replica(s)). Send a first request:")
    for line in next_steps(namespace, service):
        print(f"  {line}")
    return 0


def rollout_timeout(deployment: Manifest, requested: float | None) -> float:
    """--timeout, else the controller's progressDeadlineSeconds (Kubernetes' default 600) plus a margin."""
    return (
        requested
        if requested is not None
        else deployment["spec"].get("progressDeadlineSeconds", 600) + TIMEOUT_MARGIN_S
    )


def next_steps(namespace: str, service: str) -> list[str]:
    url = f"http://127.0.0.1:{SERVER_PORT}/v1/models/model:predict"
    request = f"import requests; print(requests.post({url!r}, json={{'prompt': {FIRST_PROMPT!r}}}).json())"
    return [
        f"kubectl -n {namespace} port-forward svc/{service} {SERVER_PORT}:{SERVER_PORT}",
        f'python -c "{request}"',
    ]


# -- before anything is sent ----------------------------------------------------------------------


def check_namespace(api: KubeApi, namespace: str) -> None:
    """A missing namespace is named as such (every namespaced read would otherwise just say 404)."""
    try:
        found = api.get(NAMESPACES.path("", namespace), f"read namespace {namespace}")
    except CliError as exc:
        if getattr(exc.__cause__, "status", None) == 403:  # may not read namespaces: the later requests will tell
            return
        raise
    if found is None:
        raise CliError(
            f"namespace {namespace} does not exist in the cluster at {api.host}; create it "
            f"(kubectl create namespace {namespace}) or pick another with -n"
        )


def check_references(api: KubeApi, namespace: str, objects: list[Manifest]) -> None:
    """Every Secret (and key) the pods mount or pull with, and their PriorityClass, exist: else pods hang."""
    for name, key in sorted(secret_refs(objects), key=str):
        create = f"kubectl -n {namespace} create secret generic {name} --from-literal={key or 'KEY'}=..."
        secret = api.get(SECRETS.path(namespace, name), f"read Secret {name}")
        if secret is None:
            raise CliError(f"Secret {name} is missing in namespace {namespace}; create it: {create}")
        if key and key not in (secret.get("data") or {}):
            raise CliError(f"Secret {name} in namespace {namespace} has no key {key}; recreate it: {create}")
    rendered = {o["metadata"]["name"] for o in objects if o["kind"] == "PriorityClass"}
    for obj in objects:
        name = (pod_spec(obj) or {}).get("priorityClassName")
        if (
            name
            and name not in rendered
            and api.get(PRIORITY_CLASSES.path("", name), f"read PriorityClass {name}") is None
        ):
            raise CliError(f"PriorityClass {name} does not exist; add components/priority-class or create it")


def labelled(obj: Manifest, resource: Resource, namespace: str) -> Manifest:
    """The object as deploy applies it: in `namespace` (if namespaced) and marked as deploy's for pruning."""
    metadata = {**obj["metadata"], "labels": {**obj["metadata"].get("labels", {}), MANAGED_BY: FIELD_MANAGER}}
    if resource.namespaced:
        metadata["namespace"] = namespace
    return {**obj, "metadata": metadata}


# -- pruning ----------------------------------------------------------------------------------------


def prune(api: KubeApi, namespace: str, objects: list[Manifest], server: Manifest) -> list[str]:
    """Delete deploy's objects in `namespace` that `objects` no longer has; kubectl-style lines of what went."""
    applied = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
    in_use = configmaps_in_use(api, namespace, server)
    pruned = []
    for resource in api.discover_optional(PRUNABLE):
        for item in api.list(resource, namespace, labelSelector=f"{MANAGED_BY}={FIELD_MANAGER}"):
            name = item["metadata"]["name"]
            if (resource.api_version, resource.kind, name) in applied or (
                resource.kind == "ConfigMap" and name in in_use
            ):
                continue
            api.delete(resource, namespace, name)
            pruned.append(f"{resource.kubectl_name}/{name} pruned")
    return pruned


def configmaps_in_use(api: KubeApi, namespace: str, deployment: Manifest) -> set[str]:
    """ConfigMaps the server Deployment's ReplicaSets (the current one and its kept history) refer to."""
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    names: set[str] = set()
    for replica_set in api.list(REPLICA_SETS, namespace, labelSelector=selector):
        spec = pod_spec(replica_set) or {}
        names.update(v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v)
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            names.update(s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s)
            names.update(
                e["valueFrom"]["configMapKeyRef"]["name"]
                for e in container.get("env", [])
                if "configMapKeyRef" in e.get("valueFrom", {})
            )
    return names
