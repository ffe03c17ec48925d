"""Async save: copy on the training thread, write in the background, errors surface, buffers reused."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from rankwarden.checkpoint import AsyncCheckpointer, CheckpointStore, load_torch, torch_payload  # noqa: E402
from rankwarden.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.torch


def state():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    return {"model": model.state_dict(), "step": 3, "rng": torch.get_rng_state(), "history": [1.0, 2.0]}


def saver(store):
    return lambda step, snapshot: store.save(step, {"rank_00000.pt": torch_payload(snapshot)})


def test_async_save_writes_the_state_as_it_was_when_save_returned(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    checkpointer = AsyncCheckpointer(saver(store))
    live = state()
    expected = {k: v.clone() for k, v in live["model"].items()}
    assert checkpointer.save(10, live) is True
    live["model"]["weight"].add_(1.0)  # training goes on while the write runs
    manifest = checkpointer.wait()
    assert manifest.step == 10 and store.latest().step == 10
    loaded = load_torch(store.read(manifest, "rank_00000.pt"))
    assert all(torch.equal(loaded["model"][k], expected[k]) for k in expected)
    assert loaded["step"] == 3 and loaded["history"] == [1.0, 2.0]


def test_buffers_are_reused_between_saves(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    checkpointer = AsyncCheckpointer(saver(store))
    live = state()
    checkpointer.save(1, live)
    checkpointer.wait()
    first = {path: buf.data_ptr() for path, buf in checkpointer._buffers.items()}
    checkpointer.save(2, live)
    checkpointer.wait()
    assert {path: buf.data_ptr() for path, buf in checkpointer._buffers.items()} == first
    assert store.latest().step == 2


def test_at_most_one_save_in_flight_skip_or_wait(tmp_path):
    release = threading.Event()
    written = []

    def slow_write(step, snapshot):
        release.wait(30)
        written.append(step)

    skipper = AsyncCheckpointer(slow_write, policy="skip")
    assert skipper.save(1, state()) is True
    assert skipper.save(2, state()) is False  # one in flight: skipped, not queued
    release.set()
    skipper.wait()
    assert written == [1]

    release.clear()
    waiter = AsyncCheckpointer(slow_write, policy="wait")
    waiter.save(3, state())
    second = threading.Thread(target=waiter.save, args=(4, state()))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # blocked behind save 3
    release.set()
    second.join(30)
    waiter.wait()
    assert written == [1, 3, 4]


def test_a_failed_background_save_surfaces_and_never_moves_latest(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    store.save(1, {"rank_00000.pt": b"good"})
    reported = []

    def failing(path):
        raise OSError(28, "No space left on device")

    checkpointer = AsyncCheckpointer(lambda step, snap: store.save(step, {"rank_00000.pt": failing}),
                                     on_error=lambda step, exc: reported.append((step, str(exc))))
    checkpointer.save(2, state())
    with pytest.raises(CheckpointError, match="background save of step 2 failed: .*No space left on device"):
        checkpointer.wait()
    assert reported and reported[0][0] == 2
    assert store.latest().step == 1 and store.backend.garbage() == []
    checkpointer.wait()  # the error was delivered once; training can go on
