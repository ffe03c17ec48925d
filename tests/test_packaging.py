"""The install story: package metadata builds without warnings, extras are named when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metadata_builds_without_warnings_and_names_the_licence(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src)
    shutil.copytree(os.path.join(ROOT, "rankwarden"), src / "rankwarden", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import os
        from setuptools import build_meta
        os.chdir({str(src)!r})
        name = build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r})
        print(name)
    """)
    # -W error: setuptools' licence deprecation warning (a table `license`) fails this.
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    dist_info = tmp_path / result.stdout.split()[-1]
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Apache License" in (dist_info / "licenses" / "LICENSE").read_text()


def _without(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """`rankwarden ARGV` in an interpreter where ``modules`` cannot be imported (an install without the extra)."""
    code = (f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            f"from rankwarden.cli import main\nsys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_jobs_client_needs_only_httpx(tmp_path):
    result = _without(["hypercorn", "quart", "quart_trio"],
                      ["jobs", "--url", "http://127.0.0.1:9", "--token", "x", "list"])
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "rankwarden jobs list: cannot reach http://127.0.0.1:9: connection refused"


def test_jobs_reads_the_token_file_without_the_server_extra(tmp_path):
    (tmp_path / "api-token").write_text("secret\n")
    (tmp_path / "api-token").chmod(0o600)
    result = _without(["hypercorn", "quart", "quart_trio"],
                      ["jobs", "--url", "http://127.0.0.1:9", "--state-dir", str(tmp_path), "list"])
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    (tmp_path / "api-token").chmod(0o644)
    result = _without(["hypercorn"], ["jobs", "--url", "http://127.0.0.1:9", "--state-dir", str(tmp_path), "list"])
    assert result.returncode == 2 and "others may read it" in result.stderr


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    serve = _without(["hypercorn", "quart", "quart_trio"], ["serve", "--state-dir", str(tmp_path)])
    assert serve.returncode == 2
    assert serve.stderr == ("rankwarden serve: needs the 'api' extra (module 'hypercorn' is not installed): "
                            "pip install 'rankwarden[api]'\n")
    jobs = _without(["httpx"], ["jobs", "--token", "x", "list"])
    assert jobs.returncode == 2
    assert jobs.stderr == ("rankwarden jobs: needs the 'api' extra (module 'httpx' is not installed): "
                           "pip install 'rankwarden[api]'\n")


def test_a_licence_file_ships():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
