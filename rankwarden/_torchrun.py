"""torchrun's whole command line, as ``rankwarden run`` accepts it.

Every flag of ``torch.distributed.run.get_args_parser()`` is accepted in both
spellings (``--nproc-per-node`` and ``--nproc_per_node``) with torchrun's
types, so a torchrun command line parses unchanged. What maps is implemented:

==========================  ==================================================
torchrun flag               in ``rankwarden run``
==========================  ==================================================
--nproc-per-node N|auto|    N ranks; ``cpu``: the CPUs this process may use;
  cpu|gpu|xpu               ``gpu``/``xpu``/``auto``: torch's own count, asked
                            of the ranks' interpreter (the coordinator never
                            imports torch)
--nnodes N / MIN:MAX        nodes (``_multinode``); MIN:MAX is elastic, with
                            ``--rdzv-conf last_call_timeout=S`` read
--standalone                always on
--max-restarts M            the restart budget
--master-addr, -port        MASTER_ADDR; the first attempt's MASTER_PORT
--role NAME                 ROLE_NAME
-m, --no-python             the same
--run-path                  the same result: the script runs as ``__main__``
--log-dir, -r, -t           torchrun's files under --log-dir, and only the
                            console output torchrun would show
--local-ranks-filter        only these ranks on the console
--shutdown-timeout S        --stop-grace S
==========================  ==================================================

Everything else (rendezvous, monitor interval, ...) does not apply to one
coordinator on one machine; each such flag given prints one line saying why.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from typing import NamedTuple

from rankwarden.errors import SpecError

__all__ = [
    "IGNORED", "StdSpec", "add_torchrun_arguments", "ignored_notes", "parse_ranks_filter", "parse_std", "resolve_nproc",
]

_ONE_MACHINE = "one machine: the coordinator is the rendezvous (as with --standalone)"
_GREP_FILES = "not supported: grep the rank files in the job directory"

#: dest -> (flag, why it does not apply). Each is accepted with torchrun's type.
IGNORED: dict[str, tuple[str, str]] = {
    "rdzv_backend": ("--rdzv-backend", _ONE_MACHINE),
    "rdzv_endpoint": ("--rdzv-endpoint", _ONE_MACHINE),
    "rdzv_id": ("--rdzv-id", "the job id is --run-id"),
    "rdzv_conf": ("--rdzv-conf", _ONE_MACHINE),
    "monitor_interval": ("--monitor-interval", "exits are seen at once (pidfd) and frozen ranks by "
                                               "--heartbeat-timeout; nothing polls"),
    "start_method": ("--start-method", "applies to function entrypoints only; a script always starts in a new "
                                       "process, as under torchrun"),
    "event_log_handler": ("--event-log-handler", "events go to events.jsonl in the job directory"),
    "node_rank": ("--node-rank", "one node: its rank is 0"),
    "local_addr": ("--local-addr", "one machine: ranks reach the coordinator on loopback"),
    "logs_specs": ("--logs-specs", "rankwarden writes its own job directory; --log-dir gives torchrun's layout"),
    "numa_binding": ("--numa-binding", "not supported: bind inside the script (os.sched_setaffinity)"),
    "signals_to_handle": ("--signals-to-handle", "SIGINT and SIGTERM stop the job gracefully; other signals "
                                                 "end rankwarden and, through PR_SET_PDEATHSIG, its ranks"),
    "virtual_local_rank": ("--virtual-local-rank", "not supported: LOCAL_RANK is the rank's index and "
                                                   "CUDA_VISIBLE_DEVICES is left as it is"),
    "duplicate_stdout_filters": ("--duplicate-stdout-filters", _GREP_FILES),
    "duplicate_stderr_filters": ("--duplicate-stderr-filters", _GREP_FILES),
}

def _spellings(flag: str) -> list[str]:
    under = "--" + flag[2:].replace("-", "_")
    return [flag] if under == flag else [flag, under]


def add_torchrun_arguments(group: argparse._ArgumentGroup) -> None:
    """The torchrun flags that do not map onto a rankwarden flag of the same name."""
    str_flags = {"rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "start_method", "event_log_handler",
                 "local_addr", "logs_specs", "numa_binding", "signals_to_handle", "duplicate_stdout_filters",
                 "duplicate_stderr_filters"}
    for dest, (flag, why) in IGNORED.items():
        kwargs: dict = dict(dest=dest, help=f"torchrun's; ignored: {why}")
        if dest == "virtual_local_rank":
            kwargs.update(action="store_true")
        else:
            kwargs.update(default=None, metavar="X",
                          type=str if dest in str_flags else float if dest == "monitor_interval" else int)
        group.add_argument(*_spellings(flag), **kwargs)
    group.add_argument("--role", default="default", metavar="NAME", help="ROLE_NAME given to ranks")
    group.add_argument("--run-path", "--run_path", action="store_true",
                       help="accepted: the script already runs as __main__ in the rank's interpreter")
    group.add_argument("--master-port", "--master_port", type=int, default=None, metavar="PORT",
                       help="MASTER_PORT of the first attempt (a restart takes a fresh free port); default: a free port")
    group.add_argument("--shutdown-timeout", "--shutdown_timeout", type=int, default=None, metavar="S",
                       help="torchrun's name for --stop-grace")
    group.add_argument("--log-dir", "--log_dir", default=None, metavar="DIR",
                       help="also write rank output in torchrun's layout: "
                            "DIR/RUN_ID_xxxx/attempt_K/LOCAL_RANK/{stdout,stderr}.log and error.json")
    group.add_argument("-r", "--redirects", default="0", metavar="STD",
                       help="torchrun's: 0 none, 1 stdout, 2 stderr, 3 both, or per rank 0:3,1:2; a redirected "
                            "stream goes to --log-dir only, not the console")
    group.add_argument("-t", "--tee", default="0", metavar="STD",
                       help="like --redirects, but the stream is also shown on the console")
    group.add_argument("--local-ranks-filter", "--local_ranks_filter", default="", metavar="RANKS",
                       help="show only these ranks' output on the console (e.g. 0,1); files keep everything")


def ignored_notes(args: argparse.Namespace) -> list[str]:
    """One line for each torchrun flag that was given and does not apply."""
    notes = []
    for dest, (flag, why) in IGNORED.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            notes.append(f"ignoring torchrun's {flag}{'' if value is True else f' {value}'}: {why}")
    return notes


_STREAMS = {0: (), 1: ("stdout",), 2: ("stderr",), 3: ("stdout", "stderr")}


class StdSpec(NamedTuple):
    """torchrun's --redirects/--tee value: which streams of which local rank (None: every rank)."""

    default: tuple[str, ...]
    per_rank: dict[int, tuple[str, ...]]

    def streams(self, rank: int) -> tuple[str, ...]:
        return self.per_rank.get(rank, () if self.per_rank else self.default)


def parse_std(text: str, flag: str) -> StdSpec:
    """torchrun's ``Std.from_str``: ``3`` or ``0:3,1:2``."""
    text = text.strip()
    if re.fullmatch(r"[0-3]", text):
        return StdSpec(_STREAMS[int(text)], {})
    if re.fullmatch(r"(\d+:[0-3],)*\d+:[0-3]", text):
        return StdSpec((), {int(r): _STREAMS[int(s)] for r, s in (item.split(":") for item in text.split(","))})
    raise SpecError(f"{flag} {text!r}: expected 0, 1, 2, 3 or LOCAL_RANK:STD pairs like 0:3,1:2")


def parse_ranks_filter(text: str) -> set[int] | None:
    if not text:
        return None
    try:
        return {int(r) for r in text.split(",")}
    except ValueError:
        raise SpecError(f"--local-ranks-filter {text!r}: expected comma-separated ranks, e.g. 0,1,2") from None


def resolve_nproc(value: str, python: str) -> int:
    """torchrun's --nproc-per-node: an int, ``cpu``, or a device count asked of torch itself.

    Non-numeric values other than ``cpu`` run torch's own
    ``determine_local_world_size`` in the ranks' interpreter, so ``auto`` and
    ``gpu`` mean exactly what they mean to torchrun."""
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if value == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    code = ("import sys, logging; logging.disable(logging.CRITICAL)\n"
            "from torch.distributed.run import determine_local_world_size as count\n"
            "try:\n    print(count(sys.argv[1]))\nexcept ValueError as exc:\n    sys.exit(f'{exc}')\n")
    try:
        result = subprocess.run([python, "-c", code, value], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpecError(f"--nproc-per-node {value}: cannot ask torch for the device count: {exc}") from None
    lines = result.stderr.strip().splitlines()
    if result.returncode != 0:
        why = lines[-1] if lines else f"exit status {result.returncode}"
        raise SpecError(f"--nproc-per-node {value}: {why}")
    return int(result.stdout.split()[-1])
