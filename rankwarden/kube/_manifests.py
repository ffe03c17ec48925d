"""The Pod and Service objects the pod launcher creates: plain functions, plain dicts.

Names. A pod is ``<job>-a<attempt>-r<rank>``: two attempts never share a name,
so a new attempt never waits for the old pod's name to be free. Every pod of a
job has ``hostname: rank-<n>`` and ``subdomain: <service>``, so with the
job's headless Service it resolves as ``rank-<n>.<service>.<ns>.svc.<domain>``
across attempts: ``MASTER_ADDR`` is rank 0's name, stable, not an IP.
Names longer than a DNS label (63) are cut and given a hash, so they stay unique.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from rankwarden.launcher import LaunchRequest

__all__ = [
    "CONTAINER",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_RANK",
    "MANAGED_BY",
    "PodOptions",
    "master_addr",
    "pod_manifest",
    "pod_name",
    "service_manifest",
    "service_name",
]

LABEL_JOB = "rankwarden.dev/job"
LABEL_RANK = "rankwarden.dev/rank"
LABEL_ATTEMPT = "rankwarden.dev/attempt"
MANAGED_BY = ("app.kubernetes.io/managed-by", "rankwarden")
CONTAINER = "rank"
#: Where the coordinator copies the pod's output: found again when a new coordinator adopts the pod.
LOG_ANNOTATION = "rankwarden.dev/log"
MASTER_PORT = 29500


@dataclass(frozen=True)
class PodOptions:
    """How the launcher dresses every rank pod; the job spec adds image and resources."""

    namespace: str = "default"
    #: Used when the job spec names no image.
    image: str = ""
    image_pull_policy: str = "IfNotPresent"
    #: The ranks' ServiceAccount (k8s/base/serviceaccounts.yaml); its token is never mounted.
    service_account: str = "rankwarden-rank"
    run_as_user: int = 1000
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    #: Size of the in-memory /dev/shm (DataLoader workers and NCCL need more than 64 MiB).
    shm_size: str = "2Gi"
    cluster_domain: str = "cluster.local"
    #: Extra labels on every pod (cost centre, team...).
    labels: dict[str, str] = field(default_factory=dict)
    #: ConfigMaps and Secrets whose keys become every rank's environment
    #: (S3 endpoint and credentials): ``[("configmap", name), ("secret", name)]``.
    #: The kubelet reads them, so the coordinator needs no access to Secrets.
    env_from: list[tuple[str, str]] = field(default_factory=list)


def dns_label(name: str, prefix: str = "") -> str:
    """``prefix + name`` as a DNS-1035 label: <= 63 chars, starts with a letter.

    Too long: cut, and a hash of the whole name appended, so names stay unique."""
    full = re.sub(r"[^a-z0-9-]", "-", (prefix + name).lower()).strip("-")
    if not full or not full[0].isalpha():
        full = "rw-" + full
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[:54].rstrip('-')}-{digest}"


def pod_name(job_id: str, attempt: int, rank: int) -> str:
    return dns_label(f"{job_id}-a{attempt}-r{rank}")


def service_name(job_id: str) -> str:
    return dns_label(job_id, prefix="rw-")


def master_addr(job_id: str, options: PodOptions) -> str:
    return f"rank-0.{service_name(job_id)}.{options.namespace}.svc.{options.cluster_domain}"


def job_labels(job_id: str) -> dict[str, str]:
    return {MANAGED_BY[0]: MANAGED_BY[1], LABEL_JOB: job_id}


def pod_manifest(request: LaunchRequest, options: PodOptions, *, grace_seconds: float = 30.0) -> dict[str, Any]:
    image = request.image or options.image
    if not image:
        from rankwarden.errors import LaunchError

        raise LaunchError(
            f"job {request.job_id} has no image: set `image` in the job spec or give the pod launcher a default"
        )
    labels = {
        **options.labels,
        **job_labels(request.job_id),
        LABEL_RANK: str(request.rank),
        LABEL_ATTEMPT: str(request.attempt),
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": options.image_pull_policy,
        "command": list(request.argv),
        "env": [{"name": key, "value": value} for key, value in sorted(request.env.items())],
        "ports": [{"name": "master", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if options.env_from:
        container["envFrom"] = [
            {"configMapRef" if kind == "configmap" else "secretRef": {"name": name, "optional": True}}
            for kind, name in options.env_from
        ]
    if request.cwd:
        container["workingDir"] = request.cwd
    resources = _resources(request)
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {
        # The coordinator owns restarts: a pod that ends stays ended.
        "restartPolicy": "Never",
        "serviceAccountName": options.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostname": f"rank-{request.rank}",
        "subdomain": service_name(request.job_id),
        "terminationGracePeriodSeconds": max(1, math.ceil(grace_seconds)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_user,
            "fsGroup": options.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
        ],
    }
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = [dict(t) for t in options.tolerations]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(request.job_id, request.attempt, request.rank),
            "namespace": options.namespace,
            "labels": labels,
            "annotations": {LOG_ANNOTATION: request.stdout_path},
        },
        "spec": spec,
    }


def _resources(request: LaunchRequest) -> dict[str, Any]:
    # Requests equal limits: a training rank should be Guaranteed QoS, the last to be evicted.
    limits: dict[str, str] = {}
    if request.resources.cpu:
        limits["cpu"] = request.resources.cpu
    if request.resources.memory:
        limits["memory"] = request.resources.memory
    if request.resources.gpu:
        limits["nvidia.com/gpu"] = str(request.resources.gpu)
    if not limits:
        return {}
    return {"requests": dict(limits), "limits": limits}


def service_manifest(job_id: str, options: PodOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(job_id), "namespace": options.namespace, "labels": job_labels(job_id)},
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is Ready (it has no readiness
            # probe; the other ranks connect to it while it starts).
            "publishNotReadyAddresses": True,
            "selector": job_labels(job_id),
            "ports": [{"name": "master", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }
