"""`python main.py deploy` against an in-memory Kubernetes API (kmock's emulator over real HTTP).

The kubernetes client runs in a thread, as in production; the emulator records every request, so
the tests assert exactly what was created or patched, and that each way a rollout stalls is named.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from pathlib import Path

import kmock
import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from kubernetes.client import ApiClient

import main
from scripts import deploy
from scripts import k8s_manifests as k8s
from tests.unit.kubectl_setup import ensure_kubectl

OVERLAY = "gke-a100"
IMAGE = "us-docker.pkg.dev/my-project/llm/llm-trtllm-server:v1"
NS = "llm"  # the kubeconfig context's namespace
DEPLOYMENT = ("apps/v1/deployments", NS, k8s.SERVER_NAME)
ROLLED_OUT = {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}
POD_NAME = "llm-server-6d4cf56db6-x7k2p"


@pytest.fixture(scope="module", autouse=True)
def kubectl() -> str:
    return ensure_kubectl()  # deploy renders the overlay with it


@dataclass(frozen=True)
class Cluster:
    api: kmock.KubernetesEmulator
    kubeconfig: Path


@pytest_asyncio.fixture
async def cluster(kmock: kmock.KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """An empty namespace holding only the Hugging Face token Secret, and a kubeconfig pointing at it."""
    monkeypatch.setattr(deploy, "POLL_S", 0.02)
    for plural, kind in (("pods", "Pod"), ("events", "Event")):  # listable before any exists
        kmock.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True)
    token = base64.b64encode(b"hf_secret_value").decode()
    kmock.objects["v1/secrets", NS, k8s.HF_SECRET_NAME] = secret(NS, {k8s.HF_SECRET_KEY: token})
    context = {"cluster": "kmock", "user": "tester", "namespace": NS}
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": context}],
        "current-context": "test",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    return Cluster(kmock, path)


def secret(namespace: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": k8s.HF_SECRET_NAME, "namespace": namespace},
        "data": data,
    }


async def run_deploy(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], *extra: str, timeout: float = 10
) -> tuple[int, str, str]:
    """`python main.py deploy ...` in a worker thread, so the emulator keeps serving on this loop."""
    argv = ["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--kubeconfig", str(cluster.kubeconfig)]
    code = await asyncio.to_thread(main.main, [*argv, "--timeout", str(timeout), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_objects(namespace: str, env: dict[str, str] | None = None) -> list[dict]:
    """What `deploy` must send: the rendered overlay with the image (and env), in the target namespace."""
    objects = k8s.render(k8s.OVERLAYS_DIR / OVERLAY, image=IMAGE, env=env)
    return [deploy.api_body(o, namespace) for o in objects]


def writes(api: kmock.KubernetesEmulator) -> list[kmock.Request]:
    return [r for r in api if r.method in ("POST", "PATCH", "PUT", "DELETE")]


def server_pod(status: dict) -> dict:
    labels = {"app.kubernetes.io/name": k8s.SERVER_NAME}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": NS, "labels": labels},
        "status": status,
    }


def waiting(reason: str, message: str = "", **extra: object) -> dict:
    container = {"name": "model-server", "ready": False, "state": {"waiting": {"reason": reason, "message": message}}}
    return {"phase": "Pending", "containerStatuses": [{**container, **extra}]}


def unschedulable(message: str) -> dict:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return {"phase": "Pending", "conditions": [condition]}


def deployment_reads(api: kmock.KubernetesEmulator) -> list[kmock.Request]:
    return [r for r in api if r.method == "GET" and r.resource and r.resource.plural == "deployments"]


async def mark_rolled_out(api: kmock.KubernetesEmulator, after_reads: int = 3) -> None:
    """Play the Deployment controller: once deploy created the Deployment and polled it a few times, finish."""
    while len(deployment_reads(api)) < after_reads:
        await asyncio.sleep(0.01)
    api.objects[DEPLOYMENT].patch({"status": ROLLED_OUT})


# -- what deploy sends ---------------------------------------------------------------------------------


def test_api_body_only_sets_the_namespace_and_writes_quantities_as_strings() -> None:
    (rendered,) = [o for o in k8s.render(k8s.OVERLAYS_DIR / OVERLAY, image=IMAGE) if o["kind"] == "Deployment"]
    body = deploy.api_body(rendered, NS)
    assert body["metadata"]["namespace"] == NS and "namespace" not in rendered["metadata"]
    resources = body["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["cpu"] == "8"
    resources_rendered = rendered["spec"]["template"]["spec"]["containers"][0]["resources"]
    resources_rendered["limits"]["nvidia.com/gpu"] = resources_rendered["requests"]["nvidia.com/gpu"] = "1"
    assert body == {**rendered, "metadata": {**rendered["metadata"], "namespace": NS}}


@pytest.mark.parametrize("overlay", k8s.overlay_names())
def test_every_object_survives_the_client_s_typed_models_unchanged(overlay: str) -> None:
    """The client turns each create body into its pydantic model and back; nothing may be lost or refused."""
    objects = k8s.render(k8s.OVERLAYS_DIR / overlay, image=IMAGE)
    objects += [yaml.safe_load((k8s.K8S_DIR / "components" / "hpa" / "hpa.yaml").read_text())]
    assert {(o["apiVersion"], o["kind"]) for o in objects} <= set(deploy.API_KINDS)
    serializer = ApiClient()
    for obj in objects:
        body = deploy.api_body(obj, NS)
        model = getattr(client, obj["apiVersion"].rpartition("/")[2].capitalize() + obj["kind"])
        assert serializer.sanitize_for_serialization(model.model_validate(body)) == body


# -- applying -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_creates_every_object_then_waits_for_the_rollout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    controller = asyncio.create_task(mark_rolled_out(cluster.api))
    code, out, err = await run_deploy(cluster, capsys)
    await controller
    assert code == 0, err

    sent = writes(cluster.api)
    assert [r.method for r in sent] == ["POST"] * len(sent)
    assert [r.data for r in sent] == expected_objects(NS)
    assert {r.params["fieldManager"] for r in sent} == {deploy.FIELD_MANAGER}
    assert {str(r.url.path).split("/namespaces/")[1].split("/")[0] for r in sent} == {NS}
    assert len(deployment_reads(cluster.api)) >= 4  # it kept polling until the rollout was done

    assert "deployment.apps/llm-server created" in out and "poddisruptionbudget.policy/llm-server created" in out
    assert f"kubectl -n {NS} port-forward svc/llm-server 8080:8080" in out
    assert (
        "requests.post('http://127.0.0.1:8080/v1/models/model:predict', json={'prompt': 'What is a mistral?'})" in out
    )


@pytest.mark.asyncio
async def test_patches_what_exists_with_server_side_apply(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = "serving"
    cluster.api.objects["v1/secrets", namespace, k8s.HF_SECRET_NAME] = secret(namespace, {k8s.HF_SECRET_KEY: "eA=="})
    for obj in expected_objects(namespace):
        plural = {
            "ConfigMap": "configmaps",
            "Service": "services",
            "Deployment": "deployments",
            "PodDisruptionBudget": "poddisruptionbudgets",
        }[obj["kind"]]
        resource = f"{obj['apiVersion']}/{plural}"
        live = {**obj, "status": ROLLED_OUT} if obj["kind"] == "Deployment" else obj
        cluster.api.objects[resource, namespace, obj["metadata"]["name"]] = live

    code, out, err = await run_deploy(cluster, capsys, "--namespace", namespace, "--env", "LLM_REVISION=v2")
    assert code == 0, err

    sent = writes(cluster.api)
    assert [r.method for r in sent] == ["POST", "PATCH", "PATCH", "PATCH"]  # the ConfigMap's new hash is new
    assert [r.data for r in sent] == expected_objects(namespace, env={"LLM_REVISION": "v2"})
    assert sent[0].data["kind"] == "ConfigMap" and sent[0].data["data"]["LLM_REVISION"] == "v2"
    for request in sent[1:]:
        assert request.headers["Content-Type"] == deploy.APPLY_PATCH
        assert request.params == {"fieldManager": deploy.FIELD_MANAGER, "force": "true"}
    patched = {r.data["kind"]: r.data for r in sent[1:]}
    envfrom = patched["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert envfrom == [{"configMapRef": {"name": sent[0].data["metadata"]["name"]}}]  # pods roll to the new config
    assert "deployment.apps/llm-server configured" in out and f"-n {namespace} port-forward" in out


# -- refusing before anything is sent ----------------------------------------------------------------------


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


def test_no_kubeconfig_says_how_to_get_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--kubeconfig", str(tmp_path / "none")]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert "no usable kubeconfig" in err and "gcloud container clusters get-credentials" in err


def test_unreachable_api_server_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kubeconfig = {
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    argv = ["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--kubeconfig", str(tmp_path / "kubeconfig")]
    assert main.main(argv) == 2
    assert "the Kubernetes API at http://127.0.0.1:9 does not answer" in capsys.readouterr().err


def test_placeholders_are_refused_and_dry_run_prints_what_would_be_applied(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main.main(["deploy", "--overlay", OVERLAY, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "placeholder" in err and "change-me" in err and "--image" in err

    assert main.main(["deploy", "--overlay", OVERLAY, "--image", IMAGE, "--dry-run"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == k8s.render(k8s.OVERLAYS_DIR / OVERLAY, image=IMAGE)


# -- a rollout that does not become ready ---------------------------------------------------------------


UNHEALTHY = {
    "apiVersion": "v1",
    "kind": "Event",
    "metadata": {"name": f"{POD_NAME}.1", "namespace": NS},
    "involvedObject": {"kind": "Pod", "name": POD_NAME, "namespace": NS},
    "reason": "Unhealthy",
    "message": "Startup probe failed: HTTP probe failed with statuscode: 503",
}
STALLS = {
    "no free GPU": (
        unschedulable("0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
        ["unschedulable", "Insufficient nvidia.com/gpu", "no node has a free GPU", "not ready after"],
    ),
    "no GPU node matches": (
        unschedulable("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."),
        ["unschedulable", "nvidia-tesla-a100", "does the overlay match your node pool"],
    ),
    "image pull": (
        waiting("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'),
        ["image pull", "ImagePullBackOff", "artifactregistry.reader"],
    ),
    "crash loop": (
        waiting("CrashLoopBackOff", lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}}, restartCount=4),
        ["crash loop", "exit code 137 (OOMKilled), 4 restarts", "raise the memory limit"],
    ),
    "probe failures": (
        {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "model-server",
                    "ready": False,
                    "started": False,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ],
        },
        ["probe failures", UNHEALTHY["message"], "logs deployment/llm-server"],
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "named"), STALLS.values(), ids=STALLS.keys())
async def test_a_stalled_rollout_names_its_condition(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], status: dict, named: list[str]
) -> None:
    cluster.api.objects["v1/pods", NS, POD_NAME] = server_pod(status)
    cluster.api.objects["v1/events", NS, UNHEALTHY["metadata"]["name"]] = UNHEALTHY
    code, out, err = await run_deploy(cluster, capsys, timeout=0.5)
    assert code == 2
    assert f"deployment/llm-server in namespace {NS} (0/1 ready)" in err
    for text in named:
        assert text in err
    assert "port-forward" not in out


@pytest.mark.asyncio
@pytest.mark.parametrize("stall", ["image pull", "crash loop"])
async def test_hopeless_states_fail_without_waiting_for_the_timeout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], stall: str
) -> None:
    cluster.api.objects["v1/pods", NS, POD_NAME] = server_pod(STALLS[stall][0])
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, _, err = await run_deploy(cluster, capsys, timeout=60)
    assert code == 2 and stall in err and "not ready after" not in err
    assert loop.time() - started < 30
