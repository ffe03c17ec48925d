"""The ``rankwarden`` command.

``rankwarden run`` is a drop-in for ``torchrun --standalone`` on one machine:
flags that torchrun has are spelled the same (both ``--nproc-per-node`` and
``--nproc_per_node``), and the script gets the same environment. What it adds:
frozen and hung ranks are caught, restarts back off, and every rank's output
and every lifecycle event is kept in the job directory.

Exit status: 0 when the job succeeded, 1 when it failed, 2 for bad usage,
130/143 when stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import trio

from rankwarden._console import Console, signal_name
from rankwarden._torchrun import add_torchrun_arguments, ignored_notes, parse_ranks_filter, parse_std, resolve_nproc
from rankwarden.coordinator import Coordinator
from rankwarden.coordinator._request import default_job_id
from rankwarden.coordinator._jobdir import TorchrunLogs
from rankwarden.errors import SpecError
from rankwarden.events import JobState
from rankwarden.spec import Backoff, JobSpec, RestartScope

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2

#: The environment variable that moves the default job directories, and their default.
JOBS_DIR_ENV = "RANKWARDEN_JOBS_DIR"
DEFAULT_JOBS_DIR = "rankwarden-jobs"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


class _DefaultsOnce(argparse.HelpFormatter):
    """Appends "(default: X)" where a default says something and the help does not already give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or not action.option_strings or default in (None, "", False)
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwarden", description="Keeps distributed PyTorch training alive.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser(
        "run",
        help="run a training script on N local ranks (a torchrun drop-in that also catches hangs)",
        description=(
            "Run SCRIPT on N local ranks with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, "
            "MASTER_PORT, ...). Ranks that exit non-zero, are killed, stop heartbeating (frozen) or stop "
            "advancing their reported step (hung) are restarted. Everything after SCRIPT goes to the script. "
            "Every torchrun flag is accepted; those that do not apply on one machine print why."
        ),
        allow_abbrev=False,
        formatter_class=_DefaultsOnce,
    )
    g = run.add_argument_group("torchrun-compatible")
    g.add_argument("--nproc-per-node", "--nproc_per_node", default="1", metavar="N",
                   help="ranks on this machine: a number, or as torchrun: cpu (one per usable CPU), gpu, xpu, "
                        "auto (one per accelerator, else per CPU)")
    g.add_argument("--max-restarts", "--max_restarts", type=int, default=3, metavar="M",
                   help="restarts allowed before the job fails (torchrun's default is 0)")
    g.add_argument("-m", "--module", action="store_true",
                   help="run SCRIPT as a Python module, like python -m")
    g.add_argument("--no-python", "--no_python", action="store_true",
                   help="run SCRIPT as an executable, not through Python; it is watched for hangs only if it "
                        "uses rankwarden.worker itself (hello is optional unless --startup-timeout is given)")
    g.add_argument("--run-id", "--run_id", "--job-id", dest="job_id", default="", metavar="ID",
                   help="job id (lowercase letters, digits, '-'); generated when empty. Run the same command "
                        "with the same id to resume its checkpoints")
    g.add_argument("--master-addr", "--master_addr", default="127.0.0.1", metavar="ADDR",
                   help="MASTER_ADDR given to ranks")
    g.add_argument("--standalone", action="store_true", help="accepted for compatibility; always on")
    g.add_argument("--nnodes", default=None, metavar="N",
                   help="nodes of the job; with more than 1, run the same command on every node with --node-rank "
                        "and --rdzv-endpoint (under srun, read from Slurm's environment). Default: 1")
    add_torchrun_arguments(g)
    w = run.add_argument_group("failure detection")
    w.add_argument("--heartbeat-timeout", type=_seconds, default=5.0, metavar="S",
                   help="a rank with no heartbeat for S seconds is frozen (SIGSTOP, lost host) and restarted")
    w.add_argument("--heartbeat-interval", type=_seconds, default=0.0, metavar="S",
                   help="seconds between heartbeats; 0 means heartbeat-timeout / 5")
    w.add_argument("--progress-timeout", type=_seconds, default=300.0, metavar="S",
                   help="a rank whose reported step (rankwarden.worker.report) does not advance for S seconds "
                        "is hung and restarted; 0 disables; inactive until the script reports a step")
    w.add_argument("--join-timeout", type=_seconds, default=300.0, metavar="S",
                   help="multi-node: how long ranks wait for a lost node's slot to be taken again (the host "
                        "back, or a replacement), and how long an agent keeps trying to reach the coordinator")
    w.add_argument("--last-call-timeout", type=_seconds, default=None, metavar="S",
                   help="--nnodes MIN:MAX: once MIN nodes have joined, the first attempt waits up to S seconds "
                        "for up to MAX (torchrun's --rdzv-conf last_call_timeout, which is also read). Default: 30")
    w.add_argument("--startup-timeout", type=_seconds, default=None, metavar="S",
                   help="a rank that has not connected S seconds after starting is restarted; 0 disables "
                        "(default: 60, or 0 with --no-python)")
    r = run.add_argument_group("restarts and stopping")
    r.add_argument("--restart-scope", choices=[s.value for s in RestartScope], default="group",
                   help="group: any failure restarts all ranks (DDP); rank: only the failed rank restarts")
    r.add_argument("--backoff-initial", type=_seconds, default=1.0, metavar="S", help="delay before the first restart")
    r.add_argument("--backoff-max", type=_seconds, default=30.0, metavar="S", help="cap on the restart delay (it doubles each restart, with 10%% jitter)")
    r.add_argument("--live", action="store_true",
                   help="live recovery: a failed rank is killed and replaced while the other ranks keep their "
                        "processes and state (the script trains through rankwarden.worker.live; restart scope group)")
    r.add_argument("--live-timeout", type=_seconds, default=120.0, metavar="S",
                   help="with --live: seconds for every rank to rejoin after a failure before the group restarts")
    r.add_argument("--no-warm", action="store_true",
                   help="start every rank as a fresh interpreter; by default restarted ranks of a script or module "
                        "are forked from a zygote that has already imported torch")
    r.add_argument("--kill-grace", type=_seconds, default=5.0, metavar="S",
                   help="after a failure, seconds between SIGTERM and SIGKILL for the other ranks")
    r.add_argument("--stop-grace", type=_seconds, default=None, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds ranks get to checkpoint and exit before SIGKILL "
                        "(default: 30, or torchrun's --shutdown-timeout)")
    o = run.add_argument_group("files and output")
    o.add_argument("--job-dir", default="", metavar="DIR",
                   help=f"where rank logs, events.jsonl and checkpoints go (default: ${JOBS_DIR_ENV}/JOB_ID, "
                        f"else ./{DEFAULT_JOBS_DIR}/JOB_ID)")
    o.add_argument("--checkpoint", default=None, metavar="URL",
                   help="checkpoint store (a path, file://, s3://, memory://) for the multi-rank commit; given to "
                        "ranks as RANKWARDEN_CHECKPOINT_URL (default: JOB_DIR/checkpoints)")
    o.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                   help="keep the newest N committed checkpoints (0 keeps all)")
    o.add_argument("--resume", action="store_true",
                   help="resume the --checkpoint store even if another command wrote it (other script or "
                        "arguments); without it such a store fails the job, saying whose it is. The same command "
                        "always resumes its own checkpoints; another world size is always refused")
    o.add_argument("--quiet", action="store_true", help="do not echo rank output to the console (it is still in --job-dir)")
    o.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="level of rankwarden's own log messages")
    run.add_argument("script", metavar="SCRIPT", help="training script (or module with -m, or command with --no-python)")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")

    chaos = sub.add_parser(
        "chaos",
        help="inject kill -9 / SIGSTOP / hangs / crashes mid-checkpoint into the demo job, then prove nothing was lost",
        description=(
            "Run the demo DDP job while injecting seeded faults, run it again without faults, and compare: "
            "the final weights must be bit-identical and committed checkpoints must never go backwards. "
            "Exit status 0 only if nothing was lost."
        ),
        allow_abbrev=False,
        formatter_class=_DefaultsOnce,
    )
    chaos.add_argument("--faults", type=int, default=4, help="how many faults to inject")
    chaos.add_argument("--kinds", default="kill,stop,hang,kill-in-save",
                       help="comma-separated fault kinds: kill, stop, hang, kill-in-save")
    chaos.add_argument("--seed", type=int, default=0, help="seed of the fault plan and of the training run")
    chaos.add_argument("--nproc-per-node", type=int, default=2, metavar="N", help="ranks")
    chaos.add_argument("--epochs", type=int, default=2, help="training epochs of the demo job")
    chaos.add_argument("--script", default="demo/train.py", help="the training script (it must support the demo's fault hooks)")
    chaos.add_argument("--data", default="rankwarden-jobs/data", help="dataset directory (made if missing)")
    chaos.add_argument("--job-dir", default="rankwarden-jobs/chaos", help="where both runs keep logs and checkpoints")
    chaos.add_argument("--heartbeat-timeout", type=_seconds, default=3.0, metavar="S", help="frozen-rank detection")
    chaos.add_argument("--sharded", action="store_true",
                       help="train with FSDP2 and checkpoint sharded through torch.distributed.checkpoint")
    chaos.add_argument("--progress-timeout", type=_seconds, default=4.0, metavar="S", help="hung-rank detection")
    chaos.add_argument("--live", action="store_true",
                       help="recover faults live: replace the failed rank, the survivors keep their processes and state")
    from rankwarden._api_cli import add_api_commands

    add_api_commands(sub)
    # Listed for --help only: main() reads them as `run` with this node's role fixed.
    for name, text in _ROLE_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


#: `rankwarden coordinator|agent ARGS` is `rankwarden run ARGS` with the role fixed (multi-node).
_ROLE_COMMANDS = {
    "coordinator": "multi-node: only the coordinator, on a host of its own (takes `run`'s flags; every node "
                   "runs `rankwarden agent`)",
    "agent": "multi-node: only this node's agent, even as node 0 (takes `run`'s flags)",
}


class RunPlan(NamedTuple):
    """What `rankwarden run` does besides the spec: console and file options from torchrun's flags."""

    notes: list[str]
    master_port: int | None
    echo: Callable[[int, str], bool]
    torchrun_logs: Callable[[str], TorchrunLogs] | None


def jobs_root() -> Path:
    """Where job directories go by default: $RANKWARDEN_JOBS_DIR, else ./rankwarden-jobs."""
    return Path(os.environ.get(JOBS_DIR_ENV) or DEFAULT_JOBS_DIR)


def spec_from_args(args: argparse.Namespace, *, python: str = sys.executable, nnodes: int = 1) -> JobSpec:
    if nnodes == 1 and (args.nnodes or "1") not in ("1", "1:1"):
        raise SpecError(f"--nnodes {args.nnodes}: more than one node needs --node-rank and --rdzv-endpoint")
    if nnodes == 1 and getattr(args, "node_rank", None) not in (None, 0):
        raise SpecError(f"--node-rank {args.node_rank}: a one-node job has only node 0")
    nproc = resolve_nproc(args.nproc_per_node, python)
    if nproc < 1:
        raise SpecError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    stop_grace = args.stop_grace
    if stop_grace is None:
        stop_grace = float(args.shutdown_timeout) if args.shutdown_timeout is not None else 30.0
    spec = JobSpec.from_dict(
        dict(
            entrypoint=args.script,
            args=list(args.script_args),
            module=args.module,
            no_python=args.no_python,
            world_size=nproc * nnodes,
            # torchrun's --rdzv-id names a multi-node job; --run-id wins.
            job_id=args.job_id or ((getattr(args, "rdzv_id", None) or "") if nnodes > 1 else ""),
            keep_checkpoints=args.keep_checkpoints,
            resume=args.resume,
            master_addr=args.master_addr,
            env={"ROLE_NAME": args.role} if args.role != "default" else {},
            heartbeat_timeout=args.heartbeat_timeout or 5.0,
            heartbeat_interval=args.heartbeat_interval,
            progress_timeout=args.progress_timeout,
            startup_timeout=args.startup_timeout,
            restart_scope=args.restart_scope,
            max_restarts=args.max_restarts,
            backoff=dict(initial=args.backoff_initial, max=max(args.backoff_max, args.backoff_initial)),
            kill_grace=args.kill_grace,
            stop_grace=stop_grace,
            warm=not args.no_warm,
            live=args.live,
            live_timeout=args.live_timeout,
        )
    )
    # The job id, directory and checkpoint store are fixed here, so that the
    # first line can say where everything goes and `--run-id ID` finds it again.
    job_id = spec.job_id or default_job_id(spec)
    job_dir = Path(args.job_dir) if args.job_dir else jobs_root() / job_id
    checkpoint = args.checkpoint if args.checkpoint is not None else str(job_dir.absolute() / "checkpoints")
    return spec.replace(job_id=job_id, job_dir=str(job_dir), checkpoint_url=checkpoint)


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    if args.master_port is not None and not 0 <= args.master_port < 65536:
        raise SpecError(f"--master-port {args.master_port}: expected a port number from 0 (any free port) to 65535")
    redirects = parse_std(args.redirects, "--redirects")
    tee = parse_std(args.tee, "--tee")
    shown = parse_ranks_filter(args.local_ranks_filter)
    notes = ignored_notes(args)
    if args.run_path:
        notes.append("--run-path: the script runs as __main__ in each rank's own interpreter (the same result)")
    if (args.redirects != "0" or args.tee != "0") and not args.log_dir:
        notes.append("--redirects/--tee without --log-dir: rank output is kept in the job directory")

    def echo(rank: int, stream: str) -> bool:
        # torchrun: a redirected stream goes to its file only, unless teed; the
        # ranks filter applies to the console only.
        if shown is not None and rank not in shown:
            return False
        return stream not in redirects.streams(rank) or stream in tee.streams(rank)

    def streams(rank: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(redirects.streams(rank) + tee.streams(rank)))

    logs = None
    if args.log_dir:
        logs = functools.partial(TorchrunLogs.create, args.log_dir, streams=streams)
    return RunPlan(notes, args.master_port or None, echo, logs)


def check_entrypoint(spec: JobSpec) -> str | None:
    """Why the entrypoint cannot start, or None. Checked before the first
    attempt, without running anything of it (a module's parent packages are
    located, not imported)."""
    cwd = spec.cwd or os.getcwd()
    target = spec.entrypoint
    if spec.no_python:
        if "/" in target:
            path = os.path.join(cwd, target)
            ok = os.path.isfile(path) and os.access(path, os.X_OK)
        else:
            ok = shutil.which(target, path=spec.env.get("PATH") or os.environ.get("PATH")) is not None
        return None if ok else f"{target}: no such executable (--no-python runs it as a command)"
    if not spec.module:
        path = os.path.join(cwd, target)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "__main__.py")):
            return f"{target} is a directory without __main__.py (a module? add -m)"
        if not os.path.exists(path):
            hint = " (a module? add -m)" if not target.endswith(".py") and "/" not in target else ""
            return f"{target}: no such file{hint}"
        return None
    return _module_missing(target, cwd)


def _module_missing(name: str, cwd: str) -> str | None:
    # `python -m` puts the working directory first on sys.path. The top-level
    # name is looked up through every finder (editable installs too) without
    # importing it; submodules through their parent's search locations.
    parts = name.split(".")
    saved = sys.path[:]
    sys.path[:0] = [cwd]
    try:
        found = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path[:] = saved
    for i, part in enumerate(parts[1:], start=1):
        if found is None:
            break
        if found.submodule_search_locations is None:
            return f"-m {name}: {'.'.join(parts[:i])} is a module, not a package"
        found = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(found.submodule_search_locations))
    if found is None:
        return f"-m {name}: no module named {name!r} (looked in {cwd} and the interpreter's sys.path)"
    return None


def first_line(job_id: str, spec: JobSpec, job_dir) -> str:
    """Where everything goes, said before anything else."""
    where = f"logs, events and checkpoints in {job_dir.path}/"
    if spec.checkpoint_url != str(job_dir.path / "checkpoints"):
        where = f"logs and events in {job_dir.path}/, checkpoints in {spec.checkpoint_url}"
    if job_dir.logs != job_dir.path:
        where += f"; this run's rank output in {job_dir.logs.name}/"
    if job_dir.torchrun is not None:
        where += f"; torchrun's log layout in {job_dir.torchrun.run_dir}/"
    return (f"rankwarden: job {job_id}: {spec.world_size} rank(s) of {spec.entrypoint}; {where} "
            f"(--job-dir or ${JOBS_DIR_ENV} moves them)")


async def _run(spec: JobSpec, *, quiet: bool, plan: RunPlan | None = None) -> int:
    plan = plan or RunPlan([], None, lambda rank, stream: True, None)
    # This process is the coordinator's: let it tune the collector for many ranks.
    coordinator = Coordinator(spec, master_port=plan.master_port, tune_gc=True)
    logs = coordinator.job_dir.start_run()
    if plan.torchrun_logs is not None:
        coordinator.job_dir.torchrun = plan.torchrun_logs(coordinator.job_id)
    console = Console(coordinator, echo_ranks=not quiet, echo=plan.echo, announce_start=False)
    console.line(first_line(coordinator.job_id, spec, coordinator.job_dir))
    for note in plan.notes:
        console.line(f"rankwarden: {note}")
    stopped_by: int | None = None
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def on_signals() -> None:
                nonlocal stopped_by
                async for signum in signals:
                    if stopped_by is None:
                        stopped_by = signum
                        console.line(f"rankwarden: {signal_name(signum)}: stopping ranks (again to kill them now)")
                        coordinator.stop(f"received {signal_name(signum)}")
                    else:
                        coordinator.stop(f"received {signal_name(signum)} again", force=True)

            nursery.start_soon(on_signals)
            nursery.start_soon(console.show_events)
            await nursery.start(coordinator.run)
            nursery.start_soon(console.refresh)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    console.finish()
    if snapshot.state == JobState.SUCCEEDED:
        return 0
    if snapshot.state == JobState.STOPPED and stopped_by is not None:
        console.line(f"rankwarden: resume with: rankwarden run --run-id {coordinator.job_id} (same arguments)")
        return 128 + stopped_by
    return EXIT_FAILED


def _chaos(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from rankwarden.chaos import KINDS, run_chaos

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        parser.exit(EXIT_USAGE, f"rankwarden chaos: error: unknown fault kinds {bad}; choose from {', '.join(KINDS)}\n")
    if not os.path.exists(args.script):
        parser.exit(EXIT_USAGE, f"rankwarden chaos: error: {args.script} not found; run from the repository root or pass --script\n")
    if args.live and args.sharded:
        parser.exit(EXIT_USAGE, "rankwarden chaos: error: --live is for replicated (DDP) training; drop --sharded\n")
    if args.faults < 0 or args.nproc_per_node < 1:
        parser.exit(EXIT_USAGE, "rankwarden chaos: error: --faults must be >= 0 and --nproc-per-node >= 1\n")
    report = run_chaos(
        script=args.script, data=args.data, job_dir=args.job_dir, faults=args.faults, kinds=kinds, seed=args.seed,
        world_size=args.nproc_per_node, epochs=args.epochs, heartbeat_timeout=args.heartbeat_timeout,
        progress_timeout=args.progress_timeout, echo=lambda line: print(f"[chaos] {line}", flush=True),
        sharded=args.sharded, live=args.live,
    )
    print()
    print(report.render())
    return 0 if report.ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    role = "auto"
    if argv and argv[0] in _ROLE_COMMANDS:
        role, argv = argv[0], ["run", *argv[1:]]
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "ERROR"), format="rankwarden %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        from rankwarden._multinode import MULTI_NODE_FLAGS, node_plan, run_node
        from rankwarden._torchrun import IGNORED

        try:
            nodes = node_plan(args, os.environ, role=role)
            spec = spec_from_args(args, nnodes=nodes.nnodes if nodes else 1)
            plan = plan_from_args(args)
        except SpecError as exc:
            parser.exit(EXIT_USAGE, f"rankwarden {'run' if role == 'auto' else role}: error: {exc}\n")
        problem = check_entrypoint(spec)
        if problem is not None:
            parser.exit(EXIT_USAGE, f"rankwarden run: error: {problem}; nothing was started\n")
        if nodes is not None:
            # These torchrun flags mean something with several nodes: no "ignoring" note for them.
            used = tuple(f"ignoring torchrun's {IGNORED[dest][0]}" for dest in MULTI_NODE_FLAGS)
            plan = plan._replace(notes=[n for n in plan.notes if not n.startswith(used)])
            return trio.run(functools.partial(run_node, spec, nodes, quiet=args.quiet, plan=plan))
        return trio.run(functools.partial(_run, spec, quiet=args.quiet, plan=plan))
    if args.command == "chaos":
        return _chaos(parser, args)
    if args.command in ("serve", "jobs"):
        from rankwarden._api_cli import run_api_command

        return run_api_command(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
