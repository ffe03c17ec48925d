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
import logging
import os
import signal
import sys
from typing import Sequence

import trio

from rankwarden._console import Console, signal_name
from rankwarden.coordinator import Coordinator
from rankwarden.errors import SpecError
from rankwarden.events import JobState
from rankwarden.spec import Backoff, JobSpec, RestartScope

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


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
            "advancing their reported step (hung) are restarted. Everything after SCRIPT goes to the script."
        ),
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = run.add_argument_group("torchrun-compatible")
    g.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, metavar="N",
                   help="number of ranks (processes) to run on this machine")
    g.add_argument("--max-restarts", "--max_restarts", type=int, default=3, metavar="M",
                   help="restarts allowed before the job fails (torchrun's default is 0)")
    g.add_argument("-m", "--module", action="store_true",
                   help="run SCRIPT as a Python module, like python -m")
    g.add_argument("--no-python", "--no_python", action="store_true",
                   help="run SCRIPT as an executable, not through Python; it is watched for hangs only if it "
                        "uses rankwarden.worker itself (hello is optional unless --startup-timeout is given)")
    g.add_argument("--run-id", "--run_id", "--job-id", dest="job_id", default="", metavar="ID",
                   help="job id (lowercase letters, digits, '-'); generated when empty")
    g.add_argument("--master-addr", "--master_addr", default="127.0.0.1", metavar="ADDR",
                   help="MASTER_ADDR given to ranks; MASTER_PORT is chosen fresh for every attempt")
    g.add_argument("--standalone", action="store_true", help="accepted for compatibility; always on")
    g.add_argument("--nnodes", default="1", help="accepted for compatibility; only 1 node is supported")
    w = run.add_argument_group("failure detection")
    w.add_argument("--heartbeat-timeout", type=_seconds, default=5.0, metavar="S",
                   help="a rank with no heartbeat for S seconds is frozen (SIGSTOP, lost host) and restarted")
    w.add_argument("--heartbeat-interval", type=_seconds, default=0.0, metavar="S",
                   help="seconds between heartbeats; 0 means heartbeat-timeout / 5")
    w.add_argument("--progress-timeout", type=_seconds, default=300.0, metavar="S",
                   help="a rank whose reported step (rankwarden.worker.report) does not advance for S seconds "
                        "is hung and restarted; 0 disables; inactive until the script reports a step")
    w.add_argument("--startup-timeout", type=_seconds, default=None, metavar="S",
                   help="a rank that has not connected S seconds after starting is restarted; 0 disables "
                        "(default: 60, or 0 with --no-python)")
    r = run.add_argument_group("restarts and stopping")
    r.add_argument("--restart-scope", choices=[s.value for s in RestartScope], default="group",
                   help="group: any failure restarts all ranks (DDP); rank: only the failed rank restarts")
    r.add_argument("--backoff-initial", type=_seconds, default=1.0, metavar="S", help="delay before the first restart")
    r.add_argument("--backoff-max", type=_seconds, default=30.0, metavar="S", help="cap on the restart delay (it doubles each restart, with 10%% jitter)")
    r.add_argument("--kill-grace", type=_seconds, default=5.0, metavar="S",
                   help="after a failure, seconds between SIGTERM and SIGKILL for the other ranks")
    r.add_argument("--stop-grace", type=_seconds, default=30.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds ranks get to checkpoint and exit before SIGKILL")
    o = run.add_argument_group("files and output")
    o.add_argument("--job-dir", default="", metavar="DIR",
                   help="where rank logs and events.jsonl go (default ./rankwarden-jobs/JOB_ID)")
    o.add_argument("--checkpoint", default=None, metavar="URL",
                   help="checkpoint store (a path, file://, s3://, memory://) for the multi-rank commit; "
                        "given to ranks as RANKWARDEN_CHECKPOINT_URL")
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    from rankwarden._api_cli import add_api_commands

    add_api_commands(sub)
    return parser


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    if args.nnodes not in ("1", "1:1"):
        raise SpecError(f"--nnodes {args.nnodes}: only one node is supported by `rankwarden run`")
    if args.nproc_per_node < 1:
        raise SpecError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    return JobSpec.from_dict(
        dict(
            entrypoint=args.script,
            args=list(args.script_args),
            module=args.module,
            no_python=args.no_python,
            world_size=args.nproc_per_node,
            job_id=args.job_id,
            job_dir=args.job_dir,
            checkpoint_url=args.checkpoint,
            keep_checkpoints=args.keep_checkpoints,
            resume=args.resume,
            master_addr=args.master_addr,
            heartbeat_timeout=args.heartbeat_timeout or 5.0,
            heartbeat_interval=args.heartbeat_interval,
            progress_timeout=args.progress_timeout,
            startup_timeout=args.startup_timeout,
            restart_scope=args.restart_scope,
            max_restarts=args.max_restarts,
            backoff=dict(initial=args.backoff_initial, max=max(args.backoff_max, args.backoff_initial)),
            kill_grace=args.kill_grace,
            stop_grace=args.stop_grace,
        )
    )


async def _run(spec: JobSpec, *, quiet: bool) -> int:
    coordinator = Coordinator(spec)
    console = Console(coordinator, echo_ranks=not quiet)
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
    if args.faults < 0 or args.nproc_per_node < 1:
        parser.exit(EXIT_USAGE, "rankwarden chaos: error: --faults must be >= 0 and --nproc-per-node >= 1\n")
    report = run_chaos(
        script=args.script, data=args.data, job_dir=args.job_dir, faults=args.faults, kinds=kinds, seed=args.seed,
        world_size=args.nproc_per_node, epochs=args.epochs, heartbeat_timeout=args.heartbeat_timeout,
        progress_timeout=args.progress_timeout, echo=lambda line: print(f"[chaos] {line}", flush=True),
        sharded=args.sharded,
    )
    print()
    print(report.render())
    return 0 if report.ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "ERROR"), format="rankwarden %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        try:
            spec = spec_from_args(args)
        except SpecError as exc:
            parser.exit(EXIT_USAGE, f"rankwarden run: error: {exc}\n")
        return trio.run(functools.partial(_run, spec, quiet=args.quiet))
    if args.command == "chaos":
        return _chaos(parser, args)
    if args.command in ("serve", "jobs"):
        from rankwarden._api_cli import run_api_command

        return run_api_command(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
