"""The training-script API without a coordinator: RNG state, single-rank save/restore, SIGTERM drain."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import rankwarden.worker as rw  # noqa: E402

pytestmark = pytest.mark.torch


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    from rankwarden.checkpoint import load_torch, torch_payload

    random.seed(3)
    torch.manual_seed(3)
    saved = rw.rng_state()
    expected = (random.random(), torch.rand(3))
    data = b"".join(bytes(c) for c in torch_payload({"rng": saved}).chunks())
    random.seed(99)
    torch.manual_seed(99)
    rw.set_rng_state(load_torch(data)["rng"])
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rng_states_loaded_onto_the_gpu_are_restored():
    """A checkpoint loaded with map_location="cuda" brings the RNG states back on
    the GPU; found on an H100, where every resumed rank failed with "RNG state
    must be a torch.ByteTensor"."""
    from rankwarden.checkpoint import load_torch, torch_payload

    torch.cuda.init()
    torch.manual_seed(5)
    saved = rw.rng_state()
    assert "cuda" in saved
    expected = (torch.rand(3), torch.rand(3, device="cuda"))
    data = b"".join(bytes(c) for c in torch_payload({"rng": saved}).chunks())
    torch.manual_seed(99)
    loaded = load_torch(data, map_location="cuda")["rng"]
    assert loaded["torch"].is_cuda
    rw.set_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, device="cuda"), expected[1])


def run_script(tmp_path, body: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKWARDEN_") or k == "RANKWARDEN_TEST_SESSION"}
    env.update(RANK="0", WORLD_SIZE="1")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, **kwargs)


def test_single_rank_save_and_restore_without_a_coordinator(tmp_path):
    body = f"""
        import torch, rankwarden.worker as rw
        found = rw.restore(url={str(tmp_path / 'ckpt')!r})
        start = found[0] if found else 0
        print("resumed", start, None if not found else found[1]["w"].tolist())
        rw.save(start + 5, {{"w": torch.full((2,), float(start + 5))}}, url={str(tmp_path / 'ckpt')!r})
    """
    first = run_script(tmp_path, body)
    assert first.returncode == 0, first.stderr
    assert "resumed 0 None" in first.stdout
    second = run_script(tmp_path, body)
    assert "resumed 5 [5.0, 5.0]" in second.stdout


def test_sigterm_becomes_a_drain_request_without_rankwarden(tmp_path):
    body = """
        import os, signal, time, rankwarden.worker as rw
        rw.graceful_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # what torchrun or Kubernetes sends
        deadline = time.monotonic() + 10
        while not rw.drain_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        print("drain", rw.drain_requested())
    """
    result = run_script(tmp_path, body)
    assert result.returncode == 0 and "drain True" in result.stdout


def test_multi_rank_save_needs_a_committer(tmp_path):
    body = f"""
        import torch, rankwarden.worker as rw
        from rankwarden.errors import CheckpointError
        try:
            rw.save(1, {{"w": torch.ones(1)}}, url={str(tmp_path / 'ckpt')!r})
        except CheckpointError as e:
            print("refused:", e)
    """
    script_env = {"WORLD_SIZE": "2"}
    env_body = "import os; os.environ.update(" + repr(script_env) + ")\n" + textwrap.dedent(body)
    result = run_script(tmp_path, env_body)
    assert "refused: a multi-rank checkpoint needs a committer" in result.stdout, result.stderr
