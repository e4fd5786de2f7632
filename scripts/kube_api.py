"""The Kubernetes API as `deploy` uses it: generic requests by apiVersion/kind, short timeouts, one-line errors.

    api = KubeApi.connect(kubeconfig=None, context=None)       # the kubeconfig's cluster and namespace
    kinds = api.discover({("apps/v1", "Deployment"), ...})     # CliError naming what the server lacks
    api.apply(kinds["apps/v1", "Deployment"], "llm", body)     # server-side apply (creates or updates)

Requests go through the official client's ApiClient (its kubeconfig loading, auth plugins and TLS)
without its typed models, so any kind the server serves, custom resources included, is handled
the same way. Every request has a CONNECT_TIMEOUT_S / READ_TIMEOUT_S; reads (GET) are retried
READ_RETRIES times after a timeout or a dropped connection, writes never (urllib3's rule for
non-idempotent methods). A server that accepts connections and never answers therefore fails in
about (1 + READ_RETRIES) * READ_TIMEOUT_S seconds, with an error saying just that.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import config
from kubernetes.client import ApiClient, ApiException, Configuration
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.retry import Retry

from scripts.cli import CliError

FIELD_MANAGER = "llm-server-deploy"  # the one field manager of everything deploy applies
APPLY_PATCH = "application/apply-patch+yaml"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
READ_RETRIES = 1
GET_KUBECONFIG = "gcloud container clusters get-credentials CLUSTER --location LOCATION"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """One kind the API server serves, as its discovery document describes it."""

    api_version: str  # "apps/v1", "v1", "monitoring.googleapis.com/v1"
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str, name: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        scope = f"/namespaces/{namespace}" if self.namespaced else ""
        return f"{root}{scope}/{self.plural}" + (f"/{name}" if name else "")

    @property
    def kubectl_name(self) -> str:
        """kubectl's resource name: deployment.apps, configmap, podmonitoring.monitoring.googleapis.com."""
        group = self.api_version.rpartition("/")[0]
        return self.kind.lower() + (f".{group}" if group else "")


# Where a missing API usually comes from, for the error that names it.
API_HINTS = {
    "policy/v1": "Kubernetes 1.21+ serves it; these manifests need 1.30 or newer",
    "autoscaling/v2": "Kubernetes 1.23+ serves it; these manifests need 1.30 or newer",
    "monitoring.googleapis.com/v1": "enable GKE Managed Service for Prometheus "
    "(gcloud container clusters update CLUSTER --enable-managed-prometheus) or drop components/pod-monitoring",
    "monitoring.coreos.com/v1": "install prometheus-operator (kube-prometheus-stack) "
    "or drop components/service-monitor",
    "keda.sh/v1alpha1": "install KEDA (https://keda.sh/docs/deploy/) or drop components/keda",
}


class KubeApi:
    """Generic JSON requests against one cluster, every failure turned into a CliError."""

    def __init__(self, client: ApiClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace  # the kubeconfig context's namespace, else "default"

    @classmethod
    def connect(cls, kubeconfig: Path | None, context: str | None) -> KubeApi:
        """A client for the kubeconfig's (or --context's) cluster, with deploy's timeouts and retries."""
        path = str(kubeconfig) if kubeconfig else None
        configuration = Configuration()
        try:
            contexts, current = config.list_kube_config_contexts(config_file=path)
            config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration, persist_config=False
            )
        except (config.ConfigException, OSError) as exc:
            raise CliError(
                f"no usable kubeconfig ({exc}); point --kubeconfig or $KUBECONFIG at one, e.g. on GKE: {GET_KUBECONFIG}"
            ) from exc
        # status=0: an error status is an answer, reported as such, not retried.
        configuration.retries = Retry(
            total=None, connect=READ_RETRIES, read=READ_RETRIES, status=0, other=0, backoff_factor=0.5
        )
        chosen = next((c for c in contexts if c["name"] == context), current) if context else current
        return cls(ApiClient(configuration), (chosen or {}).get("context", {}).get("namespace") or "default")

    @property
    def host(self) -> str:
        return self.client.configuration.host

    # -- requests ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        action: str,
        query: Iterable[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Manifest]:
        """(HTTP status, JSON body); raises CliError naming `action` for anything but a 2xx answer."""
        with self.errors(action):
            serialized = self.client.param_serialize(
                method,
                path,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.client.call_api(*serialized, _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
            response.read()
            if not 200 <= response.status <= 299:
                raise ApiException.from_response(http_resp=response, body=response.data.decode(), data=None)
            return response.status, json.loads(response.data or b"{}")

    def get(self, path: str, action: str, **query: str) -> Manifest | None:
        """The object or list at `path`, or None if the server has none there (404)."""
        try:
            return self.request("GET", path, action, query=query.items())[1]
        except CliError as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                return None
            raise

    def list(self, resource: Resource, namespace: str, **selectors: str) -> list[Manifest]:
        """Items of `resource` in `namespace`; selectors: labelSelector=..., fieldSelector=..."""
        found = self.get(resource.path(namespace), f"list {resource.kubectl_name}", **selectors) or {}
        return found.get("items", [])

    def apply(self, resource: Resource, namespace: str, body: Manifest) -> bool:
        """Server-side apply `body` (created if absent; fields it no longer sets are removed). True if created."""
        name = body["metadata"]["name"]
        query = [("fieldManager", FIELD_MANAGER), ("force", "true"), ("fieldValidation", "Strict")]
        status, _ = self.request(
            "PATCH",
            resource.path(namespace, name),
            f"apply {resource.kubectl_name}/{name}",
            query=query,
            body=body,
            content_type=APPLY_PATCH,
        )
        return status == 201

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        self.request(
            "DELETE",
            resource.path(namespace, name),
            f"delete {resource.kubectl_name}/{name}",
            query=[("propagationPolicy", "Background")],
        )

    # -- discovery -----------------------------------------------------------------------------

    def discover(self, kinds: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Resource]:
        """Each (apiVersion, kind) as the server serves it; a CliError naming every one it does not serve."""
        wanted: dict[str, set[str]] = {}
        for api_version, kind in kinds:
            wanted.setdefault(api_version, set()).add(kind)
        found, missing = {}, []
        for api_version, names in sorted(wanted.items()):
            root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = self.get(root, f"read the API server's {api_version} discovery document")
            served = {
                r["kind"]: Resource(api_version, r["kind"], r["name"], r["namespaced"])
                for r in (listing or {}).get("resources", [])
                if "/" not in r["name"]  # subresources (deployments/scale) name the parent's kind too
            }
            for kind in sorted(names):
                if kind in served:
                    found[api_version, kind] = served[kind]
                else:
                    missing.append(
                        f"{api_version} {kind}" + (f" ({API_HINTS[api_version]})" if api_version in API_HINTS else "")
                    )
        if missing:
            raise CliError(
                f"the Kubernetes API at {self.host} does not serve {'; '.join(missing)}; nothing was applied"
            )
        return found

    def discover_optional(self, kinds: Iterable[tuple[str, str]]) -> list[Resource]:
        """Those of `kinds` the server serves (for pruning kinds an earlier deploy may have created)."""
        served = []
        for kind in kinds:
            with contextlib.suppress(CliError):
                served += self.discover([kind]).values()
        return served

    # -- errors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """The one place API failures become one-line errors, each transport failure named for what it is."""
        try:
            yield
        except ApiException as exc:
            raise CliError(f"cannot {action}: {exc.status} {exc.reason}: {api_message(exc)}") from exc
        except HTTPError as exc:
            raise CliError(f"cannot {action}: {self.transport_problem(exc)}") from exc

    def transport_problem(self, exc: HTTPError) -> str:
        reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
        tries = f"{1 + READ_RETRIES} tries" if isinstance(exc, MaxRetryError) else "1 try"
        if isinstance(reason, SSLError):
            verify = isinstance(reason.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(reason)
            what = (
                "its TLS certificate does not verify against the kubeconfig's certificate-authority"
                if verify
                else "TLS failed"
            )
            return (
                f"the Kubernetes API at {self.host} answers, but {what} ({reason}); fetch fresh credentials "
                f"({GET_KUBECONFIG}) or fix the kubeconfig's cluster entry"
            )
        if isinstance(reason, ReadTimeoutError):
            return (
                f"the Kubernetes API at {self.host} accepted the connection but sent no answer within "
                f"{READ_TIMEOUT_S:g}s ({tries}); the control plane may be overloaded or the address may be a proxy"
            )
        if isinstance(reason, ConnectTimeoutError | NewConnectionError):
            return (
                f"the Kubernetes API at {self.host} does not answer ({tries}, {CONNECT_TIMEOUT_S:g}s each: {reason}); "
                "is the cluster running, and may this machine reach it (VPN, authorized networks)?"
            )
        if isinstance(reason, ProtocolError):
            return f"the Kubernetes API at {self.host} closed the connection ({reason})"
        return f"the Kubernetes API at {self.host} does not answer ({reason})"


def api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body or "").strip()
