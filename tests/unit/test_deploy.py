"""`python main.py deploy` against an in-memory Kubernetes API (kmock's emulator over real HTTP).

The emulator is tests/doubles/kube.py: kmock plus server-side apply and field managers. The
kubernetes client runs in a worker thread, as in production; the emulator records every request,
so the tests assert exactly what was applied or deleted. `Controller` plays the Deployment
controller and the kubelet: ReplicaSets per revision, their pods and the Deployment's status.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml

import main
from scripts import deploy, kube_api, rollout
from scripts import k8s_manifests as k8s
from tests.doubles.kube import ApplyingEmulator
from tests.unit.kubectl_setup import ensure_kubectl

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)

OVERLAY = "gke-a100"
IMAGE = "us-docker.pkg.dev/my-project/llm/llm-trtllm-server:v1"
NS = "llm"  # the kubeconfig context's namespace
DEPLOYMENT = (kmock.resource("apps/v1/deployments"), NS, k8s.SERVER_NAME)
SELECTOR = {"app.kubernetes.io/name": k8s.SERVER_NAME}
REVISION = "deployment.kubernetes.io/revision"  # the Deployment controller's annotation and label names
TEMPLATE_HASH = "pod-template-hash"
# What the emulated API server serves: (resource, kind, namespaced), as `kubectl api-resources` lists them.
SERVED = [
    ("v1/namespaces", "Namespace", False),
    ("v1/configmaps", "ConfigMap", True),
    ("v1/secrets", "Secret", True),
    ("v1/services", "Service", True),
    ("v1/pods", "Pod", True),
    ("v1/events", "Event", True),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True),
    ("apps/v1/deployments", "Deployment", True),
    ("apps/v1/replicasets", "ReplicaSet", True),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True),
    ("autoscaling/v2/horizontalpodautoscalers", "HorizontalPodAutoscaler", True),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True),
    ("monitoring.googleapis.com/v1/podmonitorings", "PodMonitoring", True),
]


@pytest.fixture(scope="module", autouse=True)
def kubectl() -> str:
    return ensure_kubectl()  # deploy renders the overlay with it


def kubeconfig_for(path: Path, server: str, **cluster: object) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "tester", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "tester", "namespace": NS}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Cluster:
    api: ApplyingEmulator
    kubeconfig: Path
    controller: Controller


@pytest_asyncio.fixture
async def cluster(kmock: ApplyingEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """Namespace `llm` holding only the Hugging Face token Secret, and a kubeconfig pointing at it."""
    monkeypatch.setattr(rollout, "POLL_S", 0.02)
    for resource, kind, namespaced in SERVED:
        kmock.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=namespaced)
    kmock.objects["v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    token = base64.b64encode(b"hf_secret_value").decode()
    kmock.objects["v1/secrets", NS, k8s.HF_SECRET_NAME] = secret(NS, {k8s.HF_SECRET_KEY: token})
    kubeconfig = kubeconfig_for(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    return Cluster(kmock, kubeconfig, Controller(kmock))


def secret(namespace: str, data: dict[str, str]) -> dict:
    metadata = {"name": k8s.HF_SECRET_NAME, "namespace": namespace}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "data": data}


async def run_deploy(
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    overlay: str = OVERLAY,
    image: str = IMAGE,
    timeout: float = 10,
) -> tuple[int, str, str]:
    """`python main.py deploy ...` in a worker thread, so the emulator keeps serving on this loop."""
    argv = ["deploy", "--overlay", overlay, "--image", image, "--kubeconfig", str(cluster.kubeconfig)]
    code = await asyncio.to_thread(main.main, [*argv, "--timeout", str(timeout), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def deploy_while(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], play: Coroutine[Any, Any, Any], *extra: str, **options: Any
) -> tuple[int, str, str, Any]:
    """Run deploy while `play` acts as the controller; (exit code, stdout, stderr, what `play` returned)."""
    task = asyncio.create_task(play)
    code, out, err = await run_deploy(cluster, capsys, *extra, **options)
    if not task.done():
        task.cancel()
        pytest.fail(f"deploy ended (exit {code}) before the controller's part did:\n{err}")
    return code, out, err, task.result()


def rendered(overlay: str = OVERLAY, env: dict[str, str] | None = None) -> list[dict]:
    return k8s.render(k8s.OVERLAYS_DIR / overlay, image=IMAGE, env=env)


def writes(api: kmock.KubernetesEmulator) -> list[kmock.Request]:
    return [r for r in api if r.method in ("POST", "PATCH", "PUT", "DELETE")]


def live_server(api: kmock.KubernetesEmulator) -> dict:
    return api.objects[DEPLOYMENT].raw


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def polls(api: kmock.KubernetesEmulator) -> int:
    """How often deploy has read the Deployment (each rollout poll reads it once)."""
    return sum(1 for r in api if r.method == "GET" and r.resource and r.resource.plural == "deployments" and r.name)


# -- the Deployment controller and the kubelet, played by the tests ------------------------------


def waiting(reason: str, message: str = "", **extra: object) -> dict:
    container = {"name": "model-server", "ready": False, "state": {"waiting": {"reason": reason, "message": message}}}
    return {"phase": "Pending", "containerStatuses": [{**container, **extra}]}


def unschedulable(message: str) -> dict:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return {"phase": "Pending", "conditions": [condition]}


LOADING = {
    "phase": "Running",
    "containerStatuses": [
        {
            "name": "model-server",
            "ready": False,
            "started": False,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        }
    ],
}
READY = {
    "phase": "Running",
    "conditions": [{"type": "Ready", "status": "True"}],
    "containerStatuses": [{"name": "model-server", "ready": True, "state": {"running": {}}}],
}


class Controller:
    """ReplicaSets and pods as the Deployment controller and kubelet make them (owner references,
    pod-template-hash, revision annotations), and the Deployment's status."""

    def __init__(self, api: kmock.KubernetesEmulator) -> None:
        self.api = api
        self.revision = 0
        self.observed = 0  # the Deployment generation of the newest ReplicaSet

    async def new_spec(self) -> None:
        """Until deploy has applied a Deployment spec the controller has not observed yet."""
        await until(
            lambda: (
                DEPLOYMENT in self.api.objects
                and not self.api.objects[DEPLOYMENT].deleted
                and self.api.objects[DEPLOYMENT]["metadata"]["generation"] > self.observed
            )
        )

    async def polled(self, times: int) -> None:
        """Until deploy has looked at the rollout `times` more times."""
        start = polls(self.api)
        await until(lambda: polls(self.api) >= start + times)

    def supersede(self) -> None:
        """A newer Deployment spec than the one the current ReplicaSet runs (as after another apply)."""
        self.api.objects[DEPLOYMENT].patch({"metadata": {"generation": self.observed + 1}})

    def new_replica_set(self) -> str:
        """The ReplicaSet of the Deployment's current spec: a new revision the controller has observed."""
        self.revision += 1
        deployment = self.api.objects[DEPLOYMENT]
        self.observed = deployment["metadata"]["generation"]
        template_hash = f"{self.revision}a2b3c{self.revision}"
        name = f"{k8s.SERVER_NAME}-{template_hash}"
        revision = {REVISION: str(self.revision)}
        deployment.patch(
            {
                "metadata": {"annotations": revision},
                "status": {"observedGeneration": deployment["metadata"]["generation"]},
            }
        )
        owner = {
            "kind": "Deployment",
            "name": k8s.SERVER_NAME,
            "uid": deployment["metadata"]["uid"],
            "controller": True,
        }
        self.api.objects["apps/v1/replicasets", NS, name] = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"rs-uid-{self.revision}",
                "labels": {**SELECTOR, TEMPLATE_HASH: template_hash},
                "annotations": revision,
                "ownerReferences": [owner],
            },
            "spec": {"template": copy.deepcopy(deployment.raw["spec"]["template"])},
        }
        return name

    def pod(self, replica_set: str, suffix: str, status: dict, terminating: bool = False) -> str:
        rs = self.api.objects["apps/v1/replicasets", NS, replica_set].raw
        name = f"{replica_set}-{suffix}"
        metadata = {
            "name": name,
            "namespace": NS,
            "labels": dict(rs["metadata"]["labels"]),
            "ownerReferences": [{"kind": "ReplicaSet", "name": replica_set, "uid": rs["metadata"]["uid"]}],
        }
        if terminating:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self.api.objects["v1/pods", NS, name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "status": status,
        }
        return name

    def set_pod(self, name: str, status: dict) -> None:
        self.api.objects["v1/pods", NS, name] = {**self.api.objects["v1/pods", NS, name].raw, "status": status}

    def status(self, replicas: int, updated: int, available: int) -> None:
        counts = {"replicas": replicas, "updatedReplicas": updated, "availableReplicas": available}
        self.api.objects[DEPLOYMENT].patch({"status": counts | {"readyReplicas": available}})

    def rolled_out(self) -> None:
        self.status(replicas=1, updated=1, available=1)

    def event(self, pod: str, reason: str, message: str) -> None:
        name = f"{pod}.{reason}"
        self.api.objects["v1/events", NS, name] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": NS},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS},
            "reason": reason,
            "message": message,
        }


async def roll_out_one_pod(cluster: Cluster, after_polls: int = 2) -> None:
    """The controller's part of a plain rollout: a ReplicaSet and its pod, ready after a few polls."""
    controller = cluster.controller
    await controller.new_spec()
    pod = controller.pod(controller.new_replica_set(), "x7k2p", LOADING)
    controller.status(replicas=1, updated=1, available=0)
    await controller.polled(after_polls)
    controller.set_pod(pod, READY)
    controller.rolled_out()


# -- applying ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_applies_every_object_with_server_side_apply_as_one_field_manager(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err, _ = await deploy_while(cluster, capsys, roll_out_one_pod(cluster))
    assert code == 0, err

    sent = writes(cluster.api)
    assert {r.method for r in sent} == {"PATCH"}  # creation too: no POST, whose Update entry would own fields
    for request, obj in zip(sent, sorted(rendered(), key=lambda o: o["kind"] != "PriorityClass"), strict=True):
        assert request.headers["Content-Type"] == kube_api.APPLY_PATCH
        assert request.params == {"fieldManager": kube_api.FIELD_MANAGER, "force": "true", "fieldValidation": "Strict"}
        assert f"/namespaces/{NS}/" in str(request.url.path)
        labels = {**obj["metadata"].get("labels", {}), deploy.MANAGED_BY: kube_api.FIELD_MANAGER}
        assert request.data == {**obj, "metadata": {**obj["metadata"], "namespace": NS, "labels": labels}}
    for key in [k for k in cluster.api.objects if k[1] == NS and k[0].plural not in ("secrets", "pods", "replicasets")]:
        fields = cluster.api.objects[key]["metadata"]["managedFields"]
        assert fields == [{"manager": kube_api.FIELD_MANAGER, "operation": "Apply"}], key

    assert (
        "deployment.apps/llm-server created" in out
        and "podmonitoring.monitoring.googleapis.com/llm-server created" in out
    )
    assert f"kubectl -n {NS} port-forward svc/llm-server 8080:8080" in out
    assert (
        "requests.post('http://127.0.0.1:8080/v1/models/model:predict', json={'prompt': 'What is a mistral?'})" in out
    )


@pytest.mark.asyncio
async def test_fields_the_next_overlay_drops_are_removed_from_the_live_objects(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """TP=4 then gke-a100 in one namespace: nothing of the TP=4 pod may survive (MPI env, 4 GPUs, 32Gi shm)."""
    for overlay in ("gke-a100x4-tp4", OVERLAY):
        code, _, err, _ = await deploy_while(cluster, capsys, roll_out_one_pod(cluster), overlay=overlay)
        assert code == 0, err
    template = live_server(cluster.api)["spec"]["template"]["spec"]
    (server,) = template["containers"]
    (wanted,) = [o for o in rendered() if o["kind"] == "Deployment"]
    assert [e["name"] for e in server["env"]] == [
        e["name"] for e in wanted["spec"]["template"]["spec"]["containers"][0]["env"]
    ]
    assert not any(e["name"].startswith("OMPI_") for e in server["env"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {v["name"]: v.get("emptyDir", {}).get("sizeLimit") for v in template["volumes"]}["dshm"] == "8Gi"
    managed = live_server(cluster.api)["metadata"]["managedFields"]
    assert managed == [{"manager": kube_api.FIELD_MANAGER, "operation": "Apply"}]


@pytest.mark.asyncio
async def test_prunes_what_the_render_no_longer_has_and_keeps_what_rollbacks_need(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = {deploy.MANAGED_BY: kube_api.FIELD_MANAGER}

    def put(resource: str, kind: str, name: str, labels: dict) -> None:
        api_version = resource.rsplit("/", 1)[0]
        metadata = {"name": name, "namespace": NS, "labels": labels}
        cluster.api.objects[resource, NS, name] = {"apiVersion": api_version, "kind": kind, "metadata": metadata}

    put("autoscaling/v2/horizontalpodautoscalers", "HorizontalPodAutoscaler", "llm-server", mine)  # component removed
    put("v1/configmaps", "ConfigMap", "llm-server-env-old1", mine)  # settings of a revision the RS history dropped
    put("v1/configmaps", "ConfigMap", "llm-server-env-kept", mine)  # the previous revision's: rollback needs it
    put("v1/configmaps", "ConfigMap", "someone-elses", {})  # not deploy's
    put("v1/persistentvolumeclaims", "PersistentVolumeClaim", "llm-model-cache", mine)  # data: never pruned
    template = {
        "spec": {
            "containers": [{"name": "model-server", "envFrom": [{"configMapRef": {"name": "llm-server-env-kept"}}]}]
        }
    }
    cluster.api.objects["apps/v1/replicasets", NS, "llm-server-0old"] = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "llm-server-0old", "namespace": NS, "labels": SELECTOR},
        "spec": {"template": template},
    }
    code, out, err, _ = await deploy_while(cluster, capsys, roll_out_one_pod(cluster))
    assert code == 0, err

    deleted = sorted(str(r.url.path).rsplit("/", 2)[-2:][1] for r in writes(cluster.api) if r.method == "DELETE")
    assert deleted == ["llm-server", "llm-server-env-old1"]
    assert (
        "horizontalpodautoscaler.autoscaling/llm-server pruned" in out and "configmap/llm-server-env-old1 pruned" in out
    )
    remaining = {
        k[2] for k in cluster.api.objects if k[0].plural == "configmaps" and not cluster.api.objects[k].deleted
    }
    assert {"llm-server-env-kept", "someone-elses"} <= remaining
    assert not cluster.api.objects["v1/persistentvolumeclaims", NS, "llm-model-cache"].deleted


# -- refusing before anything is sent --------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_missing_namespace_is_named_as_such(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.api.objects["v1/namespaces", None, NS].delete()
    code, _, err = await run_deploy(cluster, capsys)
    assert code == 2
    assert f"namespace {NS} does not exist" in err and f"kubectl create namespace {NS}" in err
    assert "Secret" not in err and writes(cluster.api) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("policy/v1/poddisruptionbudgets", "policy/v1 PodDisruptionBudget (Kubernetes 1.21+ serves it"),
        ("monitoring.googleapis.com/v1/podmonitorings", "PodMonitoring (enable GKE Managed Service for Prometheus"),
    ],
)
async def test_apis_the_server_lacks_are_named_before_anything_is_applied(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], missing: str, named: str
) -> None:
    del cluster.api.resources[missing]
    code, _, err = await run_deploy(cluster, capsys)
    assert code == 2 and "does not serve" in err and named in err and "nothing was applied" in err
    assert writes(cluster.api) == []


@pytest.mark.asyncio
async def test_missing_secret_is_named_with_the_command_to_create_it(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.api.objects["v1/secrets", NS, k8s.HF_SECRET_NAME].delete()
    code, _, err = await run_deploy(cluster, capsys)
    assert code == 2
    assert f"Secret hf-token is missing in namespace {NS}" in err
    assert f"kubectl -n {NS} create secret generic hf-token --from-literal=hf_access_token=" in err
    assert writes(cluster.api) == []


@pytest.mark.asyncio
async def test_secret_without_the_key_is_named(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.api.objects["v1/secrets", NS, k8s.HF_SECRET_NAME] = secret(NS, {"token": "eA=="})
    code, _, err = await run_deploy(cluster, capsys)
    assert code == 2 and "has no key hf_access_token" in err
    assert writes(cluster.api) == []


def test_placeholders_are_refused_and_dry_run_prints_what_would_be_applied(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["deploy", "--overlay", OVERLAY, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "placeholder" in err and "change-me" in err and "--image" in err

    assert main.main(["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--dry-run"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == rendered()


@pytest.mark.parametrize("overlay", k8s.overlay_names())
def test_the_default_timeout_outlasts_the_progress_deadline(overlay: str) -> None:
    """deploy waits past progressDeadlineSeconds, so the controller's ProgressDeadlineExceeded is what it reports."""
    server = k8s.server_deployment(rendered(overlay))
    assert deploy.rollout_timeout(server, None) > server["spec"]["progressDeadlineSeconds"]
    assert deploy.rollout_timeout(server, 5.0) == 5.0


# -- the connection ------------------------------------------------------------------------------------


def test_no_kubeconfig_says_how_to_get_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--kubeconfig", str(tmp_path / "none")]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert "no usable kubeconfig" in err and "gcloud container clusters get-credentials" in err


def deploy_against(kubeconfig: Path) -> list[str]:
    return ["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--kubeconfig", str(kubeconfig)]


def test_a_refused_connection_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main.main(deploy_against(kubeconfig_for(tmp_path / "kubeconfig", "http://127.0.0.1:9"))) == 2
    err = capsys.readouterr().err
    assert "the Kubernetes API at http://127.0.0.1:9 does not answer (2 tries" in err and "Connection refused" in err


@pytest.fixture
def self_signed_https(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 whose certificate no kubeconfig CA signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_certificate_that_does_not_verify_is_named(
    self_signed_https: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main.main(deploy_against(kubeconfig_for(tmp_path / "kubeconfig", self_signed_https))) == 2
    err = capsys.readouterr().err
    assert f"the Kubernetes API at {self_signed_https} answers, but its TLS certificate does not verify" in err
    assert "does not answer" not in err and "get-credentials" in err


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server that accepts every connection and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for connection in accepted:
        connection.close()


def test_a_server_that_never_answers_fails_after_a_bounded_retry(
    silent_server: tuple[str, list[socket.socket]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, accepted = silent_server
    monkeypatch.setattr(kube_api, "READ_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert main.main(deploy_against(kubeconfig_for(tmp_path / "kubeconfig", url))) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert f"the Kubernetes API at {url} accepted the connection but sent no answer within 0.5s (2 tries)" in err
    assert len(accepted) == 1 + kube_api.READ_RETRIES  # one GET, retried once, then given up
    assert elapsed < 5  # render (~1 s) + 2 x 0.5 s + backoff; the old client took 4 x 30 s


# -- the rollout --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pods_of_older_replicasets_and_terminating_pods_do_not_count(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash-looping pod of the previous attempt and a Terminating pod with a pull error are not this rollout."""
    controller = cluster.controller

    async def play() -> None:
        await controller.new_spec()
        old = controller.new_replica_set()
        controller.pod(
            old,
            "old11",
            waiting(
                "CrashLoopBackOff", lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}}, restartCount=9
            ),
        )
        controller.supersede()
        new = controller.new_replica_set()
        controller.pod(new, "gone1", waiting("ImagePullBackOff", "Back-off pulling image"), terminating=True)
        pod = controller.pod(new, "x7k2p", LOADING)
        controller.status(replicas=2, updated=1, available=0)
        await controller.polled(3)
        controller.set_pod(pod, READY)
        cluster.api.objects["v1/pods", NS, f"{old}-old11"].delete()
        controller.rolled_out()

    code, _, err, _ = await deploy_while(cluster, capsys, play())
    assert code == 0, err
    assert "crash loop" not in err and "image pull" not in err
    assert "pod llm-server-2a2b3c2-x7k2p: loading" in err


@pytest.mark.asyncio
async def test_progress_counts_new_ready_pods_only_and_ends_on_the_final_state(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling update with the old pod still serving starts at 0/1, not 1/1, and ends at 1/1 rolled out."""
    controller = cluster.controller

    async def play() -> None:
        await controller.new_spec()
        old = controller.pod(controller.new_replica_set(), "old11", READY)
        controller.supersede()
        pod = controller.pod(controller.new_replica_set(), "x7k2p", LOADING)
        controller.status(replicas=2, updated=1, available=1)  # available: the old pod
        await controller.polled(3)
        controller.set_pod(pod, READY)
        controller.status(replicas=2, updated=1, available=2)  # the old pod is still terminating
        await controller.polled(3)
        cluster.api.objects["v1/pods", NS, old].delete()
        controller.rolled_out()

    code, _, err, _ = await deploy_while(cluster, capsys, play())
    assert code == 0, err
    lines = [line.split("deployment/llm-server: ", 1)[1] for line in err.splitlines() if "s] deployment/" in line]
    assert lines[-3:] == [
        "0/1 new pods ready; pod llm-server-2a2b3c2-x7k2p: loading (model loading)",
        "1/1 new pods ready; 1 old pod(s) still terminating",
        "1/1 new pods ready: rolled out",
    ]
    assert "1/1" not in "".join(lines[:-2])


UNSCHEDULABLE_CPU = "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {pool: system}."
STALLS = {
    "no free GPU": (
        unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."),
        ["unschedulable", "3 node(s): Insufficient nvidia.com/gpu (no free GPU there", "not ready after"],
    ),
    "storage, not GPUs": (
        unschedulable("0/3 nodes are available: 1 Insufficient ephemeral-storage, 2 Insufficient nvidia.com/gpu."),
        [
            "1 node(s): Insufficient ephemeral-storage (the pod requests 22Gi of ephemeral storage",
            "2 node(s): Insufficient nvidia.com/gpu (no free GPU there",
        ],
    ),
    "cpu, not GPUs": (
        unschedulable(UNSCHEDULABLE_CPU),
        ["1 node(s): Insufficient cpu (the pod requests cpu 8,", "2 node(s): had untolerated taint {pool: system}"],
    ),
    "no GPU node matches": (
        unschedulable("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."),
        ["unschedulable", "nvidia-tesla-a100", "do not carry the overlay's nodeSelector"],
    ),
    "image pull": (
        waiting("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'),
        ["image pull", "ImagePullBackOff: Failed to pull image", "manifest unknown", "artifactregistry.reader"],
    ),
    "crash loop": (
        waiting("CrashLoopBackOff", lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}}, restartCount=4),
        ["crash loop", "exit code 137 (OOMKilled), 4 restarts", "raise the memory limit"],
    ),
    "probe failures": (LOADING, ["probe failures", "Startup probe failed: HTTP probe failed with statuscode: 503"]),
}
PULL_ERROR = f'Failed to pull image "{IMAGE}": rpc error: code = NotFound desc = manifest unknown'


async def stall_with(cluster: Cluster, status: dict) -> str:
    controller = cluster.controller
    await controller.new_spec()
    pod = controller.pod(controller.new_replica_set(), "x7k2p", status)
    controller.event(pod, "Unhealthy", "Startup probe failed: HTTP probe failed with statuscode: 503")
    controller.event(pod, "Failed", PULL_ERROR)
    controller.status(replicas=1, updated=1, available=0)
    return pod


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "named"), STALLS.values(), ids=STALLS.keys())
async def test_a_stalled_rollout_names_the_pod_its_condition_and_the_cause(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], status: dict, named: list[str]
) -> None:
    code, out, err, pod = await deploy_while(cluster, capsys, stall_with(cluster, status), timeout=1)
    assert code == 2
    for text in named:
        assert text in err
    assert f"deployment/llm-server in namespace {NS} (0/1 new pods ready): pod {pod}:" in err
    if "Insufficient nvidia.com/gpu" not in status.get("conditions", [{}])[0].get("message", ""):
        assert "no free GPU" not in err
    assert "port-forward" not in out


@pytest.mark.asyncio
@pytest.mark.parametrize("stall", ["image pull", "crash loop"])
async def test_hopeless_states_fail_without_waiting_for_the_timeout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], stall: str
) -> None:
    task = asyncio.create_task(stall_with(cluster, STALLS[stall][0]))
    started = time.monotonic()
    code, _, err = await run_deploy(cluster, capsys, timeout=60)
    await task
    assert code == 2 and stall in err and "not ready after" not in err
    assert time.monotonic() - started < 30


BAD_IMAGE = IMAGE.replace(":v1", ":v1-never-pushed")
BAD_PULL = f'Failed to pull image "{BAD_IMAGE}": rpc error: code = NotFound desc = manifest unknown'


async def bad_image_rollout(cluster: Cluster) -> str:
    """The kubelet's view of a tag that was never pushed: ErrImagePull, then back-off."""
    controller = cluster.controller
    await controller.new_spec()
    pod = controller.pod(controller.new_replica_set(), "bad01", waiting("ErrImagePull", BAD_PULL))
    controller.status(replicas=1, updated=1, available=0)
    await controller.polled(2)
    controller.event(pod, "Failed", BAD_PULL)
    controller.set_pod(pod, waiting("ImagePullBackOff", f'Back-off pulling image "{BAD_IMAGE}"'))
    return pod


async def fixed_image_rollout(cluster: Cluster, bad: str) -> str:
    """The controller replaces the bad pod by one of the new ReplicaSet, which loads and gets ready."""
    controller = cluster.controller
    await controller.new_spec()  # deploy applied the new image
    pod = controller.pod(controller.new_replica_set(), "good1", LOADING)
    cluster.api.objects["v1/pods", NS, bad].patch({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    controller.status(replicas=2, updated=1, available=0)
    await controller.polled(2)
    controller.set_pod(pod, READY)
    cluster.api.objects["v1/pods", NS, bad].delete()
    controller.rolled_out()
    return pod


@pytest.mark.asyncio
async def test_deploy_fails_on_a_bad_image_then_rolls_out_the_fixed_one(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sequence a user sees: a tag that was never pushed, then the right one; each run names the right pod."""
    code, _, err, bad = await deploy_while(cluster, capsys, bad_image_rollout(cluster), image=BAD_IMAGE)
    assert code == 2 and f"pod {bad}: image pull: ImagePullBackOff: {BAD_PULL}" in err

    code, out, err, good = await deploy_while(cluster, capsys, fixed_image_rollout(cluster, bad))
    assert code == 0, err
    assert f"pod {good}: loading" in err and "1/1 new pods ready: rolled out" in err
    assert bad not in err and "image pull" not in err
    assert "deployment.apps/llm-server configured" in out
