"""``rankwarden serve`` and ``rankwarden jobs ...``: the API server and its command-line client."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys

import msgspec
import trio

__all__ = ["add_api_commands", "run_api_command"]

DEFAULT_STATE = os.path.expanduser("~/.local/state/rankwarden")


def add_api_commands(sub) -> None:
    from rankwarden.cli import _DefaultsOnce

    serve = sub.add_parser("serve", help="run the REST API server (jobs, summaries, logs, SSE)",
                           description="Serve the REST API. Locked by default: loopback only, a bearer token on "
                                       "every route but /health, and only entrypoints allowed with --allow.",
                           allow_abbrev=False, formatter_class=_DefaultsOnce)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes a "
                                                           "service that runs code: put TLS and a firewall in front")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL is printed)")
    serve.add_argument("--state-dir", default=DEFAULT_STATE, help="jobs database, job logs, token file")
    serve.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                       help="entrypoints jobs may run: a glob over the script's real path, or module:NAME; repeatable")
    serve.add_argument("--templates", default=None, metavar="FILE",
                       help="job templates (JSON): named entrypoints with the params a submitter may set; the safe "
                            "way to expose a server (see the README's security section)")
    serve.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                       help="a server-wide limit: max_ranks, max_jobs, min_heartbeat_timeout, min_progress_timeout, "
                            "max_restarts (defaults from this host's CPUs and memory); repeatable")
    serve.add_argument("--on-restart", choices=["resume", "interrupt"], default="resume",
                       help="what to do with jobs that were running when the server last stopped")
    serve.add_argument("--checkpoint-root", default=None, help="checkpoint store URL for jobs (default: STATE_DIR/checkpoints)")
    kube = serve.add_argument_group("Kubernetes (run ranks as pods; in-cluster config, else the kubeconfig)")
    kube.add_argument("--kubernetes", action="store_true", help="run each rank as a pod instead of a local process")
    kube.add_argument("--namespace", default=None, help="namespace for rank pods (default: the pod's own, or the kubeconfig's)")
    kube.add_argument("--image", default=os.environ.get("RANKWARDEN_RANK_IMAGE", ""),
                      help="image of the rank pods (default: $RANKWARDEN_RANK_IMAGE)")
    kube.add_argument("--advertise-host", default=os.environ.get("POD_IP"),
                      help="address rank pods use to reach this server's heartbeat ports (default: $POD_IP)")
    kube.add_argument("--rank-service-account", default="rankwarden-rank", help="ServiceAccount of rank pods")
    kube.add_argument("--rank-env-from", action="append", default=[], metavar="configmap:NAME|secret:NAME",
                      help="give every rank pod the keys of this ConfigMap or Secret as environment (repeatable)")
    kube.add_argument("--rank-node-selector", action="append", default=[], metavar="KEY=VALUE",
                      help="schedule rank pods only on nodes with this label (repeatable)")
    kube.add_argument("--rank-toleration", action="append", default=[], metavar="KEY",
                      help="let rank pods run on nodes tainted KEY:NoSchedule, e.g. nvidia.com/gpu (repeatable)")

    jobs = sub.add_parser("jobs", help="talk to a running server: submit, list, show, logs, stop, delete",
                          allow_abbrev=False)
    jobs.add_argument("--url", default=os.environ.get("RANKWARDEN_URL", "http://127.0.0.1:8000"), help="server URL ($RANKWARDEN_URL)")
    jobs.add_argument("--token", default=None, help="API token (default: $RANKWARDEN_API_TOKEN or the state dir's token file)")
    jobs.add_argument("--state-dir", default=DEFAULT_STATE, help="where to find the token file")
    verbs = jobs.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    submit = verbs.add_parser("submit", help="submit a job (an entrypoint with args, or --template with --param)",
                              allow_abbrev=False)
    submit.add_argument("--template", default=None, help="an operator-defined job template")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a template parameter (VALUE is read as JSON when it parses: 3, 0.1, true; else a string)")
    submit.add_argument("--nproc-per-node", type=int, default=1, dest="world_size", help="ranks")
    submit.add_argument("--job-id", default=None)
    submit.add_argument("--max-restarts", type=int, default=None)
    submit.add_argument("--restart-scope", choices=["group", "rank"], default=None)
    submit.add_argument("--heartbeat-timeout", type=float, default=None, help="seconds")
    submit.add_argument("--progress-timeout", type=float, default=None, help="seconds; 0 turns it off")
    submit.add_argument("--total-steps", type=int, default=None, help="steps the job runs (the summary gets an ETA)")
    submit.add_argument("--no-checkpoint", action="store_false", dest="checkpoint", help="no checkpoint store")
    submit.add_argument("--keep-checkpoints", type=int, default=None, help="committed checkpoints to keep (0: all)")
    submit.add_argument("--cpu", default=None, help="per-rank CPU (pods)")
    submit.add_argument("--memory", default=None, help="per-rank memory (pods)")
    submit.add_argument("--gpu", type=int, default=None, help="per-rank GPUs (pods)")
    submit.add_argument("-m", "--module", action="store_true")
    submit.add_argument("entrypoint", nargs="?", default="")
    submit.add_argument("args", nargs=argparse.REMAINDER)
    listing = verbs.add_parser("list", help="list jobs")
    listing.add_argument("--state", default=None, help="comma-separated states")
    show = verbs.add_parser("show", help="a job's summary")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true", help="the summary as JSON")
    for name, text in (("stop", "stop a job gracefully"), ("delete", "delete a finished job")):
        verbs.add_parser(name, help=text).add_argument("job_id")
    logs = verbs.add_parser("logs", help="rank output")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends, with restarts inline")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--rank", type=int, default=None)


#: Modules each command needs beyond the base install, and the extra that brings them.
_EXTRA_MODULES = {"hypercorn", "quart", "quart_trio", "httpx", "httpcore"}


def run_api_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return _serve(args)
        return _jobs(args)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRA_MODULES:
            raise
        print(f"rankwarden {args.command}: needs the 'api' extra (module {top!r} is not installed): "
              "pip install 'rankwarden[api]'", file=sys.stderr)
        return 2


def _read_token(state_dir: str) -> str:
    """The token file the server wrote (never creates one: only the server does)."""
    path = os.path.join(state_dir, "api-token")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"the API token file {path} has mode {mode:04o}: others may read it; "
                                  f"run `chmod 600 {path}`")
        return f.read().strip()


def _serve(args: argparse.Namespace) -> int:
    from rankwarden.api import Limits, ServerConfig, load_or_create_token, serve_api

    # The address is printed once, below; hypercorn's own "Running on" line
    # (and its duplicate through the root logger) would repeat it.
    logging.getLogger("hypercorn.error").propagate = False
    from rankwarden.api._server import is_loopback, weak_token
    from rankwarden.errors import RankwardenError

    templates = {}
    if args.templates:
        from rankwarden.api._templates import load_templates

        try:
            templates = load_templates(args.templates)
        except RankwardenError as exc:
            print(f"rankwarden serve: {exc}", file=sys.stderr)
            return 2
    if not args.allow and not templates:
        print("rankwarden serve: warning: no --allow pattern and no --templates: every job submission will be "
              "refused (403)", file=sys.stderr)
    if args.kubernetes and not (args.image and args.advertise_host):
        print("rankwarden serve: --kubernetes needs --image and --advertise-host (or $RANKWARDEN_RANK_IMAGE "
              "and $POD_IP)", file=sys.stderr)
        return 2
    env_from = []
    for item in args.rank_env_from:
        kind, _, name = item.partition(":")
        if kind not in ("configmap", "secret") or not name:
            print(f"rankwarden serve: --rank-env-from {item!r}: expected configmap:NAME or secret:NAME", file=sys.stderr)
            return 2
        env_from.append((kind, name))
    bad = [kv for kv in args.rank_node_selector if "=" not in kv]
    if bad:
        print(f"rankwarden serve: --rank-node-selector {bad[0]!r}: expected KEY=VALUE", file=sys.stderr)
        return 2
    limits = Limits()
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in Limits.__dataclass_fields__ or not value:
            print(f"rankwarden serve: --limit {item!r}: expected NAME=VALUE with NAME one of "
                  f"{', '.join(Limits.__dataclass_fields__)}", file=sys.stderr)
            return 2
        kind = type(getattr(limits, name))
        try:
            setattr(limits, name, kind(value))
        except ValueError:
            print(f"rankwarden serve: --limit {item!r}: {value!r} is not a {kind.__name__}", file=sys.stderr)
            return 2
    # Files the server and its ranks create (database, logs, checkpoints)
    # are the owner's only.
    os.umask(0o077)
    try:
        token, created = load_or_create_token(args.state_dir)
    except RankwardenError as exc:
        print(f"rankwarden serve: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and (reason := weak_token(token)):
        print(f"rankwarden serve: refusing to listen on {args.host} with a weak API token: {reason}. Unset "
              "RANKWARDEN_API_TOKEN to have one generated in the state directory, or set a long random one.",
              file=sys.stderr)
        return 2
    config = ServerConfig(state_dir=args.state_dir, allow=args.allow, on_restart=args.on_restart,
                          checkpoint_root=args.checkpoint_root, limits=limits,
                          templates=templates)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if args.kubernetes:
                from rankwarden.kube import PodLauncher

                config.launcher = await stack.enter_async_context(PodLauncher.open(
                    namespace=args.namespace, image=args.image, service_account=args.rank_service_account,
                    env_from=env_from, node_selector=dict(kv.split("=", 1) for kv in args.rank_node_selector),
                    tolerations=[{"key": key, "operator": "Exists", "effect": "NoSchedule"}
                                 for key in args.rank_toleration]))
                config.heartbeat_host, config.advertise_host = "0.0.0.0", args.advertise_host
            await serve()

    async def serve() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                url = await nursery.start(functools.partial(serve_api, config, host=args.host, port=args.port,
                                                            token=token, shutdown=stop, tune_gc=True))
                print(f"rankwarden API on {url} (state in {args.state_dir})", flush=True)
                if created:
                    print(f"API token (saved 0600 in {args.state_dir}/api-token): {token}", flush=True)
                async for _ in signals:
                    stop.set()
                    break

    trio.run(main)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    # The client only: `rankwarden jobs` works with httpx alone (no server extra).
    from rankwarden.api.client import ApiClientError, Client

    token = args.token or os.environ.get("RANKWARDEN_API_TOKEN")
    if not token:
        path = os.path.join(args.state_dir, "api-token")
        if not os.path.exists(path):
            print(f"rankwarden jobs: no token: pass --token, set $RANKWARDEN_API_TOKEN, or run on the server ({path})",
                  file=sys.stderr)
            return 2
        try:
            token = _read_token(args.state_dir)
        except OSError as exc:
            print(f"rankwarden jobs: {exc}", file=sys.stderr)
            return 2
    try:
        with Client(args.url, token) as client:
            return _verb(client, args)
    except ApiClientError as exc:
        print(f"rankwarden jobs {args.verb}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Piped into `head`: the reader is gone. Quietly, like other tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _show(value) -> None:
    print(msgspec.json.format(msgspec.json.encode(value)).decode())


def _submit_fields(args: argparse.Namespace) -> dict:
    fields: dict = {"world_size": args.world_size, "checkpoint": args.checkpoint}
    for name in ("job_id", "max_restarts", "restart_scope", "heartbeat_timeout", "progress_timeout", "total_steps",
                 "keep_checkpoints"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    resources = {k: getattr(args, k) for k in ("cpu", "memory", "gpu") if getattr(args, k) is not None}
    if resources:
        fields["resources"] = resources
    if args.template:
        params = {}
        for item in args.param:
            name, sep, raw = item.partition("=")
            if not sep:
                raise SystemExit(f"rankwarden jobs submit: --param {item!r}: expected NAME=VALUE")
            try:
                params[name] = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                params[name] = raw
        fields.update(template=args.template, params=params)
        if args.entrypoint:
            fields["args"] = [args.entrypoint, *args.args]  # the server says why that is refused
    else:
        if not args.entrypoint:
            raise SystemExit("rankwarden jobs submit: name an ENTRYPOINT (or --template NAME)")
        # The server resolves nothing against its own cwd: send what the caller means.
        entrypoint = args.entrypoint if args.module else os.path.abspath(args.entrypoint)
        fields.update(entrypoint=entrypoint, args=args.args, module=args.module)
    return fields


def _summary_text(s) -> str:
    lines = [f"{s.job_id}: {s.state}, attempt {s.attempt}, restarts {s.restarts_used}/{s.max_restarts}"]
    progress = f"step {s.step}" if s.step is not None else "no step reported yet"
    if s.total_steps:
        progress += f" of {s.total_steps}"
    if s.steps_per_second:
        progress += f", {s.steps_per_second:.2f} steps/s"
    if s.eta_seconds is not None:
        progress += f", ETA {s.eta_seconds:.0f} s"
    lines.append(f"  progress:   {progress}")
    if s.checkpoint_step is not None:
        lines.append(f"  checkpoint: step {s.checkpoint_step}")
    if s.goodput is not None:
        lines.append(f"  goodput:    {s.goodput:.1%} of {s.wall_seconds:.0f} s")
    for r in s.ranks:
        age = f", heartbeat {r.heartbeat_age:.1f} s ago" if r.heartbeat_age is not None else ""
        lines.append(f"  rank {r.rank}: {r.state.value}, attempt {r.attempt}, step {r.step}{age}")
    for f in s.failures:
        lines.append(f"  failure: rank {f.rank} attempt {f.attempt}: {f.cause.value}: {f.message}")
    return "\n".join(lines)


_LIFECYCLE = {"restarting", "rank_failed", "stopping", "job_succeeded", "job_failed", "job_stopped", "attempt_started"}


def _follow(client, job_id: str, rank: int | None) -> None:
    import threading

    # Lifecycle events (restarts, failures) are printed inline between the
    # rank lines; both streams end when the job does.
    def events() -> None:
        try:
            for _, event in client.stream_events(job_id):
                if event.get("type") in _LIFECYCLE:
                    detail = {k: v for k, v in event.items() if k not in ("type", "time", "job_id", "failures")}
                    print(f"-- {event['type']}: {msgspec.json.encode(detail).decode()}", flush=True)
        except Exception:  # the log stream and the final line still tell the story
            pass

    thread = threading.Thread(target=events, daemon=True)
    thread.start()
    for _, line in client.stream_logs(job_id):
        if rank is None or line["rank"] == rank:
            print(f"[rank{line['rank']}]: {line['line']}", flush=True)
    thread.join(timeout=5.0)
    info = client.get(job_id)
    print(f"-- job {job_id}: {info.state}" + (f" ({info.reason})" if info.reason else ""), flush=True)


def _verb(client, args: argparse.Namespace) -> int:
    if args.verb == "submit":
        _show(client.submit(**_submit_fields(args)))
    elif args.verb == "list":
        for job in client.list(state=args.state, limit=1000).jobs:
            print(f"{job.job_id:40} {job.state:12} attempt {job.attempt} restarts {job.restarts_used}")
    elif args.verb == "show":
        summary = client.summary(args.job_id)
        _show(summary) if args.json else print(_summary_text(summary))
    elif args.verb == "stop":
        _show(client.stop(args.job_id))
    elif args.verb == "delete":
        result = client.delete(args.job_id)
        what = (f"its checkpoints ({result.checkpoint_url}) were deleted too" if result.checkpoints == "deleted"
                else "it had no checkpoints")
        print(f"deleted job {result.job_id}; {what}")
    elif args.verb == "logs":
        if args.follow:
            _follow(client, args.job_id, args.rank)
        else:
            for line in client.logs(args.job_id, lines=args.lines, rank=args.rank):
                print(f"[rank{line['rank']}]: {line['line']}")
    return 0
