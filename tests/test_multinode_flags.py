"""`rankwarden run --nnodes`: flags, Slurm's environment, and what is refused (no process started)."""

from __future__ import annotations

import pytest

from rankwarden._multinode import first_host, node_plan
from rankwarden.cli import _build_parser, spec_from_args
from rankwarden.errors import SpecError

SECRET = {"RANKWARDEN_JOB_SECRET": "0123456789abcdef"}
SRUN = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "4", "SLURM_NODEID": "2",
        "SLURM_STEP_NODELIST": "gpu[07-09,11]", **SECRET}


def args(*argv: str):
    return _build_parser().parse_args(["run", *argv, "train.py"])


@pytest.mark.parametrize("nodelist, host", [
    ("gpu07", "gpu07"), ("gpu[07-09,11]", "gpu07"), ("gpu[3,5]", "gpu3"), ("a1,b2", "a1"), ("n[001-004],x", "n001"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_an_srun_step_fills_in_every_flag():
    plan = node_plan(args("--nproc-per-node", "8"), SRUN)
    assert (plan.nnodes, plan.node_rank, plan.endpoint) == (4, 2, "gpu07:29400")
    assert spec_from_args(args("--nproc-per-node", "8"), nnodes=plan.nnodes).world_size == 32


def test_flags_win_over_slurms_environment():
    plan = node_plan(args("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:1234"), SRUN)
    assert (plan.nnodes, plan.node_rank, plan.host, plan.port) == (2, 1, "head", 1234)


def test_slurm_outside_a_step_is_one_node():
    # An sbatch script's own shell is not a step: `rankwarden run` there is one node, as before.
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert node_plan(args(), batch) is None
    assert node_plan(args(), {}) is None
    assert node_plan(args("--nnodes", "1:1"), {}) is None


def test_ipv6_endpoint_and_replacement_rank():
    plan = node_plan(args("--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "[fd00::1]:29500"), SECRET)
    assert (plan.host, plan.port, plan.node_rank, plan.endpoint) == ("fd00::1", 29500, -1, "[fd00::1]:29500")


@pytest.mark.parametrize("argv, environ, message", [
    (("--nnodes", "2"), SECRET, "give --node-rank"),
    (("--nnodes", "2", "--node-rank", "1"), SECRET, "give --rdzv-endpoint"),
    (("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:1"), {}, "set RANKWARDEN_JOB_SECRET"),
    (("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:1"), {"RANKWARDEN_JOB_SECRET": "short"},
     "has 5 characters: use a random string of 16 or more"),
    (("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:99999"), SECRET, "is not a port number"),
    (("--nnodes", "two",), SECRET, "expected N or MIN:MAX"),
    (("--nnodes", "3:2",), SECRET, "expected 1 <= MIN <= MAX"),
    (("--nnodes", "1", "--node-rank", "1"), SECRET, "a one-node job has only node 0"),
])
def test_bad_multi_node_flags_name_the_problem(argv, environ, message):
    with pytest.raises(SpecError, match=message):
        node_plan(args(*argv), environ)
