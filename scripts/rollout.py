"""Watch a Deployment's rollout the way `kubectl rollout status` judges it, and say why it stalls.

    ready = wait_for_rollout(api, "llm", deployment_manifest, timeout_s=3660)

Only the pods of the newest ReplicaSet count (the one whose revision is the Deployment's), and
of those only pods not being deleted: a Terminating pod or one of a superseded attempt says
nothing about this rollout. Progress is the new pods that are ready out of the replicas wanted;
every change of that count or of the blocking pod's state is printed as a line (also when stderr
is not a terminal), and the last frame is the final state. A pod state waiting cannot cure (image
pull back-off, crash loop, a missing Secret key) stops the wait at once; the others are reported
at the timeout, naming the pod, its condition, the underlying message and what to do.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from scripts.cli import CliError
from scripts.kube_api import KubeApi, Manifest, Resource

POLL_S = 5.0
REVISION = "deployment.kubernetes.io/revision"
TEMPLATE_HASH = "pod-template-hash"
IMAGE_PULL_FAILED = {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONTAINER_CONFIG_FAILED = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Which pod's state explains a stalled rollout best, most telling first.
SEVERITY = ("crash loop", "container config", "image pull", "unschedulable", "probe failures", "loading", "starting")
REPLICA_SETS = Resource("apps/v1", "ReplicaSet", "replicasets", namespaced=True)
DEPLOYMENTS = Resource("apps/v1", "Deployment", "deployments", namespaced=True)
PODS = Resource("v1", "Pod", "pods", namespaced=True)
EVENTS = Resource("v1", "Event", "events", namespaced=True)


@dataclass(frozen=True)
class PodState:
    """Why one pod is not ready yet: `condition` names it in the progress line and in errors."""

    pod: str
    condition: str  # one of SEVERITY
    detail: str = ""
    fatal: bool = False  # waiting longer cannot help


@dataclass(frozen=True)
class Rollout:
    """One look at the rollout: new pods ready of desired, done, and the most telling blocker."""

    ready: int
    desired: int
    done: bool
    waiting_for: str = ""  # what the rollout waits on when no pod reports a problem
    blocker: PodState | None = None

    def line(self) -> str:
        if self.done:
            return f"{self.ready}/{self.desired} new pods ready: rolled out"
        if self.blocker is not None:
            state = self.blocker
            return f"{self.ready}/{self.desired} new pods ready; pod {state.pod}: {state.condition}" + (
                f" ({short(state.detail)})" if state.detail else ""
            )
        return f"{self.ready}/{self.desired} new pods ready; {self.waiting_for}"


def short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# -- one pod ------------------------------------------------------------------------------------


def pod_state(pod: Manifest, events: list[Manifest]) -> PodState | None:
    """What keeps a pod from being ready, from its status and its events; None when it is ready."""
    name, status = pod["metadata"]["name"], pod.get("status", {})
    for condition in status.get("conditions", []):
        if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return PodState(name, "unschedulable", condition.get("message", ""))
    for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        waiting = container.get("state", {}).get("waiting")
        if waiting:
            reason, message = waiting.get("reason", ""), waiting.get("message", "")
            if reason in IMAGE_PULL_FAILED or reason == "ErrImagePull":
                # In back-off the status only says "Back-off pulling image"; the kubelet's Failed event has why.
                pulls = [e["message"] for e in events if e.get("reason") == "Failed" and "pull" in e.get("message", "")]
                detail = f"{reason}: {pulls[-1] if pulls else message}"
                return PodState(name, "image pull", detail, fatal=reason in IMAGE_PULL_FAILED)
            if reason in CONTAINER_CONFIG_FAILED:
                return PodState(name, "container config", f"{reason}: {message}", fatal=True)
            if reason == "CrashLoopBackOff":
                last = container.get("lastState", {}).get("terminated", {})
                detail = (
                    f"exit code {last.get('exitCode')} ({last.get('reason')}), {container.get('restartCount')} restarts"
                )
                return PodState(name, "crash loop", detail, fatal=True)
            return PodState(name, "starting", reason)
        if container.get("state", {}).get("running") and not container.get("ready"):
            unhealthy = [e["message"] for e in events if e.get("reason") == "Unhealthy"]
            if unhealthy:
                return PodState(name, "probe failures", unhealthy[-1])
            return PodState(name, "loading", "model loading")
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    return None if ready else PodState(name, "starting", status.get("phase", "Pending"))


def _needs_events(pod: Manifest) -> bool:
    """Events tell more than the status only for probe failures and image pulls."""
    for container in pod.get("status", {}).get("containerStatuses", []):
        state = container.get("state", {})
        waiting = state.get("waiting", {}).get("reason", "")
        if (state.get("running") and not container.get("ready")) or waiting in IMAGE_PULL_FAILED | {"ErrImagePull"}:
            return True
    return False


# -- the newest ReplicaSet -----------------------------------------------------------------------


def _owned_by(obj: Manifest, owner: Manifest) -> bool:
    uid = owner["metadata"].get("uid")
    refs = obj["metadata"].get("ownerReferences", [])
    return any(r.get("uid") == uid if uid else r.get("name") == owner["metadata"]["name"] for r in refs)


def rollout_state(api: KubeApi, namespace: str, name: str) -> Rollout:
    """The rollout as of now, from the Deployment, its newest ReplicaSet and that ReplicaSet's live pods."""
    deployment = api.get(DEPLOYMENTS.path(namespace, name), f"read deployment/{name}") or {}
    spec, status, meta = deployment.get("spec", {}), deployment.get("status", {}), deployment.get("metadata", {})
    desired = spec.get("replicas", 1)
    for condition in status.get("conditions", []):
        if condition["type"] == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise CliError(f"deployment/{name} exceeded its progressDeadlineSeconds: {condition.get('message')}")
        if condition["type"] == "ReplicaFailure" and condition["status"] == "True":
            raise CliError(f"deployment/{name} cannot create pods: {condition.get('message')}")
    if not deployment or status.get("observedGeneration", 0) < meta.get("generation", 1):
        return Rollout(0, desired, False, "waiting for the Deployment controller to see the new spec")
    revision = meta.get("annotations", {}).get(REVISION)
    selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
    new = [
        rs
        for rs in api.list(REPLICA_SETS, namespace, labelSelector=selector)
        if _owned_by(rs, deployment) and rs["metadata"].get("annotations", {}).get(REVISION) == revision
    ]
    if not new:
        return Rollout(0, desired, False, f"waiting for the ReplicaSet of revision {revision}")
    template_hash = new[0]["metadata"].get("labels", {}).get(TEMPLATE_HASH, "")
    pods = [
        pod
        for pod in api.list(PODS, namespace, labelSelector=f"{selector},{TEMPLATE_HASH}={template_hash}")
        if _owned_by(pod, new[0]) and not pod["metadata"].get("deletionTimestamp")
    ]
    states = [pod_state(pod, _events(api, namespace, pod) if _needs_events(pod) else []) for pod in pods]
    ready = sum(state is None for state in states)
    updated, total = status.get("updatedReplicas", 0), status.get("replicas", 0)
    done = updated >= desired and total <= updated and status.get("availableReplicas", 0) >= updated
    blockers = sorted((s for s in states if s is not None), key=lambda s: (not s.fatal, SEVERITY.index(s.condition)))
    if done:  # the controller counts every updated replica available
        return Rollout(desired, desired, True)
    old = total - updated
    waiting_for = f"{old} old pod(s) still terminating" if ready >= desired and old > 0 else "waiting for new pods"
    return Rollout(ready, desired, False, waiting_for, blockers[0] if blockers else None)


def _events(api: KubeApi, namespace: str, pod: Manifest) -> list[Manifest]:
    name = pod["metadata"]["name"]
    items = api.list(EVENTS, namespace, fieldSelector=f"involvedObject.name={name}")
    return [e for e in items if e.get("involvedObject", {}).get("name") == name]


# -- waiting ------------------------------------------------------------------------------------


def wait_for_rollout(api: KubeApi, namespace: str, deployment: Manifest, timeout_s: float) -> int:
    """Poll until the rollout is done; returns the ready replicas or raises a CliError naming the blocker."""
    name = deployment["metadata"]["name"]
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout_s
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task(f"deployment/{name}", total=None)
            started, last_line = time.monotonic(), ""
            while True:
                state = rollout_state(api, namespace, name)
                line = state.line()
                progress.update(task, total=state.desired, completed=state.ready, description=f"deployment/{name}")
                if line != last_line:  # a history of the rollout, on a terminal and in logs alike
                    progress.console.print(
                        f"[{time.monotonic() - started:5.0f}s] deployment/{name}: {line}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                    last_line = line
                if state.done:
                    return state.ready
                if state.blocker is not None and state.blocker.fatal:
                    raise CliError(stall_message(namespace, deployment, state))
                if time.monotonic() >= deadline:
                    raise CliError(f"not ready after {timeout_s:.0f}s: {stall_message(namespace, deployment, state)}")
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped waiting; the rollout goes on: kubectl -n {namespace} rollout status deployment/{name}"
        ) from None


# -- explaining a stall ------------------------------------------------------------------------


SCHEDULER_COUNT = re.compile(r"^(\d+) (.+)$")


def scheduler_reasons(message: str) -> list[tuple[int, str]]:
    """(node count, reason) from "0/3 nodes are available: 1 Insufficient cpu, 2 Insufficient nvidia.com/gpu. ..."."""
    _, sep, rest = message.partition("nodes are available: ")
    if not sep:
        return []
    rest = rest.split(" preemption:")[0].rstrip(". ")
    reasons = []
    for part in rest.split(", "):
        match = SCHEDULER_COUNT.match(part.strip().rstrip("."))
        if match:
            reasons.append((int(match[1]), match[2].removeprefix("node(s) ")))
    return reasons


def _scheduling_hint(reason: str, deployment: Manifest) -> str:
    pod = deployment["spec"]["template"]["spec"]
    requests: dict = {}
    for c in pod["containers"]:
        requests |= c.get("resources", {}).get("requests", {})
    insufficient = reason.removeprefix("Insufficient ").strip()
    if reason.startswith("Insufficient") and insufficient == "nvidia.com/gpu":
        return "no free GPU there: add GPU nodes or let the node pool autoscale (a rolling update needs a spare GPU)"
    if reason.startswith("Insufficient") and insufficient == "ephemeral-storage":
        return (
            f"the pod requests {requests.get('ephemeral-storage')} of ephemeral storage, more than those nodes have "
            "free: use larger boot disks, components/local-ssd or components/model-cache-pvc"
        )
    if reason.startswith("Insufficient") and insufficient in ("cpu", "memory"):
        return (
            f"the pod requests {insufficient} {requests.get(insufficient)}, more than those nodes have free: "
            "lower it in the overlay or use a larger machine type"
        )
    if "node affinity/selector" in reason:
        return f"they do not carry the overlay's nodeSelector {pod.get('nodeSelector', {})}"
    if "untolerated taint" in reason:
        return "their taints are not tolerated (expected for nodes that are not for this pod)"
    if "PersistentVolumeClaim" in reason or "volume node affinity" in reason:
        return "the model-cache PersistentVolumeClaim is not bound: kubectl describe pvc llm-model-cache"
    return ""


def stall_message(namespace: str, deployment: Manifest, state: Rollout) -> str:
    """Which pod and condition hold the rollout, the underlying message, and what to do about it."""
    name = deployment["metadata"]["name"]
    where = f"deployment/{name} in namespace {namespace} ({state.ready}/{state.desired} new pods ready)"
    blocker = state.blocker
    if blocker is None:
        return f"{where}: {state.waiting_for}; see kubectl -n {namespace} describe deployment {name}"
    logs = f"kubectl -n {namespace} logs {blocker.pod}"
    describe = f"kubectl -n {namespace} describe pod {blocker.pod}"
    if blocker.condition == "unschedulable":
        reasons = scheduler_reasons(blocker.detail)
        per_reason = [
            f"{n} node(s): {r}" + (f" ({h})" if (h := _scheduling_hint(r, deployment)) else "") for n, r in reasons
        ]
        hint = "; ".join(per_reason) or describe
    else:
        hint = {
            "image pull": "check the image name and tag, that `docker push` finished, and that the nodes may pull "
            "from the registry (Artifact Registry: roles/artifactregistry.reader for the node service account; "
            "elsewhere components/image-pull-secret)",
            "container config": f"a Secret or ConfigMap key is missing; see {describe}",
            "crash loop": (
                "the container ran out of memory: raise the memory limit in the overlay"
                if "OOMKilled" in blocker.detail
                else f"the server exits while starting; see {logs} --previous (engine built for another GPU or "
                "TensorRT-LLM version, wrong LLM_MODEL_REPO/LLM_SUBFOLDER, or a token without access)"
            ),
            "probe failures": f"the server answers but is not ready: {logs} shows the engine download and load; "
            "allow more time with --timeout for large engines",
            "loading": f"the model is still loading; {logs} shows how far it got",
            "starting": "the pod is still being created (the TensorRT-LLM image takes minutes to pull); "
            f"see {describe}",
        }[blocker.condition]
    return f"{where}: pod {blocker.pod}: {blocker.condition}: {blocker.detail.rstrip('.')}. {hint}"
