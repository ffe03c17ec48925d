"""The DCP bridge in one process (no process group): files through the store, a manifest of layout "dcp"."""

from __future__ import annotations

import warnings

import pytest

from rankwarden.checkpoint import CheckpointStore, Manifest, dcp_location, load_sharded, save_sharded
from rankwarden.errors import CheckpointError, CorruptCheckpoint

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _single_process_dcp():
    # DCP warns on every save/load without a process group that it assumes one process: that is the point here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "nested": {"b": torch.randn(5, generator=g), "name": "x", "n": 7}}


def _commit(store, step, state):
    entries = save_sharded(store, step, state, tag="t1", rank=0)
    return store.commit(step, entries, tag="t1", world_size=1, layout="dcp")


def test_a_sharded_step_is_committed_checksummed_and_loads_exactly(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    saved = _state(1)
    manifest = _commit(store, 3, saved)
    assert manifest.layout == "dcp" and {f.name for f in manifest.files} == {".metadata", "__0_0.distcp"}
    assert Manifest.decode(manifest.encode(), where="x").layout == "dcp"
    into = _state(2)
    load_sharded(store, store.verify(3), into)
    assert torch.equal(into["w"], saved["w"]) and torch.equal(into["nested"]["b"], saved["nested"]["b"])
    assert (into["nested"]["name"], into["nested"]["n"]) == ("x", 7)
    assert dcp_location(store, manifest) == str(tmp_path / "job" / "step_000000003")


def test_a_damaged_dcp_file_is_refused_by_its_checksum_before_dcp_reads_it(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    _commit(store, 1, _state(1))
    path = tmp_path / "job" / "step_000000001" / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp failed its checksum"):
        load_sharded(store, store.verify(1, checksums=False), _state(2))
    with pytest.raises(CorruptCheckpoint):
        store.verify(1)


def test_a_per_rank_step_is_not_loaded_as_sharded_state(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    store.save(1, {"rank_00000.pt": b"x"})
    with pytest.raises(CheckpointError, match="layout 'rank'"):
        load_sharded(store, store.verify(1), _state(2))


def test_an_unknown_layout_does_not_parse(tmp_path):
    raw = Manifest(job="j", step=1, world_size=1, files=[], layout="zarr").encode()
    with pytest.raises(CorruptCheckpoint, match="layout 'zarr'"):
        Manifest.decode(raw, where="j step 1")
