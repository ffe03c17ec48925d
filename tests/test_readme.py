"""The README's library example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.torch
def test_readme_library_example_runs(tmp_path):
    pytest.importorskip("torch")
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    code = re.search(r"<!-- example:library -->\n```python\n(.*?)```", readme, re.S).group(1)
    data = tmp_path / "data"
    subprocess.run([sys.executable, os.path.join(ROOT, "demo", "make_dataset.py"), "--out", str(data), "--shards", "2",
                    "--records-per-shard", "128", "--test-records", "64"], check=True, capture_output=True, timeout=120)
    code = (code.replace('job_id="example"', 'job_id="t-readme"').replace("rankwarden-jobs/example", str(tmp_path / "ex"))
            .replace("rankwarden-jobs/data", str(data)))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "JobStarted attempt 0 rank None"
    assert "CheckpointCommitted attempt 1 rank None" in lines
    assert "JobSucceeded attempt 1 rank None" in lines
    assert lines[-1] == "succeeded [4, 4]"  # 128 records per rank / batch 32

    # Run it again: the same command resumes its own (finished) training and says so, no "final loss nan".
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ResumeChosen attempt 1 rank None" in again.stdout.splitlines()
    assert again.stdout.splitlines()[-1] == "succeeded [None, None]"  # no step trained, none reported
    output = (tmp_path / "ex" / "attempt_001" / "rank_0.stdout").read_text()
    assert "resumed at step 4 of 4: nothing left to train" in output and "nan" not in output
