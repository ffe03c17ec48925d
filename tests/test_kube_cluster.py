"""End to end on a real cluster: opt-in, skipped unless ``KUBECONFIG`` is set.

    KUBECONFIG=~/.kube/config \\
    RANKWARDEN_E2E_IMAGE=registry/rankwarden:0.1.0 \\
    RANKWARDEN_E2E_ADVERTISE=<an address of this machine that pods can reach> \\
    RANKWARDEN_E2E_NAMESPACE=rankwarden \\
      .venv/bin/python -m pytest tests/test_kube_cluster.py

The image must have rankwarden installed (the Dockerfile's does). The job is
two ranks of ``python -m this`` (in every Python), so nothing else is needed.
The kubeconfig's user needs the verbs of k8s/base/rbac.yaml in the namespace.
"""

from __future__ import annotations

import os
import secrets

import pytest
import trio

from rankwarden import JobSpec, JobState, run_job

pytestmark = pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG is not set: no cluster to run on")


async def test_a_real_job_runs_on_the_cluster(tmp_path):
    from rankwarden.kube import PodLauncher

    image = os.environ.get("RANKWARDEN_E2E_IMAGE")
    advertise = os.environ.get("RANKWARDEN_E2E_ADVERTISE")
    if not image or not advertise:
        pytest.skip("set RANKWARDEN_E2E_IMAGE and RANKWARDEN_E2E_ADVERTISE as well")
    namespace = os.environ.get("RANKWARDEN_E2E_NAMESPACE") or None
    spec = JobSpec(entrypoint="this", module=True, world_size=2, job_id=f"e2e-{secrets.token_hex(3)}",
                   job_dir=str(tmp_path / "job"), max_restarts=0, startup_timeout=300)
    async with PodLauncher.open(namespace=namespace, image=image) as launcher:
        with trio.fail_after(600):
            snapshot = await run_job(spec, launcher=launcher, heartbeat_host="0.0.0.0", advertise_host=advertise)
        pods = await launcher.api.list("pods", f"rankwarden.dev/job={spec.job_id}")
    assert snapshot.state == JobState.SUCCEEDED, snapshot.failures
    assert pods["items"] == []  # the job's pods are deleted when it ends
    assert "Beautiful is better than ugly" in (tmp_path / "job" / "attempt_001" / "rank_1.stdout").read_text()
