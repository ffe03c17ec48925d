"""PodLauncher: each rank a bare Pod, watched through one watch per launcher.

Lifetimes. ``PodLauncher.open`` owns one nursery: the pod watch, one log
follower per pod, and deletions started by ``signal``. The watch keeps a
cache (pod name -> newest object) that every ``PodProcess.wait`` reads; a
change wakes the waiters of that pod. Nothing polls.

Watch. List (to get a resourceVersion), then watch from it. A watch that ends
(server timeout) resumes from the last resourceVersion seen; 410 Gone means
the server forgot that version: list again and treat pods missing from the
list as deleted. Other errors back off (0.5 s doubling to 30 s).

Ending a pod. ``stop`` deletes it with the grace period (Kubernetes sends
SIGTERM, then SIGKILL), waits for the DELETED event, and if the pod is still
there ``force_delete_after`` later (its node is gone, it is stuck
Terminating), deletes it with grace 0, which removes the object at once.
"""

from __future__ import annotations

import logging
import math
import signal as _signal
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import trio

from rankwarden.errors import KubernetesError, LaunchError
from rankwarden.kube import _logs
from rankwarden.kube._api import KubeApi
from rankwarden.kube._config import KubeConfig
from rankwarden.kube._manifests import (
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_RANK,
    LOG_ANNOTATION,
    MANAGED_BY,
    PodOptions,
    master_addr,
    pod_manifest,
    service_manifest,
    service_name,
)
from rankwarden.launcher import ExitStatus, LaunchRequest, Placement

__all__ = ["PodLauncher", "PodProcess"]

log = logging.getLogger(__name__)

#: Waiting reasons that no amount of waiting fixes.
_FATAL_WAITING = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError"}
#: Waiting reasons that may clear (a registry hiccup): fatal after image_pull_timeout.
_PULL_WAITING = {"ErrImagePull", "ImagePullBackOff"}
_SELECTOR = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"


class PodLauncher:
    """Runs ranks as pods. Open it around the coordinators that use it::

        async with PodLauncher.open(namespace="ml", image="registry/trainer:1") as launcher:
            await run_job(spec, launcher=launcher, heartbeat_host="0.0.0.0", advertise_host=pod_ip)
    """

    def __init__(
        self,
        api: KubeApi,
        options: PodOptions,
        *,
        force_delete_after: float = 30.0,
        unschedulable_timeout: float = 300.0,
        image_pull_timeout: float = 300.0,
        reconnect_grace: float = 120.0,
    ) -> None:
        self.api = api
        self.options = options
        self.force_delete_after = force_delete_after
        self.unschedulable_timeout = unschedulable_timeout
        self.image_pull_timeout = image_pull_timeout
        self.reconnect_grace = reconnect_grace
        self._pods: dict[str, dict[str, Any]] = {}
        self._deleted: dict[str, dict[str, Any]] = {}  # last object of pods seen deleted
        self._changed: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._detached = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: KubeConfig | None = None,
        *,
        namespace: str | None = None,
        force_delete_after: float = 30.0,
        unschedulable_timeout: float = 300.0,
        image_pull_timeout: float = 300.0,
        reconnect_grace: float = 120.0,
        **pod_options: Any,
    ) -> AsyncIterator["PodLauncher"]:
        """Connect, list the namespace's rankwarden pods, and keep watching them.

        ``pod_options`` are ``PodOptions`` fields (image, service_account, ...)."""
        config = KubeConfig.load(namespace) if config is None else replace(config, namespace=namespace or config.namespace)
        options = PodOptions(namespace=config.namespace, **pod_options)
        async with KubeApi(config) as api:
            launcher = cls(
                api, options, force_delete_after=force_delete_after, unschedulable_timeout=unschedulable_timeout,
                image_pull_timeout=image_pull_timeout, reconnect_grace=reconnect_grace,
            )
            async with trio.open_nursery() as nursery:
                launcher._nursery = nursery
                await nursery.start(launcher._watch)
                try:
                    yield launcher
                finally:
                    launcher._nursery = None
                    nursery.cancel_scope.cancel()

    # -- the launcher protocol -----------------------------------------------------------

    def placement(self, job_id: str) -> Placement:
        return Placement(master_addr=master_addr(job_id, self.options), reconnect_grace=self.reconnect_grace)

    async def start(self, request: LaunchRequest) -> "PodProcess":
        manifest = pod_manifest(request, self.options)
        name = manifest["metadata"]["name"]
        await self._ensure_service(request.job_id)
        try:
            created = await self.api.create("pods", manifest)
        except KubernetesError as exc:
            if exc.reason != "AlreadyExists":
                raise LaunchError(f"cannot create pod {name} for rank {request.rank}: {exc}") from exc
            # Left by a coordinator that died between create and recording it:
            # it runs this very attempt with a token that may not be ours.
            try:
                existing = await self.api.get("pods", name)
            except KubernetesError as exc2:
                existing = {"status": {"phase": f"unknown ({exc2})"}}
            if existing.get("metadata", {}).get("labels", {}).get(LABEL_JOB) not in (None, request.job_id):
                raise LaunchError(f"pod {name} exists and belongs to something else; not replacing it") from exc
            log.warning("pod %s already exists (phase %s); replacing it", name, existing.get("status", {}).get("phase"))
            await self._delete_and_wait(name, grace=0)
            try:
                created = await self.api.create("pods", manifest)
            except KubernetesError as exc2:
                raise LaunchError(f"cannot create pod {name} for rank {request.rank}: {exc2}") from exc2
        self._observe(name, created, from_watch=False)
        return self._process(name, request.stdout_path, request.rank, request.attempt)

    async def adopt(self, job_id: str) -> dict[int, tuple[int, "PodProcess"]]:
        """The job's pods that are still running, as ``{rank: (attempt, process)}``.

        Pods of older attempts (a restart the previous coordinator had begun)
        are deleted; of the newest attempt, ended pods are left for the
        coordinator to see fail."""
        found: dict[int, tuple[int, str]] = {}
        for name, pod in list(self._pods.items()):
            labels = pod["metadata"].get("labels", {})
            if labels.get(LABEL_JOB) != job_id or "deletionTimestamp" in pod["metadata"]:
                continue
            try:
                rank, attempt = int(labels[LABEL_RANK]), int(labels[LABEL_ATTEMPT])
            except (KeyError, ValueError):
                continue
            if rank not in found or attempt > found[rank][0]:
                if rank in found:
                    self._spawn_delete(found[rank][1], grace=0)
                found[rank] = (attempt, name)
            else:
                self._spawn_delete(name, grace=0)
        adopted = {}
        for rank, (attempt, name) in found.items():
            stdout = self._pods[name]["metadata"].get("annotations", {}).get(LOG_ANNOTATION, "")
            adopted[rank] = (attempt, self._process(name, stdout, rank, attempt, adopted=True))
            log.info("job=%s: adopting pod %s (rank %d, attempt %d)", job_id, name, rank, attempt)
        return adopted

    async def release(self, job_id: str) -> None:
        """The job ended: delete its Service (its pods are already gone)."""
        if self._detached:
            return
        try:
            await self.api.delete("services", service_name(job_id))
        except KubernetesError as exc:
            log.warning("job=%s: could not delete Service %s: %s", job_id, service_name(job_id), exc)

    def detach(self) -> None:
        """From now on, leave pods running when their coordinator goes away.

        For a coordinator that is shutting down to be replaced: the next one
        adopts the pods (``Coordinator(adopt=True)``) instead of restarting."""
        self._detached = True

    # -- pods --------------------------------------------------------------------------------

    def _process(self, name: str, stdout: str, rank: int, attempt: int, adopted: bool = False) -> "PodProcess":
        process = PodProcess(self, name, rank=rank, attempt=attempt)
        if stdout and self._nursery is not None:
            process.log_done = trio.Event()
            self._nursery.start_soon(self._follow_log, name, Path(stdout), adopted, process.log_done)
        return process

    async def _ensure_service(self, job_id: str) -> None:
        name = service_name(job_id)
        try:
            await self.api.create("services", service_manifest(job_id, self.options))
        except KubernetesError as exc:
            if exc.reason != "AlreadyExists":
                raise LaunchError(f"cannot create Service {name} for job {job_id}: {exc}") from exc
            # Ours from an earlier attempt is fine; someone else's would route MASTER_ADDR elsewhere.
            existing = await self.api.get("services", name)
            if existing.get("metadata", {}).get("labels", {}).get(LABEL_JOB) != job_id:
                raise LaunchError(
                    f"Service {name} exists but is not job {job_id}'s; delete it or pick another job id"
                ) from exc

    async def release_orphans(self, active: set[str]) -> list[str]:
        """Delete the Services of rankwarden jobs not in ``active`` (left by a
        coordinator that died); return the job ids they belonged to."""
        listing = await self.api.list("services", _SELECTOR)
        released = []
        for svc in listing.get("items", []):
            job_id = svc["metadata"].get("labels", {}).get(LABEL_JOB)
            if job_id and job_id not in active:
                await self.api.delete("services", svc["metadata"]["name"])
                released.append(job_id)
        return released

    def status_of(self, name: str) -> dict[str, Any] | None:
        """The newest object of pod ``name``, or its last one if it was deleted."""
        return self._pods.get(name) or self._deleted.get(name)

    def is_gone(self, name: str) -> bool:
        return name not in self._pods

    def changed(self, name: str) -> trio.Event:
        event = self._changed.get(name)
        if event is None:
            event = self._changed[name] = trio.Event()
        return event

    def _observe(self, name: str, pod: dict[str, Any] | None, *, from_watch: bool = True) -> None:
        # resourceVersions are opaque: they are never compared. The watch (and
        # a relist) deliver a pod's versions in order, so they always win; our
        # own create's answer only fills in a pod (this uid) the watch has not
        # shown yet (if the watch saw it first, its copy is as new or newer).
        if pod is None:
            last = self._pods.pop(name, None)
            if last is not None:
                self._deleted[name] = last
        else:
            uid = pod.get("metadata", {}).get("uid")
            seen = self._pods.get(name) or self._deleted.get(name)
            if from_watch or seen is None or (name not in self._pods and seen["metadata"].get("uid") != uid):
                self._pods[name] = pod
                self._deleted.pop(name, None)
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    def _spawn_delete(self, name: str, grace: int | None) -> None:
        if self._nursery is not None and not self._detached:
            self._nursery.start_soon(self._delete_quietly, name, grace)

    async def _delete_quietly(self, name: str, grace: int | None) -> None:
        try:
            await self.api.delete("pods", name, grace_seconds=grace)
        except KubernetesError as exc:
            log.warning("could not delete pod %s: %s", name, exc)

    async def _delete_and_wait(self, name: str, grace: int) -> None:
        """Delete with ``grace``; if it is still there after grace + force_delete_after, force it."""
        await self._delete_quietly(name, grace)
        with trio.move_on_after(grace + self.force_delete_after):
            await self._wait_gone(name)
            return
        pod = self._pods.get(name, {})
        log.warning(
            "pod %s still %s %.0fs after deletion (its node may be gone); force-deleting it",
            name, "Terminating" if "deletionTimestamp" in pod.get("metadata", {}) else "there",
            grace + self.force_delete_after,
        )
        await self._delete_quietly(name, 0)
        with trio.move_on_after(self.force_delete_after):
            await self._wait_gone(name)

    async def _wait_gone(self, name: str) -> None:
        while name in self._pods:
            await self.changed(name).wait()

    async def _follow_log(self, name: str, path: Path, adopted: bool, done: trio.Event) -> None:
        # The container's output (stdout and stderr, as the kubelet keeps them)
        # goes to the rank's log file, where the CLI and API read local ranks' output.
        try:
            await self._copy_log(name, path, adopted)
        finally:
            done.set()

    async def _copy_log(self, name: str, path: Path, adopted: bool) -> None:
        while True:
            pod = self.status_of(name)
            if pod is not None and _container_state(pod) in ("running", "terminated"):
                break
            if self.is_gone(name):
                return  # never ran: no log to read
            await self.changed(name).wait()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # An adopted pod's log goes on from what the previous coordinator
            # copied, found by time, not by bytes: the kubelet rotates logs
            # (see _logs).
            marks = _logs.mark_path(path)
            mark = _logs.load_mark(marks) if adopted else None
            lines = _logs.TimestampedLines(mark)
            with open(path, "ab") as out:
                chunks = self.api.follow_log(name, CONTAINER, timestamps=True,
                                             since_time=_logs.since_time(mark) if mark else None)
                async with aclosing(chunks):
                    async for chunk in chunks:
                        if data := lines.feed(chunk):
                            out.write(data)
                            out.flush()
                            _logs.save_mark(marks, lines.mark)
                if data := lines.end():
                    out.write(data)
                    out.flush()
                    _logs.save_mark(marks, lines.mark)
        except (KubernetesError, httpx.HTTPError, OSError) as exc:
            if not self.is_gone(name):
                log.warning("log of pod %s: %s", name, exc)

    # -- the watch ----------------------------------------------------------------------------

    async def _watch(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        backoff = 0.5
        started = False
        while True:
            try:
                version = await self._relist()
                if not started:
                    task_status.started()
                    started = True
                while True:
                    events = self.api.watch("pods", label_selector=_SELECTOR, resource_version=version)
                    async with aclosing(events):
                        async for kind, obj in events:
                            version = obj.get("metadata", {}).get("resourceVersion") or version
                            if kind == "BOOKMARK":
                                continue
                            name = obj.get("metadata", {}).get("name")
                            if name:
                                self._observe(name, None if kind == "DELETED" else obj)
                            backoff = 0.5
            except KubernetesError as exc:
                if not started:
                    raise
                if exc.gone:
                    log.info("pod watch: resourceVersion expired (410 Gone); listing again")
                    continue
                log.warning("pod watch failed: %s; retrying in %.1fs", exc, backoff)
            except httpx.HTTPError as exc:
                if not started:
                    raise KubernetesError(f"cannot watch pods: {exc!r}") from exc
                log.warning("pod watch failed: %r; retrying in %.1fs", exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _relist(self) -> str:
        listing = await self.api.list("pods", _SELECTOR)
        seen = set()
        for pod in listing.get("items", []):
            name = pod["metadata"]["name"]
            seen.add(name)
            self._observe(name, pod)
        for name in [n for n in self._pods if n not in seen]:
            self._observe(name, None)  # deleted while we were not watching
        return listing.get("metadata", {}).get("resourceVersion", "")


class PodProcess:
    """One rank's pod, as the coordinator sees any rank: wait, stop, signal."""

    pid = None
    #: Set when the pod's output has been copied to the end; a rank's end is
    #: reported only after that (bounded), so its last lines are not lost.
    log_done: trio.Event | None = None
    LOG_DRAIN = 5.0

    def __init__(self, launcher: PodLauncher, name: str, *, rank: int, attempt: int) -> None:
        self.launcher = launcher
        self.name = name
        self.rank = rank
        self.attempt = attempt
        self._status: ExitStatus | None = None
        self._stopping = False

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    async def wait(self) -> ExitStatus:
        launcher = self.launcher
        pending_since: dict[str, float] = {}
        while self._status is None:
            pod = launcher.status_of(self.name)
            status = _exit_status(pod, gone=launcher.is_gone(self.name))
            if status is not None:
                self._status = status
                break
            deadline = math.inf
            problem = _pending_problem(pod)
            if problem is not None:
                reason, message = problem
                first = pending_since.setdefault(reason, trio.current_time())
                timeout = (
                    0.0 if reason in _FATAL_WAITING
                    else launcher.image_pull_timeout if reason in _PULL_WAITING
                    else launcher.unschedulable_timeout
                )
                deadline = first + timeout
                if trio.current_time() >= deadline:
                    self._status = ExitStatus(reason=reason, message=message, started=False)
                    break
            with trio.move_on_at(deadline):
                await launcher.changed(self.name).wait()
        return self._status

    async def stop(self, grace: float) -> ExitStatus:
        with trio.CancelScope(shield=True):
            launcher = self.launcher
            if launcher._detached:
                return self._status or ExitStatus(reason="Detached", message="left running for the next coordinator")
            if not launcher.is_gone(self.name):
                await launcher._delete_and_wait(self.name, math.ceil(grace))
            if self._status is None:
                self._status = _exit_status(launcher.status_of(self.name), gone=True) or ExitStatus(
                    reason="Deleted", message="the pod was deleted before it ended"
                )
            if self.log_done is not None:
                with trio.move_on_after(self.LOG_DRAIN):
                    await self.log_done.wait()
            return self._status

    def signal(self, sig: int) -> None:
        # A pod cannot be signalled without exec (which the Role does not
        # grant); deletion is how Kubernetes delivers SIGTERM and SIGKILL.
        if sig == _signal.SIGTERM:
            self.launcher._spawn_delete(self.name, None)  # the pod's own terminationGracePeriodSeconds
        elif sig == _signal.SIGKILL:
            self.launcher._spawn_delete(self.name, 0)


# -- reading pod status -------------------------------------------------------------------------


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return status
    return {}


def _container_state(pod: dict[str, Any]) -> str:
    state = _container_status(pod).get("state") or {}
    return next(iter(state), "")


def _exit_status(pod: dict[str, Any] | None, *, gone: bool) -> ExitStatus | None:
    """How the pod ended, or None while it runs (or has yet to start)."""
    if pod is None:
        return ExitStatus(reason="Deleted", message="the pod vanished") if gone else None
    status = pod.get("status", {})
    phase = status.get("phase")
    if phase == "Succeeded":
        return ExitStatus(code=0)
    if phase != "Failed" and not gone:
        return None
    # Pod-level reasons first (Evicted, DeadlineExceeded, NodeLost), then the container's.
    reason, message = status.get("reason"), status.get("message", "")
    terminated = (_container_status(pod).get("state") or {}).get("terminated")
    if not terminated:
        if phase == "Failed":
            return ExitStatus(reason=reason or "Failed", message=message)
        return ExitStatus(reason="Deleted", message="the pod was deleted before it ended")
    own = terminated.get("reason")
    if not reason and own not in (None, "Error", "Completed"):
        reason = own
        message = terminated.get("message") or (
            "the container exceeded its memory limit" if own == "OOMKilled" else ""
        )
    return ExitStatus(code=terminated.get("exitCode"), reason=reason, message=message)


def _pending_problem(pod: dict[str, Any] | None) -> tuple[str, str] | None:
    """A reason this pod is not starting: unschedulable, or its image cannot be had."""
    if pod is None or pod.get("status", {}).get("phase") not in (None, "Pending"):
        return None
    waiting = (_container_status(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in _FATAL_WAITING | _PULL_WAITING:
        return waiting["reason"], waiting.get("message", "")
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and \
                condition.get("reason") == "Unschedulable":
            return "Unschedulable", condition.get("message", "")
    return None
