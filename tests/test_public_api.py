"""The package's public face and its import cost."""

from __future__ import annotations

import subprocess
import sys

import rankwarden
import rankwarden.worker


def test_public_names_equal___all__():
    import types

    for name in rankwarden.__all__:
        assert getattr(rankwarden, name) is not None
    public = {
        name for name in dir(rankwarden)
        if not name.startswith("_") and not isinstance(getattr(rankwarden, name), types.ModuleType)
    }
    assert public - {"annotations", "TYPE_CHECKING", "Any"} == set(rankwarden.__all__) - {"__version__"}


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_rankwarden_does_not_import_torch():
    modules = _modules_after("import rankwarden; rankwarden.Coordinator; rankwarden.JobSpec")
    assert "torch" not in modules
    assert "rankwarden.coordinator" in modules


def test_the_worker_side_imports_neither_torch_nor_trio():
    # Every rank imports this before the training script runs: keep it light.
    modules = _modules_after("import rankwarden.worker, rankwarden.worker._bootstrap")
    assert "torch" not in modules and "trio" not in modules


def test_worker_calls_are_no_ops_without_rankwarden(monkeypatch):
    monkeypatch.delenv("RANKWARDEN_COORDINATOR", raising=False)
    assert not rankwarden.worker.is_managed()
    rankwarden.worker.report(5, samples=10, loss=1.0)
    assert rankwarden.worker.connect() is None
    assert rankwarden.worker.drain_requested() is False


def test_script_using_report_runs_under_plain_python(tmp_path):
    from .conftest import SCRIPTS

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RANKWARDEN_")}
    env["RANK"] = "0"
    result = subprocess.run([sys.executable, f"{SCRIPTS}/worker.py", "--steps", "2"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "done after 2 steps" in result.stdout


def test_the_checkpoint_plane_imports_nothing_of_the_worker_or_the_coordinator():
    # The store is usable on its own; the rank side (RankCheckpointer) lives in rankwarden.worker.
    import pathlib

    import rankwarden.checkpoint

    modules = _modules_after("import rankwarden.checkpoint as c; c.CheckpointStore; c.choose_resume; c.AsyncCheckpointer")
    layered = {m for m in modules if m.startswith(("rankwarden.worker", "rankwarden.coordinator", "rankwarden.protocol"))}
    assert layered == set()
    # ... nor lazily, inside a function.
    import re

    upward = re.compile(r"^\s*(from|import)\s+rankwarden(\.(worker|coordinator|protocol)\b|\s+import\s+.*\b(worker|coordinator|protocol)\b)", re.M)
    package = pathlib.Path(rankwarden.checkpoint.__file__).parent
    for source in package.glob("*.py"):
        assert not upward.search(source.read_text()), f"{source.name} imports the worker, coordinator or protocol"
    assert not hasattr(rankwarden.checkpoint, "RankCheckpointer")
    assert rankwarden.worker.RankCheckpointer.__module__ == "rankwarden.worker._checkpointer"
