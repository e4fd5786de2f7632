"""kmock's Kubernetes emulator plus server-side apply and field ownership, as the API server does them.

kmock merges every PATCH into the stored object and knows no field managers. `ApplyingEmulator`
follows the API server (k8s.io/apiserver's fieldmanager on structured-merge-diff) where `deploy`
depends on it:
- a PATCH with Content-Type application/apply-patch+yaml is server-side apply: it creates the
  object when there is none (201), else (200) sets the fields it sends and removes the fields
  the same manager applied before and sends no more, unless another manager also owns them;
- POST (create) and merge PATCHes record an `Update` entry for their manager owning every field
  they set; an Apply by the same manager name is a different entry, so it never removes those
  fields (why a deploy that creates with POST leaves stale fields behind);
- a field owned by another manager with a different value is a 409 conflict unless `force=true`,
  which takes it over;
- create sets metadata.uid and generation 1; a change of spec bumps generation (what a
  controller's status.observedGeneration is compared with); metadata.managedFields lists the
  (manager, operation) entries, without fieldsV1.
Field paths follow the merge keys of the types deploy applies: map keys, and list items keyed by
`name` when every item has one (containers, env, volumes, volumeMounts, ports); other lists are
atomic. Status and server-set metadata are nobody's fields.
kmock reads GET /api/v1/namespaces/NAME as the prefix of a namespaced path; the double serves the
Namespace objects stored under ("v1/namespaces", None, NAME) itself; lists honour equality
labelSelectors and fieldSelectors (`a=b,c=d`, dotted field paths), which kmock ignores.
"""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal.k8s import KubernetesError  # the emulator's own error type (rendered as a k8s Status)

APPLY_PATCH = "application/apply-patch+yaml"
NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)$")
SERVER_SET = ("managedFields", "uid", "generation", "resourceVersion", "creationTimestamp", "deletionTimestamp")

FieldPath = tuple[Any, ...]  # map keys (str) and ("name", value) for keyed list items


def flatten(node: Any, prefix: FieldPath = ()) -> dict[FieldPath, Any]:
    """Leaf field path -> value."""
    if isinstance(node, dict) and node:
        return {path: value for key, child in node.items() for path, value in flatten(child, (*prefix, key)).items()}
    if isinstance(node, list) and node and all(isinstance(item, dict) and "name" in item for item in node):
        return {
            path: value for item in node for path, value in flatten(item, (*prefix, ("name", item["name"]))).items()
        }
    return {prefix: node}


class _Items(dict):
    """A keyed list while it is being rebuilt: name -> item."""


def unflatten(flat: dict[FieldPath, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node: dict = root
        for i, segment in enumerate(path[:-1]):
            key = segment[1] if isinstance(segment, tuple) else segment
            node = node.setdefault(key, _Items() if isinstance(path[i + 1], tuple) else {})
        last = path[-1]
        node[last[1] if isinstance(last, tuple) else last] = copy.deepcopy(value)
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, _Items):
        return [_lists(item) for item in node.values()]
    if isinstance(node, dict):
        return {key: _lists(value) for key, value in node.items()}
    return node


def _owned_part(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without status and the metadata the server sets: what managers can own."""
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k not in SERVER_SET}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": metadata}


@attrs.define(kw_only=True)
class ApplyingEmulator(kmock.KubernetesEmulator):
    """The in-memory API server, with server-side apply and managed fields (see the module docstring)."""

    owners: dict[Any, dict[tuple[str, str], set[FieldPath]]] = attrs.field(factory=dict)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        namespace = NAMESPACE_PATH.match(request.url.path)
        if request.method == "GET" and namespace:
            key = (kmock.resource("v1/namespaces"), None, namespace[1])
            if key not in self.objects or self.objects[key].deleted:
                raise KubernetesError(status=404, reason="NotFound", message=f'namespaces "{namespace[1]}" not found')
            return aiohttp.web.json_response(self.objects[key].raw)
        if request.resource is not None and request.method == "PATCH" and content_type.startswith(APPLY_PATCH):
            return await self._apply(request)
        response = await super()._handle(request)
        if request.resource is not None and request.method in ("POST", "PATCH") and response.status < 300:
            name = request.name or request.data.get("metadata", {}).get("name")
            key = (request.resource, request.namespace or request.data.get("metadata", {}).get("namespace"), name)
            self._record_update(key, request.params.get("fieldManager", "unknown"), request.data)
        return response

    def _record_update(self, key: Any, manager: str, sent: dict[str, Any]) -> None:
        owners = self.owners.setdefault(key, {})
        owners.setdefault((manager, "Update"), set()).update(flatten(_owned_part(sent)))
        stored = self.objects[key]
        metadata = {"uid": stored.get("metadata", {}).get("uid") or str(uuid.uuid4())}
        metadata |= {"generation": stored.get("metadata", {}).get("generation", 1)}
        stored.patch({"metadata": metadata | {"managedFields": _entries(owners)}})

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        listing = await super()._serve_list(request)
        wanted = []
        for selector, prefix in (("labelSelector", "metadata.labels."), ("fieldSelector", "")):
            for term in filter(None, request.params.get(selector, "").split(",")):
                path, _, value = term.partition("=")
                wanted.append(((prefix + path).split("."), value))
        return {**listing, "items": [item for item in listing["items"] if all(_at(item, p) == v for p, v in wanted)]}

    async def _apply(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        manager, force = request.params["fieldManager"], request.params.get("force") == "true"
        exists = key in self.objects and not self.objects[key].deleted
        live = self.objects[key].raw if exists else {}
        if not exists:
            self.owners[key] = {}
        owners = self.owners.setdefault(key, {})
        sent, current = flatten(_owned_part(request.data)), flatten(_owned_part(live)) if exists else {}
        others = {path for owner, paths in owners.items() if owner != (manager, "Apply") for path in paths}
        conflicts = sorted(str(p) for p in sent.keys() & others if current.get(p) != sent[p])
        if conflicts and not force:
            raise KubernetesError(status=409, reason="Conflict", message=f"Apply failed with conflicts: {conflicts}")
        for path in owners.get((manager, "Apply"), set()) - sent.keys() - others:
            current.pop(path, None)  # applied before, not now, nobody else's: removed
        current.update(sent)
        for owner in owners:
            owners[owner] -= sent.keys()
        owners[(manager, "Apply")] = set(sent)
        result = unflatten(current)
        old_meta = live.get("metadata", {})
        generation = old_meta.get("generation", 0) + (not exists or live.get("spec") != result.get("spec"))
        server_meta = {"uid": old_meta.get("uid") or str(uuid.uuid4()), "generation": generation}
        result["metadata"] |= server_meta | {"managedFields": _entries(owners)}
        if "status" in live:
            result["status"] = live["status"]
        if exists:
            self.objects[key].delete()
            self.objects[key].create(result)
        else:
            self.objects[key] = result
        return aiohttp.web.json_response(result, status=200 if exists else 201)


def _at(obj: dict[str, Any], path: list[str]) -> Any:
    """The value at a dotted field path (label keys may contain dots: metadata.labels.<key>)."""
    if path[:2] == ["metadata", "labels"]:
        return obj.get("metadata", {}).get("labels", {}).get(".".join(path[2:]))
    for key in path:
        obj = obj.get(key, {}) if isinstance(obj, dict) else {}
    return obj if obj != {} else None


def _entries(owners: dict[tuple[str, str], set[FieldPath]]) -> list[dict[str, str]]:
    return [{"manager": m, "operation": op} for (m, op), paths in sorted(owners.items()) if paths]
