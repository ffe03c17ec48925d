"""A simulated Kubernetes API server (and kubelet) for the pod launcher's tests.

It answers the calls the launcher makes the way the real API server does:
201 on create, 409 AlreadyExists, 404 NotFound, 422 Invalid, 401 for a stale
token, 403 Forbidden for anything the Roles bound to the caller's
ServiceAccount in the request's namespace do not grant (``Rbac``, loaded from
the kustomize base in ``k8s/``: namespace, subject, verb, resource and
resourceNames are checked, so a launcher call the Role lacks fails the test), ``Status``
bodies on every error, a ``resourceVersion`` on every object, watch streams of
ADDED/MODIFIED/DELETED (and BOOKMARK), 410 Gone for a compacted
resourceVersion, and container logs as the kubelet serves them (timestamped
entries, ``sinceTime``, ``tailLines``, ``timestamps``, rotation). Every request is recorded as (verb, resource).

The "kubelet" runs each pod's container command as a real local process
(through rankwarden's ProcessLauncher), so real ranks heartbeat to a real
coordinator; tests break pods the ways clusters do: ``oom_kill``, ``evict``,
``lose_node`` (the process freezes and deletion never completes: stuck
Terminating), unschedulable pods and images that cannot be pulled.

Served with h11 on loopback, port 0.
"""

from __future__ import annotations

import calendar
import copy
import functools
import json
import os
import re
import signal
import time
import urllib.parse
from pathlib import Path
from typing import Any

import h11
import trio

from rankwarden.launcher import LaunchRequest, ProcessLauncher
from rankwarden.launcher._process import LocalProcess

_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/(?P<res>pods|services)(?:/(?P<name>[^/]+)(?:/(?P<sub>log))?)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class Rbac:
    """Roles and RoleBindings as the API server's RBAC authorizer reads them.

    A request is allowed when a RoleBinding *in the request's namespace*
    binds the caller (``system:serviceaccount:NS:NAME``, from its token) to
    a Role in that namespace with a rule naming the verb and the resource,
    and, where the rule lists ``resourceNames``, the object's name (create,
    list and watch name no object, so such a rule never allows them)."""

    def __init__(self, roles: dict[tuple[str, str], list[dict[str, Any]]],
                 bindings: list[tuple[str, str, list[dict[str, Any]]]]) -> None:
        self.roles = roles  # (namespace, name) -> rules
        self.bindings = bindings  # (namespace, role name, subjects)

    @classmethod
    def from_kustomize(cls, base: Path) -> "Rbac":
        """The Roles and RoleBindings of a kustomize base, in the namespace it sets."""
        import yaml

        kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
        default_ns = kustomization.get("namespace", "default")
        roles, bindings = {}, []
        for resource in kustomization.get("resources", []):
            for doc in yaml.safe_load_all((base / resource).read_text()):
                if not doc:
                    continue
                ns = kustomization.get("namespace") or doc["metadata"].get("namespace", default_ns)
                if doc["kind"] == "Role":
                    for rule in doc.get("rules", []):
                        assert rule.get("apiGroups") == [""], f"unexpected apiGroups in {resource}: {rule}"
                    roles[(ns, doc["metadata"]["name"])] = copy.deepcopy(doc.get("rules", []))
                elif doc["kind"] == "RoleBinding":
                    assert doc["roleRef"]["kind"] == "Role", doc["roleRef"]
                    # kustomize puts ServiceAccount subjects without a namespace in its own.
                    subjects = [dict(sub, namespace=sub.get("namespace") or ns) for sub in doc.get("subjects", [])]
                    bindings.append((ns, doc["roleRef"]["name"], subjects))
        return cls(roles, bindings)

    def service_accounts(self) -> list[tuple[str, str]]:
        """(namespace, name) of every ServiceAccount some binding names."""
        return [(sub["namespace"], sub["name"]) for _, _, subjects in self.bindings
                for sub in subjects if sub.get("kind") == "ServiceAccount"]

    def allows(self, user: str, verb: str, namespace: str, resource: str, name: str | None) -> bool:
        for ns, role, subjects in self.bindings:
            if ns != namespace or not any(
                    sub.get("kind") == "ServiceAccount" and user == f"system:serviceaccount:{sub['namespace']}:{sub['name']}"
                    for sub in subjects):
                continue
            for rule in self.roles.get((ns, role), []):
                if verb in rule["verbs"] and resource in rule["resources"] and (
                        "resourceNames" not in rule or (name is not None and verb not in ("create", "list", "watch")
                                                        and name in rule["resourceNames"])):
                    return True
        return False

    def granted(self) -> set[tuple[str, str]]:
        """(verb, resource) pairs some bound Role grants."""
        return {(verb, res) for ns, role, _ in self.bindings for rule in self.roles.get((ns, role), [])
                for verb in rule["verbs"] for res in rule["resources"]}

    def revoke(self, verb: str, resource: str) -> None:
        for rules in self.roles.values():
            for rule in rules:
                if verb in rule["verbs"] and resource in rule["resources"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v != verb]

    def grant(self, verb: str, resource: str) -> None:
        for ns, role, _ in self.bindings:
            self.roles.setdefault((ns, role), []).append({"apiGroups": [""], "resources": [resource], "verbs": [verb]})


def role_rules(path: Path) -> set[tuple[str, str]]:
    """(verb, resource) pairs a Role in a YAML file grants (core API group only)."""
    import yaml

    granted = set()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Role":
            for rule in doc.get("rules", []):
                assert rule.get("apiGroups") == [""], f"unexpected apiGroups in {path}: {rule}"
                granted |= {(verb, res) for verb in rule["verbs"] for res in rule["resources"]}
    return granted


class SimKube:
    def __init__(self, workdir: Path, *, token: str = "sim-token", rbac: Rbac | None = None,
                 namespace: str = "default", user: str = "system:serviceaccount:default:rankwarden") -> None:
        self.workdir = workdir
        self.token = token
        self.rbac = rbac
        self.namespace = namespace  # where tests look by default
        #: token -> the user it authenticates as (ServiceAccount tokens name their account)
        self.users: dict[str, str] = {token: user}
        self.url = ""
        self.requests: list[tuple[str, str, str, int | None]] = []  # (verb, resource, path, delete grace)
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, object)
        self.oldest_rv = 0  # events at or before this version are forgotten: 410 Gone
        self.rv = 100
        self.unschedulable = False
        self.bad_images: dict[str, str] = {}  # image -> waiting reason
        #: 410 Gone for a compacted resourceVersion: as an HTTP status on the
        #: watch request (True) or as an ERROR event in the stream (False); both happen.
        self.gone_as_http = False
        self._changed = trio.Event()
        self._procs: dict[str, LocalProcess] = {}
        self._stuck: set[str] = set()
        self._pod_reason: dict[str, tuple[str, str]] = {}
        self._kill_watches = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._launcher = ProcessLauncher()
        self._logs: dict[str, _PodLog] = {}

    # -- lifetime -------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(functools.partial(trio.serve_tcp, self._connection, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    for proc in list(self._procs.values()):
                        await proc.stop(0)

    # -- what tests do to the cluster -------------------------------------------------

    def pods(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        namespace = namespace or self.namespace
        return {k[2]: v for k, v in self.objects.items() if k[0] == "pods" and k[1] == namespace}

    def services(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        namespace = namespace or self.namespace
        return {k[2]: v for k, v in self.objects.items() if k[0] == "services" and k[1] == namespace}

    def oom_kill(self, name: str) -> None:
        self._pod_reason[name] = ("OOMKilled", "")
        self._procs[name].signal(signal.SIGKILL)

    def evict(self, name: str) -> None:
        self._pod_reason[name] = ("Evicted", "The node was low on resource: memory.")
        self._procs[name].signal(signal.SIGKILL)

    def lose_node(self, name: str) -> None:
        """The pod's node stops answering: the rank freezes and deletion never completes."""
        self._stuck.add(name)
        self._procs[name].signal(signal.SIGSTOP)

    def compact(self) -> None:
        """Forget every event so far: watches from any version seen so far get 410 Gone."""
        self.rv += 1  # writes elsewhere moved the store on; the history window starts after them
        self.oldest_rv = self.rv
        self.history.clear()
        self._kill_watches.set()
        self._kill_watches = trio.Event()
        self._changed.set()
        self._changed = trio.Event()

    def vanish_unwatched(self, name: str, namespace: str | None = None) -> None:
        """The pod is deleted while no watch is looking, and the event is compacted away.

        Its process dies and the object goes without an event; every watch
        ends and resuming gets 410 Gone: only a relist can tell it is gone."""
        proc = self._procs.get(name)
        if proc is not None and proc.status is None:
            proc.signal(signal.SIGKILL)
        self.objects.pop(("pods", namespace or self.namespace, name), None)
        self.compact()

    def rotate_log(self, name: str, keep: int = 0) -> None:
        """The kubelet rotates the container's log: the API reads only the current
        file, which keeps the last ``keep`` lines written so far."""
        pod_log = self._logs[name]
        pod_log.start = max(pod_log.start, len(pod_log.entries) - keep)

    def rotate_token(self, token: str) -> None:
        self.users[token] = self.users.pop(self.token)
        self.token = token

    async def wait_for(self, predicate, timeout: float = 20.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    def leftover_processes(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.status is None]

    # -- the object store -------------------------------------------------------------

    def _record(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = _rv_text(self.rv)
        self.history.append((self.rv, resource, kind, copy.deepcopy(obj)))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _put(self, resource: str, obj: dict[str, Any], kind: str) -> None:
        key = (resource, obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self._record(resource, kind, obj)

    def _update_pod(self, ns: str, name: str, **status: Any) -> None:
        pod = self.objects.get(("pods", ns, name))
        if pod is None:
            return
        pod["status"].update(status)
        self._put("pods", pod, "MODIFIED")

    # -- the kubelet ----------------------------------------------------------------------

    async def _kubelet(self, ns: str, name: str) -> None:
        pod = self.objects[("pods", ns, name)]
        container = pod["spec"]["containers"][0]
        if self.unschedulable:
            self._update_pod(ns, name, conditions=[{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }])
            return
        self._update_pod(ns, name, conditions=[{"type": "PodScheduled", "status": "True"}])
        if container["image"] in self.bad_images:
            reason = self.bad_images[container["image"]]
            self._update_pod(ns, name, containerStatuses=[{
                "name": "rank", "ready": False, "restartCount": 0, "image": container["image"],
                "state": {"waiting": {"reason": reason, "message": f"image {container['image']!r}: {reason}"}},
            }])
            return
        log = self.workdir / f"{name}.log"
        request = LaunchRequest(
            job_id=pod["metadata"]["labels"]["rankwarden.dev/job"], rank=0, local_rank=0, attempt=1,
            argv=container["command"],
            # What an image's environment has, then the pod's.
            env={"PATH": os.environ["PATH"], "HOME": str(self.workdir),
                 # The test session's marker, so leftover pod processes are found.
                 **{k: v for k, v in os.environ.items() if k == "RANKWARDEN_TEST_SESSION"},
                 **{e["name"]: e["value"] for e in container.get("env", [])}},
            stdout_path=str(log), stderr_path=str(log),
        )
        proc = await self._launcher.start(request)
        self._procs[name] = proc
        self._logs[name] = _PodLog()
        assert self._nursery is not None
        self._nursery.start_soon(self._collect_log, name, log, proc)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._update_pod(ns, name, phase="Running", podIP="127.0.0.1", containerStatuses=[{
            "name": "rank", "ready": True, "restartCount": 0, "image": container["image"],
            "state": {"running": {"startedAt": started}},
        }])
        status = await proc.wait()
        code = status.code if status.code is not None else 128 + (status.signal or 0)
        reason, message = self._pod_reason.get(name, ("", ""))
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started}
        pod_status: dict[str, Any] = {"phase": "Succeeded" if code == 0 else "Failed"}
        if reason == "OOMKilled":
            terminated["reason"] = "OOMKilled"
        elif reason:
            pod_status.update(reason=reason, message=message)
        pod_status["containerStatuses"] = [{
            "name": "rank", "ready": False, "restartCount": 0, "image": container["image"],
            "state": {"terminated": terminated},
        }]
        self._update_pod(ns, name, **pod_status)
        current = self.objects.get(("pods", ns, name))
        if current is not None and "deletionTimestamp" in current["metadata"]:
            self._put("pods", current, "DELETED")  # graceful deletion completes once it has stopped

    async def _terminate(self, ns: str, name: str, grace: int) -> None:
        proc = self._procs.get(name)
        if name in self._stuck:
            return  # the node is gone: nobody acts on the deletion
        if proc is None or proc.status is not None:
            pod = self.objects.get(("pods", ns, name))
            if pod is not None:
                self._put("pods", pod, "DELETED")
            return
        await proc.stop(grace)  # SIGTERM, SIGKILL after grace; the kubelet task records the end

    # -- HTTP -------------------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, stream)
                if request is None:
                    return
                await self._handle(conn, stream, request, body)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream):
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn, stream, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _error(self, conn, stream, code: int, reason: str, message: str) -> None:
        await self._send(conn, stream, code, {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        })

    async def _handle(self, conn, stream, request: h11.Request, body: bytes) -> None:
        target = urllib.parse.urlsplit(request.target.decode())
        query = dict(urllib.parse.parse_qsl(target.query))
        method = request.method.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        match = _PATH.match(target.path)
        if match is None:
            await self._error(conn, stream, 404, "NotFound", f"the server could not find the requested resource ({target.path})")
            return
        ns, res, name, sub = match["ns"], match["res"], match["name"], match["sub"]
        resource = f"{res}/{sub}" if sub else res
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or (
            "watch" if query.get("watch") == "true" else "get" if name else "list")
        grace = json.loads(body).get("gracePeriodSeconds") if verb == "delete" and body else None
        path = target.path
        if verb == "create":  # recorded with the name it asks for
            path += "/" + str(json.loads(body or b"{}").get("metadata", {}).get("name"))
        self.requests.append((verb, resource, path, grace))
        self._notify()
        auth = headers.get("authorization", "")
        user = self.users.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if user is None:
            await self._error(conn, stream, 401, "Unauthorized", "Unauthorized")
            return
        if self.rbac is not None and not self.rbac.allows(user, verb, ns, resource, name):
            what = f'{res} "{name}"' if name else res
            await self._error(conn, stream, 403, "Forbidden",
                              f'{what} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
                              f'in API group "" in the namespace "{ns}"')
            return
        if verb == "create":
            await self._create(conn, stream, ns, res, json.loads(body or b"{}"))
        elif verb == "watch":
            await self._watch(conn, stream, ns, res, query)
        elif verb == "list":
            selector = _selector(query.get("labelSelector", ""))
            items = [copy.deepcopy(o) for k, o in self.objects.items()
                     if k[0] == res and k[1] == ns and _matches(o, selector)]
            await self._send(conn, stream, 200, {"kind": "PodList" if res == "pods" else "ServiceList",
                                                 "apiVersion": "v1", "metadata": {"resourceVersion": _rv_text(self.rv)},
                                                 "items": items})
        else:
            obj = self.objects.get((res, ns, name))
            if obj is None:
                await self._error(conn, stream, 404, "NotFound", f'{res} "{name}" not found')
            elif sub == "log":
                await self._log(conn, stream, name, query)
            elif verb == "get":
                await self._send(conn, stream, 200, obj)
            else:
                await self._delete(conn, stream, ns, res, obj, json.loads(body or b"{}"))

    async def _create(self, conn, stream, ns: str, res: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        name = meta.get("name", "")
        pattern = _DNS_1035 if res == "services" else _DNS_LABEL
        problems = [] if pattern.match(name) else [f"metadata.name: Invalid value: {name!r}: must be a DNS label"]
        for key, value in (meta.get("labels") or {}).items():
            if len(value) > 63:
                problems.append(f"metadata.labels: Invalid value: {value!r}: must be no more than 63 characters")
        if res == "pods" and obj.get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure", "Always"):
            problems.append("spec.restartPolicy: Unsupported value")
        if res == "pods" and not problems:
            violations = _restricted_violations(obj)
            if violations:  # Pod Security admission, namespace labelled enforce=restricted
                await self._error(conn, stream, 403, "Forbidden",
                                  f'pods "{name}" is forbidden: violates PodSecurity "restricted:latest": '
                                  + "; ".join(violations))
                return
        if problems:
            await self._error(conn, stream, 422, "Invalid", f'{res[:-1].title()} "{name}" is invalid: {"; ".join(problems)}')
            return
        if (res, ns, name) in self.objects:
            await self._error(conn, stream, 409, "AlreadyExists", f'{res} "{name}" already exists')
            return
        obj = copy.deepcopy(obj)
        obj["metadata"].update(namespace=ns, uid=f"uid-{self.rv + 1}",
                               creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if res == "pods":
            obj["status"] = {"phase": "Pending"}
        self._put(res, obj, "ADDED")
        await self._send(conn, stream, 201, obj)
        if res == "pods":
            assert self._nursery is not None
            self._nursery.start_soon(self._kubelet, ns, name)

    async def _delete(self, conn, stream, ns: str, res: str, obj: dict[str, Any], options: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if res == "services":
            self._put(res, obj, "DELETED")
            await self._send(conn, stream, 200, obj)
            return
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
        if grace == 0:
            # Force: the object goes at once, whatever the node does.
            self._put(res, obj, "DELETED")
            proc = self._procs.get(name)
            if proc is not None and proc.status is None:
                proc.signal(signal.SIGKILL)
                proc.signal(signal.SIGCONT)
        else:
            if "deletionTimestamp" not in obj["metadata"]:
                obj["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                obj["metadata"]["deletionGracePeriodSeconds"] = grace
                self._put(res, obj, "MODIFIED")
            assert self._nursery is not None
            self._nursery.start_soon(self._terminate, ns, name, grace)
        await self._send(conn, stream, 200, obj)

    async def _start_stream(self, conn, stream) -> None:
        await stream.send_all(conn.send(h11.Response(
            status_code=200, headers=[("content-type", "application/json"), ("transfer-encoding", "chunked")])))

    async def _watch(self, conn, stream, ns: str, res: str, query: dict[str, str]) -> None:
        selector = _selector(query.get("labelSelector", ""))
        text = query.get("resourceVersion") or ""
        since = _rv_number(text) if text else None
        if text and since is None:
            await self._error(conn, stream, 400, "BadRequest", f"invalid resource version: {text!r}")
            return
        if since is not None and since < self.oldest_rv:
            message = f"too old resource version: {text} ({_rv_text(self.oldest_rv)})"
            if self.gone_as_http:  # the API server answers the request itself with 410
                await self._error(conn, stream, 410, "Expired", message)
                return
            await self._start_stream(conn, stream)
            gone = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": "Expired", "code": 410}
            await stream.send_all(conn.send(h11.Data(data=json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return
        await self._start_stream(conn, stream)
        if since is None:
            # No resourceVersion: the watch starts with an ADDED event for every
            # object that exists now, then goes on from the current version.
            since = self.rv
            for key, obj in list(self.objects.items()):
                if key[0] == res and key[1] == ns and _matches(obj, selector):
                    line = json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n"
                    await stream.send_all(conn.send(h11.Data(data=line)))
        killed = self._kill_watches
        with trio.move_on_after(float(query.get("timeoutSeconds", 300))):
            while not killed.is_set():
                events, latest = list(self.history), self.rv
                for rv, resource, kind, obj in events:
                    if rv > since and resource == res and obj["metadata"]["namespace"] == ns and _matches(obj, selector):
                        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                        await stream.send_all(conn.send(h11.Data(data=line)))
                since = latest
                with trio.move_on_after(1.0):
                    await self._changed.wait()
                    continue
                if query.get("allowWatchBookmarks") == "true":
                    mark = {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": _rv_text(self.rv)}}
                    await stream.send_all(conn.send(h11.Data(data=json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _collect_log(self, name: str, path: Path, proc: LocalProcess) -> None:
        """The container runtime: each line the container writes becomes a timestamped entry."""
        pod_log, offset, pending = self._logs[name], 0, b""
        while True:
            done = proc.status is not None  # before the read: nothing written after it is missed
            data = path.read_bytes()[offset:] if path.exists() else b""
            offset += len(data)
            *lines, pending = (pending + data).split(b"\n")
            if done and pending:
                lines.append(pending)  # the unterminated last line, as a partial entry
            for i, line in enumerate(lines):
                pod_log.append(line + (b"\n" if i < len(lines) - 1 or not (done and pending) else b""))
            if lines:
                self._notify()
            if done:
                pod_log.done = True
                self._notify()
                return
            await trio.sleep(0.02)  # a file has no readiness to await; the sim polls it

    async def _log(self, conn, stream, name: str, query: dict[str, str]) -> None:
        # The kubelet's log read: the current file only (see rotate_log), from
        # sinceTime (inclusive) or its last tailLines lines, each line prefixed
        # with its RFC 3339 time (nanoseconds, trailing zeros cut, as Go writes
        # it) if timestamps=true; following until the container has exited.
        pod_log = self._logs.get(name)
        await self._start_stream(conn, stream)
        if pod_log is None:  # never started: an empty log
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return
        since = _parse_time(query["sinceTime"]) if "sinceTime" in query else None
        index = pod_log.start
        if "tailLines" in query:
            index = max(index, len(pod_log.entries) - int(query["tailLines"]))
        while True:
            changed, done = self._changed, pod_log.done
            index = max(index, pod_log.start)
            out = []
            for stamp, line in pod_log.entries[index:]:
                if since is None or stamp >= since:
                    out.append((_format_time(stamp).encode() + b" " if query.get("timestamps") == "true" else b"") + line)
            index = len(pod_log.entries)
            if out:
                await stream.send_all(conn.send(h11.Data(data=b"".join(out))))
            if done or query.get("follow") != "true":
                break
            await changed.wait()
        await stream.send_all(conn.send(h11.EndOfMessage()))


class _PodLog:
    """A container's log as the runtime keeps it: (time in ns, line) entries;
    ``start``: the first entry of the current file (rotation moves it on)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes]] = []
        self.start = 0
        self.done = False

    def append(self, line: bytes) -> None:
        stamp = time.time_ns()
        if self.entries and stamp <= self.entries[-1][0]:
            stamp = self.entries[-1][0] + 1
        self.entries.append((stamp, line))


def _format_time(ns: int) -> str:
    seconds, fraction = divmod(ns, 10**9)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


def _parse_time(text: str) -> int:
    head, _, rest = text.partition(".")
    fraction = rest.rstrip("Z") if rest else ""
    seconds = calendar.timegm(time.strptime(head.rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    return seconds * 10**9 + int((fraction or "0").ljust(9, "0")[:9])


def _restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the "restricted" Pod Security Standard finds wrong with a pod (the checks a rank pod meets)."""
    spec = pod.get("spec", {})
    pod_ctx = spec.get("securityContext") or {}
    found = []
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        ctx = c.get("securityContext") or {}
        where = f'container "{c.get("name")}"'
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"allowPrivilegeEscalation != false ({where} must set securityContext.allowPrivilegeEscalation=false)")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            found.append(f'unrestricted capabilities ({where} must set securityContext.capabilities.drop=["ALL"])')
        if not (ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True):
            found.append(f"runAsNonRoot != true (pod or {where} must set securityContext.runAsNonRoot=true)")
        profile = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            found.append(f'seccompProfile (pod or {where} must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    return found


# resourceVersions are opaque strings to clients: these do not look like
# numbers, so a client that compares them numerically (or parses them) fails.
_RV_PREFIX = "rv~"


def _rv_text(number: int) -> str:
    return f"{_RV_PREFIX}{number:x}"


def _rv_number(text: str) -> int | None:
    if not text.startswith(_RV_PREFIX):
        return None
    try:
        return int(text[len(_RV_PREFIX):], 16)
    except ValueError:
        return None


def _selector(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())
