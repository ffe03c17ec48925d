"""PodLauncher against a simulated Kubernetes API server (tests/kube_sim.py).

"simulated": no cluster runs here. The simulator answers like the real API
server, enforces the Role in k8s/base/rbac.yaml on every call, and runs each
pod's command as a real local process, so real ranks heartbeat to a real
coordinator while the tests break pods the ways clusters do.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import pytest
import trio

from rankwarden import Backoff, Coordinator, JobSpec, JobState, run_job
from rankwarden.coordinator._request import free_port
from rankwarden.errors import KubernetesError
from rankwarden.events import AttemptStarted, FailureCause, RankConnected
from rankwarden.kube import KubeApi, KubeConfig, PodLauncher, pod_name, service_name
from rankwarden.kube._manifests import PodOptions
from tests.kube_sim import Rbac, SimKube, role_rules

pytest.importorskip("httpx")
pytest.importorskip("yaml")

# Each test here is about noticing a pod's end (or its deletion): a broken
# detector must fail it in seconds, not at the suite's default timeout.
pytestmark = pytest.mark.liveness

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
ROLE = BASE / "rbac.yaml"


@pytest.fixture
async def sim(tmp_path, nursery):
    """The simulator, with the Role and RoleBinding of the kustomize base: the tests
    run in the namespace it deploys to, as the ServiceAccount it binds."""
    workdir = tmp_path / "kubelet"
    workdir.mkdir()
    rbac = Rbac.from_kustomize(BASE)
    [(namespace, account)] = rbac.service_accounts()
    sim = SimKube(workdir, rbac=rbac, namespace=namespace, user=f"system:serviceaccount:{namespace}:{account}")
    await nursery.start(sim.serve)
    yield sim
    assert sim.leftover_processes() == []


def config(sim: SimKube, **changes) -> KubeConfig:
    return KubeConfig(**{"server": sim.url, "namespace": sim.namespace, "token": sim.token, **changes})


@asynccontextmanager
async def launcher_for(sim: SimKube, **kwargs):
    kwargs = {"image": "rankwarden:test", "force_delete_after": 1.0, **kwargs}
    async with PodLauncher.open(config(sim), **kwargs) as launcher:
        yield launcher


def job(tmp_path, script, name: str, *args: str, world_size: int = 2, **kwargs) -> JobSpec:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    fields = dict(
        entrypoint=script("worker.py"), args=["--record", str(record), *args], world_size=world_size,
        job_id=f"t-{name}", job_dir=str(tmp_path / "job"), python=sys.executable,
        heartbeat_timeout=2.0, kill_grace=1.0, stop_grace=2.0, max_restarts=2,
        backoff=Backoff(initial=0.05, jitter=0.0),
    )
    fields.update(kwargs)
    return JobSpec(**fields)


def created_pods(sim: SimKube) -> list[str]:
    return sorted(path.rsplit("/", 1)[-1] for verb, res, path, _ in sim.requests if verb == "create" and res == "pods")


async def wait_connected(coordinator: Coordinator, count: int, attempt: int = 1) -> None:
    with trio.fail_after(30):
        seen = 0
        async for event in coordinator.events():
            if isinstance(event, RankConnected) and event.attempt == attempt:
                seen += 1
                if seen == count:
                    return


async def test_simulated_job_runs_pods_and_cleans_up(sim, tmp_path, script, monkeypatch):
    monkeypatch.setenv("RW_COORDINATOR_SECRET", "must-not-reach-pods")
    spec = job(tmp_path, script, "ok", "--steps", "4")
    async with launcher_for(sim) as launcher:
        with trio.fail_after(30):
            snapshot = await run_job(spec, launcher=launcher)
    assert snapshot.state == JobState.SUCCEEDED
    assert created_pods(sim) == [pod_name("t-ok", 1, 0), pod_name("t-ok", 1, 1)]
    # Pods and the job's Service are deleted once the job is over.
    assert sim.pods() == {} and sim.services() == {}
    assert ("delete", "services", f"/api/v1/namespaces/{sim.namespace}/services/{service_name('t-ok')}", None) in sim.requests
    env = json.loads((tmp_path / "record" / "r1_a1.json").read_text())["env"]
    assert env["MASTER_ADDR"] == f"rank-0.{service_name('t-ok')}.{sim.namespace}.svc.cluster.local"
    assert (env["RANK"], env["LOCAL_RANK"], env["GROUP_RANK"], env["WORLD_SIZE"]) == ("1", "0", "1", "2")
    assert "RW_COORDINATOR_SECRET" not in env and "RANKWARDEN_COORDINATOR_PID" not in env
    # The pods' output reached the job directory, as a local rank's does.
    assert "rank 1 done after 4 steps" in (tmp_path / "job" / "attempt_001" / "rank_1.stdout").read_text()


@pytest.mark.parametrize("breaker, reason", [("oom_kill", "OOMKilled"), ("evict", "Evicted")])
async def test_simulated_broken_pod_restarts_the_group_with_new_pods(sim, tmp_path, script, breaker, reason):
    spec = job(tmp_path, script, "oom", "--until-file", str(tmp_path / "never"), "--steps", "3")
    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        coordinator = Coordinator(spec, launcher=launcher)
        await nursery.start(coordinator.run)
        await wait_connected(coordinator, 2)
        getattr(sim, breaker)(pod_name("t-oom", 1, 1))
        with trio.fail_after(30):
            snapshot = await coordinator.wait()
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    failure = snapshot.failures[0]
    assert (failure.rank, failure.attempt, failure.reason) == (1, 1, reason)
    assert failure.cause == FailureCause.EXITED and failure.exit_code == 137
    assert reason in failure.message
    assert created_pods(sim) == [pod_name("t-oom", a, r) for a in (1, 2) for r in (0, 1)]
    assert sim.pods() == {}


@pytest.mark.timeout(20)  # about 5 s; a launcher that never forces hangs in its shielded stop
async def test_simulated_pod_stuck_terminating_is_force_deleted(sim, tmp_path, script):
    spec = job(tmp_path, script, "stuck", "--until-file", str(tmp_path / "never"), "--steps", "3",
               heartbeat_timeout=1.5)
    stuck = pod_name("t-stuck", 1, 1)
    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        coordinator = Coordinator(spec, launcher=launcher)
        await nursery.start(coordinator.run)
        await wait_connected(coordinator, 2)
        sim.lose_node(stuck)
        with trio.fail_after(30):
            snapshot = await coordinator.wait()
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    assert snapshot.failures[0].cause == FailureCause.HEARTBEAT_TIMEOUT
    deletes = [grace for verb, res, path, grace in sim.requests if verb == "delete" and path.endswith("/" + stuck)]
    # A graceful delete (kill_grace), nothing happens, then a force delete.
    assert deletes[0] == 1 and deletes[-1] == 0


async def test_simulated_coordinator_restart_adopts_running_pods(sim, tmp_path, script):
    release = tmp_path / "release"
    spec = job(tmp_path, script, "adopt", "--until-file", str(release), "--steps", "3")
    token, port = "adopt-token", free_port("127.0.0.1")
    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        first = Coordinator(spec, launcher=launcher, token=token, heartbeat_port=port)
        await nursery.start(first.run)
        await wait_connected(first, 2)
        # The first coordinator has copied some of each log before it goes, so
        # "nothing doubles" below is about bytes really copied twice or not.
        copied = [tmp_path / "job" / "attempt_001" / f"rank_{r}.stdout" for r in (0, 1)]
        with trio.fail_after(20):
            while not all(p.exists() and f"rank {r} ready" in p.read_text() for r, p in enumerate(copied)):
                await trio.sleep(0.05)  # a file has no readiness to await
        launcher.detach()  # the coordinator is going away: leave its pods running
        nursery.cancel_scope.cancel()
    assert len(sim.pods()) == 2 and len(sim.leftover_processes()) == 2  # still running
    # Meanwhile the kubelet rotates both logs: the API's read of rank 0's log now
    # starts after everything copied so far, and rank 1's with its last line
    # copied (served again: it must not double).
    before = [p.read_bytes() for p in copied]
    sim.rotate_log(pod_name(spec.job_id, 1, 0), keep=0)
    sim.rotate_log(pod_name(spec.job_id, 1, 1), keep=1)
    assert all(p["status"]["phase"] == "Running" for p in sim.pods().values())
    creates_before = len(created_pods(sim))

    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        second = Coordinator(spec, launcher=launcher, token=token, heartbeat_port=port, adopt=True)
        await nursery.start(second.run)
        await wait_connected(second, 2)  # the ranks reconnected to the new coordinator
        release.write_text("go")
        with trio.fail_after(30):
            snapshot = await second.wait()
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 1 and snapshot.failures == []
    assert len(created_pods(sim)) == creates_before  # nothing started over
    started = [e for e in second.history() if isinstance(e, AttemptStarted)]
    assert [e.adopted for e in started] == [True]
    assert sim.pods() == {} and sim.services() == {}
    # The log of each adopted pod is continued, not repeated from its start:
    # the lines the first coordinator copied (k), then every line of the
    # current log file that it had not copied (those rotated away before
    # anyone read them are gone, as on a real node).
    for rank, path in enumerate(copied):
        pod_log = sim._logs[pod_name(spec.job_id, 1, rank)]
        lines = [line for _, line in pod_log.entries]
        k = before[rank].count(b"\n")
        assert before[rank] == b"".join(lines[:k])
        assert path.read_bytes() == b"".join(lines[:k] + lines[max(k, pod_log.start):])
        output = path.read_text()
        assert output.count(f"rank {rank} ready") == 1 and output.count(f"rank {rank} done") == 1, output
        assert re.search(rf"rank {rank} done after \d+ steps\n$", output), output


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-status"])
async def test_simulated_watch_relists_after_410_gone(sim, tmp_path, script, as_http):
    sim.gone_as_http = as_http
    spec = job(tmp_path, script, "gone", "--until-file", str(tmp_path / "never"), "--steps", "3", world_size=1)
    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        coordinator = Coordinator(spec, launcher=launcher)
        await nursery.start(coordinator.run)
        await wait_connected(coordinator, 1)
        lists_before = sum(1 for verb, res, _, _ in sim.requests if (verb, res) == ("list", "pods"))
        sim.compact()  # the watch ends; resuming from its resourceVersion gets 410 Gone
        await sim.wait_for(lambda: sum(1 for v, r, _, _ in sim.requests if (v, r) == ("list", "pods")) > lists_before)
        sim.oom_kill(pod_name("t-gone", 1, 0))  # seen through the new watch
        with trio.fail_after(30):
            snapshot = await coordinator.wait()
    assert snapshot.failures[0].reason == "OOMKilled" and snapshot.state == JobState.SUCCEEDED


async def test_simulated_pod_missing_from_the_relist_is_treated_as_deleted(sim, tmp_path, script):
    # Attempt 1 runs until stopped; attempt 2 finishes. Rank 0's pod is deleted
    # while the watch is down and the DELETED event is compacted away: only the
    # relist can tell, and the launcher must take its absence as the pod's end
    # (not wait for the rank's heartbeats to stop, which takes heartbeat_timeout).
    spec = job(tmp_path, script, "vanish", "--until-file", str(tmp_path / "never"), "--until-attempt", "1",
               "--steps", "3", world_size=1, heartbeat_timeout=30.0)
    async with launcher_for(sim) as launcher, trio.open_nursery() as nursery:
        coordinator = Coordinator(spec, launcher=launcher)
        await nursery.start(coordinator.run)
        await wait_connected(coordinator, 1)
        sim.vanish_unwatched(pod_name("t-vanish", 1, 0))
        with trio.fail_after(20):
            snapshot = await coordinator.wait()
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    failure = snapshot.failures[0]
    assert failure.reason == "Deleted" and "deleted" in failure.message
    assert failure.cause != FailureCause.HEARTBEAT_TIMEOUT


async def test_simulated_watch_without_a_resource_version_starts_with_existing_objects(sim, tmp_path):
    from rankwarden.kube import service_manifest

    options = PodOptions(namespace=sim.namespace)
    async with KubeApi(config(sim)) as api:
        created = await api.create("services", service_manifest("t-watch", options))
        listing = await api.list("services", "")
        # Opaque versions: nothing here looks like a number.
        for version in (created["metadata"]["resourceVersion"], listing["metadata"]["resourceVersion"]):
            with pytest.raises(ValueError):
                int(version)
        sim.rbac.grant("watch", "services")
        with trio.fail_after(10):
            events = api.watch("services", label_selector="", resource_version="", timeout_seconds=1)
            async with aclosing(events):
                kind, obj = await events.__anext__()
        await api.delete("services", created["metadata"]["name"])
    assert (kind, obj["metadata"]["name"]) == ("ADDED", created["metadata"]["name"])


@pytest.mark.parametrize("problem", ["Unschedulable", "ErrImagePull", "InvalidImageName"])
async def test_simulated_pod_that_cannot_start_fails_with_the_kubernetes_reason(sim, tmp_path, script, problem):
    image = "rankwarden:test"
    if problem == "Unschedulable":
        sim.unschedulable = True
    else:
        image = "registry.invalid/nope:1"
        sim.bad_images[image] = problem
    spec = job(tmp_path, script, "pending", world_size=1, max_restarts=0, image=image)
    async with launcher_for(sim, unschedulable_timeout=0.5, image_pull_timeout=0.5) as launcher:
        with trio.fail_after(30):
            snapshot = await run_job(spec, launcher=launcher)
    assert snapshot.state == JobState.FAILED
    failure = snapshot.failures[0]
    assert failure.cause == FailureCause.LAUNCH_FAILED and failure.reason == problem
    assert problem in failure.message
    assert sim.pods() == {}


async def test_simulated_rotated_token_is_read_again_on_401(sim, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(sim.token)
    async with KubeApi(config(sim, token=None, token_file=str(token_file))) as api:
        await api.list("pods", "a=b")
        sim.rotate_token("rotated")
        token_file.write_text("rotated\n")
        assert (await api.list("pods", "a=b"))["items"] == []
        sim.rotate_token("rotated-again")  # the file still has the old one: a clear error
        with pytest.raises(KubernetesError) as info:
            await api.list("pods", "a=b")
    assert info.value.status == 401
    # ok; 401 and a retry with the new token; 401 and no retry (the file had nothing new)
    assert sum(1 for verb, _, _, _ in sim.requests if verb == "list") == 4


async def test_simulated_launcher_uses_exactly_what_the_role_grants(sim, tmp_path, script):
    """Least privilege both ways: every call is allowed (the simulator enforces
    the Role), and every rule of the Role is used by something the launcher does."""
    options = PodOptions(namespace=sim.namespace)
    async with KubeApi(config(sim)) as api:
        # Leftovers a dead coordinator could leave: this attempt's pod, the job's
        # Service, and the Service of a job that no longer exists.
        from rankwarden.kube import pod_manifest, service_manifest
        from rankwarden.launcher import LaunchRequest

        stale = LaunchRequest(job_id="t-rbac", rank=0, local_rank=0, attempt=1, argv=["sleep", "60"], env={},
                              stdout_path=str(tmp_path / "stale.log"), stderr_path=str(tmp_path / "stale.log"),
                              image="rankwarden:test")
        await api.create("pods", pod_manifest(stale, options))
        await api.create("services", service_manifest("t-rbac", options))
        await api.create("services", service_manifest("t-orphan", options))
    spec = job(tmp_path, script, "rbac", "--steps", "3", "--fail-rank", "0", "--fail-step", "2", world_size=1)
    async with launcher_for(sim) as launcher:
        with trio.fail_after(30):
            snapshot = await run_job(spec, launcher=launcher)
        assert await launcher.release_orphans(set()) == ["t-orphan"]
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    used = {(verb, res) for verb, res, _, _ in sim.requests}
    assert used == role_rules(ROLE) == sim.rbac.granted()
    assert sim.pods() == {} and sim.services() == {}


async def test_simulated_call_outside_the_role_is_forbidden(sim):
    async with KubeApi(config(sim)) as api:
        with pytest.raises(KubernetesError) as info:
            await api._request("GET", f"/api/v1/namespaces/{sim.namespace}/pods/x/log", params={})
        assert info.value.status == 404  # allowed verb, missing pod
        sim.rbac.revoke("delete", "pods")
        with pytest.raises(KubernetesError) as info:
            await api.delete("pods", "x")
    assert info.value.status == 403 and info.value.reason == "Forbidden"
    assert "cannot delete resource" in str(info.value)


async def test_simulated_pod_security_admission_rejects_a_pod_without_the_restricted_context(sim, tmp_path):
    from rankwarden.kube import pod_manifest
    from rankwarden.launcher import LaunchRequest

    request = LaunchRequest(job_id="t-psa", rank=0, local_rank=0, attempt=1, argv=["true"], env={},
                            stdout_path=str(tmp_path / "psa.log"), stderr_path=str(tmp_path / "psa.log"),
                            image="rankwarden:test")
    manifest = pod_manifest(request, PodOptions(namespace=sim.namespace))
    manifest["spec"]["containers"][0].pop("securityContext")
    async with KubeApi(config(sim)) as api:
        with pytest.raises(KubernetesError) as info:
            await api.create("pods", manifest)
    assert info.value.status == 403 and 'violates PodSecurity "restricted:latest"' in str(info.value)
    assert "allowPrivilegeEscalation" in str(info.value) and sim.pods() == {}


async def test_simulated_rbac_checks_namespace_subject_and_resource_names(sim):
    # The Role is bound in its namespace only.
    async with KubeApi(config(sim, namespace="default")) as api:
        with pytest.raises(KubernetesError) as info:
            await api.list("pods", "")
    assert info.value.status == 403 and 'in the namespace "default"' in str(info.value)
    # Only to the coordinator's ServiceAccount: the ranks' account is bound to nothing.
    sim.users["rank-token"] = f"system:serviceaccount:{sim.namespace}:rankwarden-rank"
    async with KubeApi(config(sim, token="rank-token")) as api:
        with pytest.raises(KubernetesError) as info:
            await api.list("pods", "")
    assert info.value.status == 403 and f'"system:serviceaccount:{sim.namespace}:rankwarden-rank"' in str(info.value)
    # A rule with resourceNames allows those objects only.
    sim.rbac.revoke("get", "pods")
    [rules] = sim.rbac.roles.values()
    rules.append({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["allowed"]})
    async with KubeApi(config(sim)) as api:
        with pytest.raises(KubernetesError) as info:
            await api.get("pods", "allowed")
        assert info.value.status == 404  # allowed; there is no such pod
        with pytest.raises(KubernetesError) as info:
            await api.get("pods", "other")
        assert info.value.status == 403 and 'pods "other" is forbidden' in str(info.value)
        assert (await api.list("pods", ""))["items"] == []  # the list rule still holds


async def test_simulated_log_reads_honour_since_time_tail_lines_and_rotation(sim, tmp_path):
    import httpx

    from rankwarden.kube import pod_manifest
    from rankwarden.kube._logs import parse_time
    from rankwarden.launcher import LaunchRequest

    script = tmp_path / "lines.py"
    script.write_text("import time\nfor i in range(4):\n    print('line', i, flush=True)\n    time.sleep(0.05)\n")
    request = LaunchRequest(job_id="t-logs", rank=0, local_rank=0, attempt=1, argv=[sys.executable, str(script)],
                            env={}, stdout_path=str(tmp_path / "x.log"), stderr_path=str(tmp_path / "x.log"),
                            image="rankwarden:test")
    name = pod_name("t-logs", 1, 0)
    async with KubeApi(config(sim)) as api:
        await api.create("pods", pod_manifest(request, PodOptions(namespace=sim.namespace)))
    await sim.wait_for(lambda: sim._logs.get(name) is not None and sim._logs[name].done)
    url = f"{sim.url}/api/v1/namespaces/{sim.namespace}/pods/{name}/log"

    async def read(**params) -> list[str]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {sim.token}"}) as client:
            return (await client.get(url, params=params)).text.splitlines()

    stamped = await read(timestamps="true")
    assert [line.split(" ", 1)[1] for line in stamped] == [f"line {i}" for i in range(4)]
    times = [parse_time(line.split(" ", 1)[0]) for line in stamped]
    assert times == sorted(times)
    assert await read(tailLines="2") == ["line 2", "line 3"]
    since = stamped[2].split(" ", 1)[0]  # inclusive
    assert await read(sinceTime=since) == ["line 2", "line 3"]
    sim.rotate_log(name, keep=1)
    assert await read() == ["line 3"]  # the current file only
    async with KubeApi(config(sim)) as api:
        await api.delete("pods", name, grace_seconds=0)
