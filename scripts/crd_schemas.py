"""Strict JSON schemas for the custom resources in k8s/components, which kubernetes-validate lacks.

Each schema is the part of the upstream CRD's openAPIV3Schema that the components use, with the
field names, types, enums and required fields of these CRD versions:
- monitoring.googleapis.com/v1 PodMonitoring (GoogleCloudPlatform/prometheus-engine, charts/operator/crds);
- monitoring.coreos.com/v1 ServiceMonitor (prometheus-operator, example/prometheus-operator-crd);
- keda.sh/v1alpha1 ScaledObject and TriggerAuthentication (kedacore/keda, config/crd/bases).
Every object closes its properties (additionalProperties: false), as the API server's strict
field validation does: a typo fails. A field the components start to use must be added here from
the upstream CRD first.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
INT_OR_STRING: Schema = {"anyOf": [INT, STRING]}
STRING_MAP: Schema = {"type": "object", "additionalProperties": STRING}
# Prometheus durations, as both operators' CRDs spell them
DURATION: Schema = {
    "type": "string",
    "pattern": r"^((([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$",
}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def resource(spec: Schema) -> Schema:
    """A namespaced object: apiVersion, kind, metadata (checked by the API server itself) and spec."""
    return obj({"apiVersion": STRING, "kind": STRING, "metadata": {"type": "object"}, "spec": spec}, ("spec",))


LABEL_SELECTOR = obj(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": obj({"key": STRING, "operator": STRING, "values": {"type": "array", "items": STRING}}),
        },
    }
)
HPA_POLICIES = obj(
    {
        "stabilizationWindowSeconds": INT,
        "selectPolicy": STRING,
        "policies": {
            "type": "array",
            "items": obj({"type": STRING, "value": INT, "periodSeconds": INT}, ("type", "value", "periodSeconds")),
        },
    }
)

POD_MONITORING = resource(
    obj(
        {
            "selector": LABEL_SELECTOR,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "maxItems": 10,
                "items": obj(
                    {
                        "port": INT_OR_STRING,
                        "path": STRING,
                        "scheme": {"type": "string", "enum": ["http", "https"]},
                        "interval": DURATION,
                        "timeout": DURATION,
                        "params": {"type": "object", "additionalProperties": {"type": "array", "items": STRING}},
                    },
                    ("interval", "port"),
                ),
            },
            "targetLabels": obj(
                {
                    "metadata": {
                        "type": "array",
                        "items": {
                            "enum": [
                                "container",
                                "node",
                                "pod",
                                "top_level_controller_name",
                                "top_level_controller_type",
                            ]
                        },
                    },
                    "fromPod": {"type": "array", "items": obj({"from": STRING, "to": STRING}, ("from",))},
                }
            ),
            "filterRunning": BOOL,
        },
        ("endpoints", "selector"),
    )
)

SERVICE_MONITOR = resource(
    obj(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": obj({"any": BOOL, "matchNames": {"type": "array", "items": STRING}}),
            "jobLabel": STRING,
            "endpoints": {
                "type": "array",
                "items": obj(
                    {
                        "port": STRING,
                        "targetPort": INT_OR_STRING,
                        "path": STRING,
                        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": BOOL,
                    }
                ),
            },
        },
        ("selector",),
    )
)

SCALED_OBJECT = resource(
    obj(
        {
            "scaleTargetRef": obj({"apiVersion": STRING, "kind": STRING, "name": STRING}, ("name",)),
            "minReplicaCount": INT,
            "maxReplicaCount": INT,
            "pollingInterval": INT,
            "cooldownPeriod": INT,
            "advanced": obj(
                {
                    "restoreToOriginalReplicaCount": BOOL,
                    "horizontalPodAutoscalerConfig": obj(
                        {"name": STRING, "behavior": obj({"scaleUp": HPA_POLICIES, "scaleDown": HPA_POLICIES})}
                    ),
                }
            ),
            "triggers": {
                "type": "array",
                "items": obj(
                    {
                        "type": STRING,
                        "name": STRING,
                        "metadata": STRING_MAP,
                        "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
                        "authenticationRef": obj({"name": STRING, "kind": STRING}, ("name",)),
                    },
                    ("metadata", "type"),
                ),
            },
        },
        ("scaleTargetRef", "triggers"),
    )
)

TRIGGER_AUTHENTICATION = resource(
    obj(
        {
            "podIdentity": obj(
                {
                    "provider": {
                        "type": "string",
                        "enum": ["azure-workload", "gcp", "aws", "aws-eks", "none"],
                    },
                    "identityId": STRING,
                },
                ("provider",),
            )
        }
    )
)

SCHEMAS: dict[tuple[str, str], Schema] = {
    ("monitoring.googleapis.com/v1", "PodMonitoring"): POD_MONITORING,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
}
