"""The chaos check: faults of every kind, then bit-identical weights against a fault-free run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "demo", "train.py")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "demo", "make_dataset.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return str(out)


def test_chaos_with_every_fault_kind_loses_nothing(tmp_path, dataset):
    from rankwarden.chaos import KINDS, run_chaos

    report = run_chaos(script=TRAIN, data=dataset, job_dir=str(tmp_path / "chaos"), faults=4, seed=1, epochs=1,
                       echo=lambda line: None)
    print(report.render())
    assert sorted(f.kind for f in report.faults) == sorted(KINDS)
    assert {f.cause for f in report.faults} == {"signaled", "heartbeat_timeout", "progress_timeout"}
    assert report.state == "succeeded" and report.attempts == 5
    assert report.monotonic and report.committed[-1] == 128
    assert report.identical, report.mismatch
    # Every fault struck after a commit: each resumed from a committed, non-zero step.
    assert all(f.resumed_from > 0 and f.resumed_from % 16 == 0 for f in report.faults), report.render()
    assert report.resumed_from_a_checkpoint == 4
    assert report.ok


def test_sharded_chaos_fsdp2_through_dcp_loses_nothing(tmp_path, dataset):
    # `rankwarden chaos --sharded`: FSDP2 on gloo, checkpoints through DCP; a
    # kill in the middle of a sharded save and a plain kill, each resumed from
    # a committed step; same world size, so the weights are bit-identical.
    from rankwarden.chaos import run_chaos

    report = run_chaos(script=TRAIN, data=dataset, job_dir=str(tmp_path / "chaos"), faults=2, seed=1, epochs=1,
                       kinds=["kill-in-save", "kill"], sharded=True, echo=lambda line: None)
    print(report.render())
    assert report.state == "succeeded" and report.attempts == 3
    assert report.identical, report.mismatch
    assert all(f.resumed_from > 0 for f in report.faults), report.render()
    assert report.ok


def test_faults_are_planned_after_commits_the_same_for_the_same_seed():
    from rankwarden.chaos import plan_faults

    plan = plan_faults(6, ["kill", "stop", "hang"], 2, seed=3, ckpt_every=16)
    assert plan == plan_faults(6, ["kill", "stop", "hang"], 2, seed=3, ckpt_every=16)
    assert plan != plan_faults(6, ["kill", "stop", "hang"], 2, seed=4, ckpt_every=16)
    for i, (_, _, step) in enumerate(plan):
        assert 16 * (i + 1) + 2 <= step <= 16 * (i + 2) - 2  # past the (i+1)-th commit, before the next


def test_the_chaos_verdict_fails_a_run_that_never_resumed_from_a_checkpoint():
    from rankwarden.chaos import ChaosReport, FaultRecord

    def report(*resumed):
        faults = [FaultRecord(kind="kill", rank=0, attempt=i + 1, step=20, cause="signaled", detect=0.01, recover=1.0,
                              resumed_from=r) for i, r in enumerate(resumed)]
        return ChaosReport(faults=faults, planned=len(faults), state="succeeded", attempts=len(faults) + 1,
                           committed=[16, 32], identical=True)

    assert report(16, 32, 48).ok
    only_restarts = report(0, 0, 0)  # everything else fine: identical weights, monotonic commits
    assert not only_restarts.ok
    assert "faults resumed from a committed step (not step 0): 0 (NOT enough" in only_restarts.render()
    assert only_restarts.render().endswith("RESULT: FAILED")
    assert not report(16, 0, 0).ok and report(16, 0, 32).ok


@pytest.mark.soak
def test_soak_fifty_faults(tmp_path, dataset):
    from rankwarden.chaos import run_chaos

    report = run_chaos(script=TRAIN, data=dataset, job_dir=str(tmp_path / "soak"), faults=50, seed=7, epochs=7,
                       limit=300.0, echo=print)
    print(report.render())
    assert report.ok, report.render()


def test_chaos_cli_rejects_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "rankwarden", "chaos", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=60, cwd=ROOT)
    result = run("--kinds", "kill,meteor")
    assert result.returncode == 2 and "unknown fault kinds ['meteor']" in result.stderr
    result = run("--script", str(tmp_path / "missing.py"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_demo_train_runs_under_plain_torchrun(tmp_path, dataset):
    ckpt = tmp_path / "ckpt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [TRAIN, "--data", dataset, "--epochs", "1", "--ckpt-url", str(ckpt), "--final-weights", str(tmp_path / "w.pt")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKWARDEN_") or k == "RANKWARDEN_TEST_SESSION"}
    result = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: trained 128 steps" in result.stdout and "test accuracy" in result.stdout
    # The ranks committed their checkpoints among themselves (torch.distributed).
    from rankwarden.checkpoint import CheckpointStore

    manifest = CheckpointStore(str(ckpt), "default").latest()
    assert manifest.step == 128 and manifest.world_size == 2
    # A second run resumes from the final checkpoint and has nothing left to do.
    again = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "step 128 of 128" in again.stdout


def test_the_weight_comparison_can_say_not_identical(tmp_path):
    import torch

    from rankwarden.chaos import _compare_weights

    weights = {"fc.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), "fc.bias": torch.zeros(4)}
    torch.save(weights, tmp_path / "clean.pt")
    torch.save(weights, tmp_path / "same.pt")
    assert _compare_weights(str(tmp_path / "same.pt"), str(tmp_path / "clean.pt")) == (True, "")
    perturbed = {k: v.clone() for k, v in weights.items()}
    perturbed["fc.weight"][2, 3] = torch.nextafter(perturbed["fc.weight"][2, 3], torch.tensor(1e9))  # one ulp
    torch.save(perturbed, tmp_path / "faults.pt")
    identical, why = _compare_weights(str(tmp_path / "faults.pt"), str(tmp_path / "clean.pt"))
    assert not identical and why.startswith("(fc.weight differs by up to")
    assert _compare_weights(str(tmp_path / "missing.pt"), str(tmp_path / "clean.pt")) == (
        False, "(a run wrote no final weights)")


def test_the_chaos_verdict_says_when_commits_went_backwards():
    from rankwarden.chaos import ChaosReport, FaultRecord

    faults = [FaultRecord(kind="kill", rank=0, attempt=1, step=20, cause="signaled", detect=0.01, recover=1.0,
                          resumed_from=16)]
    forward = ChaosReport(faults=faults, planned=1, state="succeeded", attempts=2, committed=[16, 32, 48], identical=True)
    assert forward.monotonic and forward.ok
    backwards = ChaosReport(faults=faults, planned=1, state="succeeded", attempts=2, committed=[16, 32, 16, 48],
                            identical=True)
    assert not backwards.monotonic and not backwards.ok
    assert "committed steps never went backwards: NO" in backwards.render()
    assert backwards.render().endswith("RESULT: FAILED")


def test_live_chaos_recovers_kill_stop_and_hang_live_and_ends_bit_identical(tmp_path, dataset):
    # `rankwarden chaos --live`: each fault replaces one rank; the other keeps its
    # process and state; the fault-free run is the plain job.
    from rankwarden.chaos import run_chaos

    report = run_chaos(script=TRAIN, data=dataset, job_dir=str(tmp_path / "chaos"), faults=3, seed=1, epochs=1,
                       kinds=["kill", "stop", "hang"], live=True, echo=lambda line: None)
    print(report.render())
    assert {f.cause for f in report.faults} == {"signaled", "heartbeat_timeout", "progress_timeout"}
    assert report.state == "succeeded" and report.attempts == 1 and report.fallbacks == 0
    assert all(f.redone <= 1 for f in report.faults), report.render()
    assert report.monotonic and report.identical, report.mismatch
    assert report.ok


def test_the_live_chaos_verdict_says_no_to_a_group_restart_or_redone_steps():
    from rankwarden.chaos import ChaosReport, FaultRecord

    def report(redone: int, fallbacks: int = 0, attempts: int = 1) -> ChaosReport:
        faults = [FaultRecord(kind="kill", rank=0, attempt=1, step=20, cause="signaled", detect=0.01, recover=0.5,
                              resumed_from=20, redone=redone)]
        return ChaosReport(faults=faults, planned=1, state="succeeded", attempts=attempts, committed=[16, 32],
                           identical=True, live=True, fallbacks=fallbacks)

    assert report(0).ok and report(1).ok
    for bad in (report(5), report(0, fallbacks=1, attempts=2)):
        assert not bad.ok
        assert "at most the interrupted step redone: NO" in bad.render()
        assert bad.render().endswith("RESULT: FAILED")
