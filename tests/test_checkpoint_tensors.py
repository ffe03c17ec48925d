"""The tensor payload format: round trips, the torch.save fallback, hostile input."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from rankwarden.checkpoint import CheckpointStore, load_torch, torch_payload  # noqa: E402
from rankwarden.checkpoint._tensors import MAGIC, TensorPayload  # noqa: E402
from rankwarden.errors import CheckpointError, CorruptCheckpoint  # noqa: E402

pytestmark = pytest.mark.torch


def training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # int keys, tuples, tensor `step`s
        "rng": torch.get_rng_state(),
        "extra": {"bf16": torch.randn(3, 5).to(torch.bfloat16), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3),
                  "strided": torch.arange(12.0).reshape(3, 4).t(), "dtype": torch.float16, "size": torch.Size([2, 3]),
                  "flags": [True, None, 1, 2.0, "s", b"b"]},
        "step": 41,
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def _bytes(payload) -> bytes:
    return b"".join(bytes(c) for c in payload.chunks())


def test_a_training_state_round_trips_exactly():
    state = training_state()
    payload = torch_payload(state)
    assert isinstance(payload, TensorPayload)
    data = _bytes(payload)
    assert data.startswith(MAGIC) and len(data) == payload.size
    loaded = load_torch(data)
    assert _same(state, loaded)
    # The loaded optimizer state really loads into an optimizer.
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    model.load_state_dict(loaded["model"])
    torch.optim.AdamW(model.parameters()).load_state_dict(loaded["optimizer"])


def test_states_only_pickle_could_hold_are_refused_at_save_time(tmp_path):
    class Custom:
        pass

    with pytest.raises(CheckpointError, match=r"state\['x'\]: .*Custom .* cannot be saved in a checkpoint"):
        torch_payload({"x": Custom()})
    store = CheckpointStore(str(tmp_path), "job")
    state = {"w": torch.ones(3), "note": {1, 2}}  # a set: in the tensor format since it must load back
    manifest = store.save(1, {"rank_00000.pt": torch_payload(state)})
    data = store.read(manifest, "rank_00000.pt")
    assert data.startswith(MAGIC)
    assert _same(load_torch(data)["w"], state["w"]) and load_torch(data)["note"] == {1, 2}


def test_tensor_payloads_go_through_the_store_with_a_checksum(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    state = training_state()
    manifest = store.save(3, {"rank_00000.pt": torch_payload(state)})
    assert _same(state, load_torch(store.read(manifest, "rank_00000.pt")))
    assert store.latest(checksums=True).step == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:40],  # truncated header
        lambda d: d[:-100],  # truncated tensor bytes
        lambda d: MAGIC + b"\xff" * 8 + d[16:],  # absurd header length
    ],
)
def test_damaged_tensor_payloads_raise_corrupt_checkpoint(damage):
    data = _bytes(torch_payload({"w": torch.arange(100.0)}))
    with pytest.raises(CorruptCheckpoint, match="tensor payload does not decode"):
        load_torch(damage(data))


def test_a_hostile_header_cannot_reach_arbitrary_torch_attributes():
    import struct

    import msgspec

    header = msgspec.msgpack.encode({"tree": {"t": "dt", "v": "save"}, "tensors": []})
    data = MAGIC + struct.pack("<Q", len(header)) + header
    with pytest.raises(CorruptCheckpoint, match="unknown dtype 'save'"):
        load_torch(data)
    header = msgspec.msgpack.encode({"tree": {"t": "T", "i": 0}, "tensors": [["load", [1], 0, 4]]})
    with pytest.raises(CorruptCheckpoint, match="bad tensor entry"):
        load_torch(MAGIC + struct.pack("<Q", len(header)) + header + bytes(64))


def test_torch_save_payloads_still_load_with_weights_only():
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    assert torch.equal(load_torch(buffer.getvalue())["w"], torch.ones(2))


def _payload_with_tree(tree, tensors=(), body=b""):
    import struct

    import msgspec

    header = msgspec.msgpack.encode({"tree": tree, "tensors": list(tensors)})
    prefix = MAGIC + struct.pack("<Q", len(header)) + header
    return prefix + bytes(-len(prefix) % 64) + body


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"t": "dd", "f": "eval", "v": []}, "unknown defaultdict factory 'eval'"),
        ({"t": "od", "v": [], "a": {"__class__": 1}}, "bad attribute name '__class__'"),
        ({"t": "N", "i": 0, "d": "O", "s": [1]}, "unsupported numpy dtype 'O'"),
        ({"t": "ns", "d": "<f8", "v": b"123"}, "numpy scalar of the wrong size"),
        ({"t": "set", "v": [{"t": "l", "v": []}]}, "unhashable"),
        ({"t": "T", "i": 0}, "bad tensor entry qint8"),
    ],
)
def test_hostile_headers_of_every_node_kind_raise_corrupt_checkpoint(tree, message):
    entries = [["qint8", [1], 0, 1]] if tree["t"] == "T" else [["uint8", [8], 0, 8]]
    with pytest.raises(CorruptCheckpoint, match=message):
        load_torch(bytearray(_payload_with_tree(tree, entries, bytes(64))))


def test_a_hostile_namedtuple_node_never_calls_what_it_names():
    # os.system is found in sys.modules but is not a namedtuple class: a fresh
    # namedtuple is made instead, and nothing is called or imported.
    tree = {"t": "nt", "m": "os", "q": "system", "n": "Evil", "f": ["a"], "v": ["echo owned"]}
    loaded = load_torch(bytearray(_payload_with_tree(tree)))
    assert type(loaded).__name__ == "Evil" and loaded.a == "echo owned"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_generator_for_a_missing_device_is_a_clear_error_not_corruption():
    tree = {"t": "G", "d": "cuda:3", "v": b"\0" * 16}
    with pytest.raises(CheckpointError, match="torch.Generator on 'cuda:3', which this process cannot create") as info:
        load_torch(bytearray(_payload_with_tree(tree)))
    assert not isinstance(info.value, CorruptCheckpoint)
