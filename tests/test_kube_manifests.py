"""The Pod and Service objects the pod launcher builds (no server involved)."""

from __future__ import annotations

import pytest

from rankwarden import JobSpec
from rankwarden.coordinator._request import rank_argv, rank_env
from rankwarden.errors import LaunchError, SpecError
from rankwarden.kube import PodOptions, master_addr, pod_manifest, pod_name, service_manifest, service_name
from rankwarden.kube._manifests import dns_label
from rankwarden.launcher import LaunchRequest, Placement
from rankwarden.spec import Resources

OPTIONS = PodOptions(namespace="ml", image="registry.example/trainer:1", node_selector={"pool": "gpu"})


def request(spec: JobSpec, rank: int = 1, attempt: int = 3) -> LaunchRequest:
    placement = Placement(master_addr=master_addr(spec.job_id, OPTIONS), reconnect_grace=90.0)
    env = rank_env(spec, job_id=spec.job_id, rank=rank, attempt=attempt, master_port=29500,
                   coordinator="10.0.0.5:4000", token="tok", placement=placement)
    return LaunchRequest(job_id=spec.job_id, rank=rank, local_rank=0, attempt=attempt,
                         argv=rank_argv(spec, placement), env=env, stdout_path="/state/r.log",
                         stderr_path="/state/r.log", image=spec.image, resources=spec.resources)


def spec(**kw) -> JobSpec:
    return JobSpec(**{"entrypoint": "/app/train.py", "world_size": 4, "job_id": "resnet", **kw})


def test_pod_has_the_rank_env_labels_and_name():
    pod = pod_manifest(request(spec(env={"LR": "3e-4"})), OPTIONS)
    assert pod["metadata"]["name"] == "resnet-a3-r1" == pod_name("resnet", 3, 1)
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "rankwarden", "rankwarden.dev/job": "resnet",
        "rankwarden.dev/rank": "1", "rankwarden.dev/attempt": "3",
    }
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "0" and env["GROUP_RANK"] == "1"
    assert env["MASTER_ADDR"] == "rank-0.rw-resnet.ml.svc.cluster.local" and env["MASTER_PORT"] == "29500"
    assert env["RANKWARDEN_COORDINATOR"] == "10.0.0.5:4000" and env["RANKWARDEN_ATTEMPT"] == "3"
    assert env["RANKWARDEN_RECONNECT_GRACE"] == "90.0"  # pods outlive a restarting coordinator
    assert env["LR"] == "3e-4"
    assert "RANKWARDEN_COORDINATOR_PID" not in env and "PATH" not in env  # nothing of the coordinator's own
    assert container["command"][:3] == ["python", "-m", "rankwarden.worker._bootstrap"]
    assert container["command"][3:] == ["script", "/app/train.py"]
    assert container["image"] == "registry.example/trainer:1"
    # Stable DNS for rank 0 through the job's headless Service.
    assert pod["spec"]["hostname"] == "rank-1" and pod["spec"]["subdomain"] == "rw-resnet"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}


def test_pod_is_locked_down():
    pod = pod_manifest(request(spec()), OPTIONS)
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["serviceAccountName"] == "rankwarden-rank"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/tmp", "/dev/shm"}  # writable scratch and a real shared-memory size for DataLoader/NCCL


def test_resources_from_the_spec_are_requests_and_limits():
    pod = pod_manifest(request(spec(resources=Resources(cpu="7500m", memory="60Gi", gpu=2))), OPTIONS)
    resources = pod["spec"]["containers"][0]["resources"]
    expected = {"cpu": "7500m", "memory": "60Gi", "nvidia.com/gpu": "2"}
    assert resources == {"requests": expected, "limits": expected}
    assert "resources" not in pod_manifest(request(spec()), OPTIONS)["spec"]["containers"][0]


def test_image_comes_from_the_spec_first_and_is_required():
    assert pod_manifest(request(spec(image="mine:2")), OPTIONS)["spec"]["containers"][0]["image"] == "mine:2"
    with pytest.raises(LaunchError, match="has no image"):
        pod_manifest(request(spec()), PodOptions())


@pytest.mark.parametrize("field, value", [("cpu", "lots"), ("memory", "16 GB"), ("cpu", "-1")])
def test_bad_quantities_are_refused_naming_the_field(field, value):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict({"entrypoint": "x", "resources": {field: value}})
    assert info.value.path == f"$.resources.{field}"


def test_headless_service_publishes_not_ready_ranks():
    svc = service_manifest("resnet", OPTIONS)
    assert svc["metadata"]["name"] == "rw-resnet" == service_name("resnet")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"app.kubernetes.io/managed-by": "rankwarden", "rankwarden.dev/job": "resnet"}


def test_long_names_stay_valid_and_distinct():
    job = "a" * 63
    names = {pod_name(job, 1, r) for r in range(100)} | {pod_name(job, 2, 0)}
    assert len(names) == 101 and all(len(n) <= 63 for n in names)
    assert len(service_name(job)) <= 63 and service_name(job)[0].isalpha()
    assert dns_label("9lives") == "rw-9lives"  # Service names must start with a letter
