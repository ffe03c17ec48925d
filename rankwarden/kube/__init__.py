"""Kubernetes: ranks as pods (``PodLauncher``), through the REST API with httpx.

Needs the ``kubernetes`` extra (httpx, PyYAML): ``pip install 'rankwarden[kubernetes]'``.
"""

from rankwarden.kube._api import KubeApi
from rankwarden.kube._config import KubeConfig
from rankwarden.kube._launcher import PodLauncher, PodProcess
from rankwarden.kube._manifests import PodOptions, master_addr, pod_manifest, pod_name, service_manifest, service_name

__all__ = [
    "KubeApi",
    "KubeConfig",
    "PodLauncher",
    "PodOptions",
    "PodProcess",
    "master_addr",
    "pod_manifest",
    "pod_name",
    "service_manifest",
    "service_name",
]
