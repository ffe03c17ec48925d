"""Power cuts at every point of a save: a fresh reader finds the last complete step, byte for byte.

The writer runs for real through a recording model (``rankwarden.testing``):
on POSIX every file-system call goes through ``PowerLossFiles``, which
enumerates what the disk may hold after a cut following any one of them; on
an object store ``PowerLossObjectStore`` gives the objects after each
completed PUT or DELETE. Each state is materialised afresh and read by a new
``CheckpointStore``, which must find:

- a step that was saved, with exactly the bytes saved, and no older than the
  newest step whose ``save`` had returned before the cut;
- no torn committed step: every step with a manifest verifies by checksum
  (on POSIX, every ``step_N/`` has one: the rename is the commit);
- no step that retention had finished deleting;
- LATEST, if present, exactly ``step_N`` of a step that verifies, and once a
  save returned, naming that step or a newer one;
- and the next writer recovers: ``cleanup`` keeps what the reader found, and
  a new save commits and reads back.
"""

from __future__ import annotations

import os
import shutil
import uuid

import fsspec

from rankwarden.checkpoint import CheckpointStore, step_dir_name
from rankwarden.errors import CorruptCheckpoint
from rankwarden.testing import PowerLossFiles, PowerLossObjectStore


class Chunks:
    """A payload streamed in pieces (the shape of TensorPayload)."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    def chunks(self):
        return [memoryview(p) for p in self.parts]


def writes(data: bytes):
    """A payload written by a function to a path (the shape of torch.save)."""

    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    return write


def expected(step: int) -> dict[str, bytes]:
    return {
        "rank_00000.bin": b"%03d-bytes|" % step * 8,
        "rank_00001.bin": b"%03d-chunk|" % step * 5 + b"second half",
        "rank_00002.pt": b"%03d-torch.save|" % step * 3,
    }


def payloads(step: int) -> dict:
    data = expected(step)
    chunked = data["rank_00001.bin"]
    return {
        "rank_00000.bin": data["rank_00000.bin"],
        "rank_00001.bin": Chunks(chunked[:20], chunked[20:]),
        "rank_00002.pt": writes(data["rank_00002.pt"]),
    }


def run_saves(store: CheckpointStore, model) -> None:
    """Two saves, retention deleting the first, a third save: every kind of commit-plane write."""
    for step in (1, 2):
        store.save(step, payloads(step))
        model.mark(("saved", step))
    deleted = store.retain(1)
    assert deleted == [1]
    model.mark(("deleted", 1))
    store.save(3, payloads(3))
    model.mark(("saved", 3))


def observe(reader: CheckpointStore, *, rename_commits: bool) -> tuple[list[str], tuple | None, bytes | None, set]:
    """What a fresh reader sees: torn steps, the step it loads (with bytes), LATEST, the verifying steps."""
    torn, good = [], set()
    for step, path in reader.backend.step_dirs().items():
        if not rename_commits and reader.backend.size(f"{path}/manifest.json") is None:
            continue  # an object store's uncommitted payloads: not a step
        try:
            reader.verify(step, checksums=True)
            good.add(step)
        except CorruptCheckpoint as exc:
            torn.append(str(exc))
    found = reader.load_latest()
    loaded = None if found is None else (found[0].step, found[1])
    latest = reader.backend.read_latest()
    # The next writer after the crash: cleanup keeps what was found, and a new save commits over the debris.
    reader.cleanup()
    again = reader.load_latest()
    if (None if again is None else (again[0].step, again[1])) != loaded:
        torn.append(f"cleanup after the crash changed what a reader loads, from {loaded and loaded[0]} "
                    f"to {again and again[0].step}")
    reader.save(9, payloads(9))
    after = reader.load_latest()
    if after is None or after[0].step != 9 or after[1] != expected(9):
        torn.append("a save after the crash did not commit")
    return torn, loaded, latest, good


def problems(marks: tuple, seen: tuple) -> list[str]:
    torn, loaded, latest, good = seen
    saved = [label[1] for label in marks if label[0] == "saved"]
    deleted = {label[1] for label in marks if label[0] == "deleted"}
    found = []
    found += [f"a torn step is visible: {reason}" for reason in torn]
    if saved and loaded is None:
        found.append(f"no step found, but save({saved[-1]}) had returned")
    if loaded is not None:
        step, data = loaded
        if step not in (1, 2, 3) or data != expected(step):
            found.append(f"step {step} was loaded with bytes that were never saved as it")
        elif saved and step < max(saved):
            found.append(f"step {step} was loaded, but save({max(saved)}) had returned")
    found += [f"step {step} is back after retention deleted it" for step in deleted & good]
    if latest is not None:
        named = latest.decode(errors="replace").strip()
        if latest not in {(step_dir_name(s) + "\n").encode() for s in good}:
            found.append(f"LATEST holds {latest!r}, not the name of a step that verifies")
        elif saved and named < step_dir_name(max(saved)):
            found.append(f"LATEST names {named}, but save({max(saved)}) had returned")
    elif saved:
        found.append(f"LATEST is missing, but save({saved[-1]}) had returned")
    return found


def check_every_state(model, read_state) -> int:
    """Check every crash state of ``model``; ``read_state(state)`` observes one. Returns how many were read."""
    cache: dict = {}
    for state in model.states():
        key = frozenset(state.files.items())
        if key not in cache:
            cache[key] = read_state(state)
        wrong = problems(state.marks, cache[key])
        assert not wrong, (
            f"{state.how}:\n" + "\n".join(f"  - {w}" for w in wrong)
            + f"\nlast operations before the cut:\n{model.history(state.cut)}"
            + f"\nwhat survived: {sorted(state.files)}"
        )
    return len(cache)


def test_posix_power_cut_at_every_operation_of_a_save(tmp_path):
    disk = tmp_path / "disk"
    store = CheckpointStore(str(disk), "job")
    model = PowerLossFiles(str(disk))
    store.backend.files = model
    run_saves(store, model)
    counter = iter(range(1 << 30))

    def read_state(state):
        where = tmp_path / f"after-cut-{next(counter)}"
        state.materialise(str(where))
        try:
            return observe(CheckpointStore(str(where), "job"), rename_commits=True)
        finally:
            shutil.rmtree(where)

    assert check_every_state(model, read_state) > 100


def test_object_store_writer_killed_after_every_request():
    root = f"/rw-powerloss-{uuid.uuid4().hex}"
    store = CheckpointStore(f"memory://{root}", "job")
    model = PowerLossObjectStore(store.backend.fs, root)
    store.backend.fs = model
    fs = fsspec.filesystem("memory")
    try:
        run_saves(store, model)

        def read_state(state):
            where = f"/rw-powerloss-{uuid.uuid4().hex}"
            state.put_objects(fs, where)
            try:
                return observe(CheckpointStore(f"memory://{where}", "job"), rename_commits=False)
            finally:
                if fs.exists(where):
                    fs.rm(where, recursive=True)

        assert check_every_state(model, read_state) > 10
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_the_model_loses_what_was_not_synced(tmp_path):
    # The model itself: an un-fsynced file or an un-synced rename can vanish.
    model = PowerLossFiles(str(tmp_path / "d"))
    base = str(tmp_path / "d")
    with model.open(os.path.join(base, "a"), "wb") as f:
        f.write(b"data")
        model.fsync(f)
    model.fsync_dir(base)
    model.rename(os.path.join(base, "a"), os.path.join(base, "b"))
    with model.open(os.path.join(base, "c"), "wb") as f:
        f.write(b"unsynced")
    final = [s.files for s in model.states() if s.cut == 7]
    assert {"a": b"data"} in final  # the rename lost
    assert {"b": b"data", "c": b""} in final and {"b": b"data", "c": bytes(8)} in final
    assert {"b": b"data", "c": b"unsynced"} in final
    assert all(s.get("a", s.get("b")) == b"data" for s in final)
