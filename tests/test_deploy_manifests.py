"""k8s/ and docker-compose.yml, checked offline: no cluster, no Docker daemon.

``kubectl kustomize`` renders the base and the GPU overlay; every rendered
object must pass ``kubernetes-validate --strict`` for the oldest Kubernetes
we support and the newest the validator bundles; the security properties the
README promises are asserted on the rendered objects; the compose file is
validated against the Compose specification's schema.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not a skip: a manifest check that silently does not run passes nothing.
        pytest.fail("kubectl (with its built-in kustomize) is needed to render k8s/: install it "
                    "(https://kubernetes.io/docs/tasks/tools/) and run the tests again", pytrace=False)
    out = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["k8s", "k8s/overlays/gpu"])
def objects(request) -> list[dict]:
    return render(request.param)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_validates_strictly(objects, version):
    assert len(objects) >= 10
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")


def test_rbac_is_namespaced_and_least_privilege(objects):
    assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
    (role,) = by_kind(objects, "Role")
    granted = {(verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    assert not any(res in ("secrets", "pods/exec", "pods/attach", "configmaps") or "*" in (verb, res)
                   for verb, res in granted)
    assert {verb for verb, res in granted if res == "pods/log"} == {"get"}
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rankwarden-coordinator", "namespace": "rankwarden"}]
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(objects, "ServiceAccount")}
    assert accounts["rankwarden-rank"]["automountServiceAccountToken"] is False


def test_coordinator_deployment_is_locked_down(objects):
    (deploy,) = by_kind(objects, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "rankwarden-coordinator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    token = next(e for e in container["env"] if e["name"] == "RANKWARDEN_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "rankwarden-api-token"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"] for pvc in by_kind(objects, "PersistentVolumeClaim")}
    # Rank pods run the coordinator's image (one image holds both).
    (config,) = by_kind(objects, "ConfigMap")
    assert config["data"]["RANKWARDEN_RANK_IMAGE"] == container["image"]
    assert config["data"]["RANKWARDEN_CHECKPOINT_ROOT"].startswith("s3://")


def test_gpu_overlay_targets_gpu_nodes():
    (deploy,) = by_kind(render("k8s/overlays/gpu"), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith("-cuda")
    assert "--rank-toleration=nvidia.com/gpu" in container["args"]
    assert any(a.startswith("--rank-node-selector=") for a in container["args"])


def test_the_role_the_simulator_enforces_is_the_one_deployed():
    (role,) = by_kind(render("k8s"), "Role")
    from tests.kube_sim import role_rules

    assert role_rules(ROOT / "k8s" / "base" / "rbac.yaml") == {
        (verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }


def test_docker_compose_file_validates_against_the_compose_spec():
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) >= {"api", "minio", "minio-bucket", "demo-job"}
    assert compose["services"]["api"]["ports"] == ["127.0.0.1:8000:8000"]  # loopback only


def test_compose_check_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  api:\n    image: x\n    ports: 8000\n    restart: sometimes\n")
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0


def test_strict_validation_catches_a_misspelled_field():
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "x", "image": "x", "imagePullPolicy": "IfNotPresent", "comand": ["x"]}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_no_known_token_ships_and_jobs_are_templates(objects):
    # Issue 12: no token in any shipped file; the server generates one (or a
    # Secret the operator creates provides it); jobs are templates, not globs.
    for path in ("docker-compose.yml", "Dockerfile", *map(str, (ROOT / "k8s").rglob("*.yaml"))):
        text = (ROOT / path).read_text()
        assert "demo-token" not in text and "change-me" not in text and "--allow=" not in text, path
    assert by_kind(objects, "Secret") == []
    (deploy,) = by_kind(objects, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--templates=/app/demo/templates.json" in container["args"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "--templates=/app/demo/templates.json" in compose["services"]["api"]["command"]
    assert "RANKWARDEN_API_TOKEN" not in compose["services"]["api"].get("environment", {})


def test_a_network_policy_guards_the_api_and_heartbeat_ports(objects):
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "coordinator"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules)  # no rule admits everyone
    api, heartbeats = rules
    assert api["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert heartbeats["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "rankwarden"}}}]


def test_the_shipped_template_refuses_what_the_demo_script_could_be_told(tmp_path):
    from rankwarden.api._templates import expand, load_templates
    from rankwarden.errors import ApiError

    templates = load_templates(ROOT / "demo" / "templates.json")
    demo = templates["demo-train"]
    job_dir = tmp_path / "job"
    assert expand(demo, "demo-train", {"epochs": 2, "final-weights": "model.pt"}, job_dir) == [
        "--data", "/app/data", "--epochs", "2", "--final-weights", str(job_dir / "outputs" / "model.pt")]
    for params in ({"final-weights": "/state/jobs.sqlite3"}, {"final-weights": "../../jobs.sqlite3"},
                   {"trace": "/etc/passwd"}, {"ckpt-url": "http://169.254.169.254/"}, {"epochs": 10**9}):
        with pytest.raises(ApiError):
            expand(demo, "demo-train", params, job_dir)
