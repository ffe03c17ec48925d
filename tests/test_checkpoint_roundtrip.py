"""What saves must load: every state round-trips exactly or fails at save time.

Each test saves through the store, reads back and loads, then compares type
and value (``_same``). States the tensor format cannot hold raise
``CheckpointError`` from ``torch_payload``, naming the path inside the state.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import warnings

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from rankwarden.checkpoint import AsyncCheckpointer, CheckpointStore, load_torch, torch_payload  # noqa: E402
from rankwarden.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.torch

Point = collections.namedtuple("Point", ["x", "y"])


def _same(a, b) -> bool:
    """Same type and value all the way down (tensors bit-exact, NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and not b.is_conj() and not b.is_neg() and torch.equal(_raw(a), _raw(b)))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Generator):
        return a.device == b.device and a.initial_seed() == b.initial_seed() and torch.equal(a.get_state(), b.get_state())
    if isinstance(a, dict):
        return (list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
                and getattr(a, "__dict__", None) == getattr(b, "__dict__", None)
                and getattr(a, "default_factory", None) is getattr(b, "default_factory", None))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    return a == b


def _raw(t):
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def _round_trip(tmp_path, state, step=1):
    store = CheckpointStore(str(tmp_path), "job")
    manifest = store.save(step, {"rank_00000.pt": torch_payload(state)})
    return load_torch(store.read(manifest, "rank_00000.pt"))


def test_numpy_arrays_scalars_and_rng_states_round_trip(tmp_path):
    # Before: numpy fell back to torch.save, whose weights_only load then refused it on every restart.
    rs = np.random.RandomState(7)
    rs.standard_normal(3)  # has_gauss and a cached gaussian in the state
    state = {
        "rng": {"numpy": rs.get_state(), "numpy_gen": np.random.default_rng(3).bit_generator.state,
                "python": random.Random(5).getstate()},
        "arrays": [np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((2, 3))),
                   np.array([1, 2], dtype=">i4"), np.zeros((0, 3), dtype=np.int16), np.array(5.5),
                   np.array([True, False]), np.array([1 + 2j], dtype=np.complex64), np.array(["ab", "c"]),
                   np.array(["2024-01-01"], dtype="datetime64[D]"), np.arange(10)[::3]],
        "scalars": [np.float64(1.5), np.float32(-0.0), np.int64(-3), np.uint8(255), np.bool_(True), np.float16(2)],
    }
    loaded = _round_trip(tmp_path, state)
    assert _same(state, loaded)
    restored = np.random.RandomState()
    restored.set_state(loaded["rng"]["numpy"])
    assert restored.standard_normal(4).tolist() == rs.standard_normal(4).tolist()
    assert loaded["arrays"][0].flags.writeable


def test_a_torch_generator_round_trips_and_continues_the_same_stream(tmp_path):
    gen = torch.Generator().manual_seed(1234)
    torch.randn(10, generator=gen)
    loaded = _round_trip(tmp_path, {"rng": {"torch": gen}})["rng"]["torch"]
    assert _same(gen, loaded)
    assert torch.equal(torch.randn(5, generator=loaded), torch.randn(5, generator=gen))


def test_views_load_as_their_values_not_their_memory(tmp_path):
    # Before: x.conj() (and the negative-bit view behind x.conj().imag) loaded unconjugated.
    z = torch.complex(torch.arange(6.0), torch.arange(6.0) + 10).reshape(2, 3)
    base = torch.arange(24.0).reshape(4, 6)
    views = {
        "conj": z.conj(), "conj_t": z.conj().t(), "neg": torch._neg_view(base), "conj_imag": z.conj().imag,
        "transposed": base.t(), "offset": base[1:, 2:], "strided": base[:, ::2], "expanded": torch.ones(1, 3).expand(4, 3),
        "zero": torch.empty(2, 0, 5), "scalar": torch.tensor(3.0), "empty_offset": base[4:],
    }
    loaded = _round_trip(tmp_path, views)
    for key, view in views.items():
        assert _same(view.resolve_conj().resolve_neg().contiguous(), loaded[key]), key
        assert loaded[key].is_contiguous(), key
    assert torch.equal(loaded["conj"], torch.conj_physical(z))
    assert torch.equal(loaded["neg"], -base)


_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)} - _QUANTIZED, key=str)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype):
    # Random bit patterns (NaNs, subnormals...) must come back bit for bit, column views too.
    gen = torch.Generator().manual_seed(0)
    size = dtype.itemsize
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (5, 3 * size), dtype=torch.uint8, generator=gen)
    tensor = raw.view(dtype)
    loaded = _round_trip(tmp_path, {"t": tensor, "t_col": tensor[:, 1], "dtype": dtype})
    assert loaded["dtype"] is dtype
    assert loaded["t"].dtype == dtype and loaded["t"].shape == (5, 3) and loaded["t_col"].shape == (5,)
    assert torch.equal(loaded["t"].view(torch.uint8), raw)
    assert torch.equal(loaded["t_col"].view(torch.uint8), raw[:, size : 2 * size].reshape(-1))


def test_python_ints_of_any_size_round_trip(tmp_path):
    # Before: ints outside msgpack's 64-bit range did not go into the tensor format.
    ints = [0, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 2**200, -(2**4000) + 1, 10**5000]
    state = {"ints": ints, "as_key": {2**70: "big"}, "pcg": np.random.default_rng(0).bit_generator.state}
    assert _same(state, _round_trip(tmp_path, state))


class Mode(enum.IntEnum):
    A = 1


def test_container_types_and_scalars_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    assert isinstance(sd, collections.OrderedDict) and sd._metadata
    local = collections.namedtuple("Local", "a b")
    state = {
        "model": sd,
        "point": Point(torch.ones(2), [1, 2]),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "counts": collections.defaultdict(list, {"x": [1]}),
        "sets": [{1, "a", (2, 3)}, frozenset({b"x"}), set()],
        "numbers": [1 + 2j, float("nan"), float("-inf"), -0.0, True, None],
        "text": ["\ud800 lone surrogate", "ünïcode", b"\x00bytes", bytearray(b"ba")],
        "torch": [torch.device("cpu"), torch.float8_e4m3fn, torch.Size([2, 0])],
        "param": torch.nn.Parameter(torch.ones(2)),
        "frozen_param": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "leaf_grad": torch.zeros(2, requires_grad=True),
    }
    loaded = _round_trip(tmp_path, state)
    assert _same(state, loaded)
    assert type(loaded["point"]) is Point and loaded["point"].y == [1, 2]
    assert loaded["counts"]["new"] == []
    # A namedtuple whose class cannot be found at load time comes back as an
    # equivalent namedtuple (same name and fields), not as a plain tuple.
    nt = _round_trip(tmp_path, {"local": local(1, 2)}, step=2)["local"]
    assert type(nt).__name__ == "Local" and nt._fields == ("a", "b") and nt.a == 1 and nt == (1, 2)
    # The model state loads back into the model, version metadata included.
    model.load_state_dict(loaded["model"])


class Custom:
    pass


class Tagged(torch.Tensor):
    pass


def _cyclic():
    node: list = []
    node.append(node)
    return node


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: {"a": [1, {"b": Custom()}]}, r"state\['a'\]\[1\]\['b'\]: tests\.test_checkpoint_roundtrip\.Custom "),
        (lambda: {"rng": {"numpy": np.array([object()])}}, r"state\['rng'\]\['numpy'\]: numpy\.ndarray of dtype object"),
        (lambda: {"m": np.zeros(2, dtype=[("a", "i4")])}, r"state\['m'\]: numpy\.ndarray of dtype \[\('a', '<i4'\)\]"),
        (lambda: {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, r"state\['q'\]: a quantized tensor"),
        (lambda: {"s": torch.ones(2, 2).to_sparse()}, r"state\['s'\]: a tensor with layout torch\.sparse_coo"),
        (lambda: {"meta": torch.empty(3, device="meta")}, r"state\['meta'\]: a tensor on the meta device"),
        (lambda: {"sub": torch.ones(2).as_subclass(Tagged)}, r"state\['sub'\]: a tensor of type .*Tagged"),
        (lambda: {"d": collections.defaultdict(lambda: 0)}, r"state\['d'\]: a defaultdict whose default_factory"),
        (lambda: {"e": Mode.A}, r"state\['e'\]: tests\.test_checkpoint_roundtrip\.Mode "),
        (lambda: {"f": lambda: 1}, r"state\['f'\]: function "),
        (lambda: {"loop": _cyclic()}, r"state\['loop'\]\[0\]: list .*reference cycle"),
    ],
    ids=["object", "numpy-object", "numpy-structured", "quantized", "sparse", "meta", "subclass", "defaultdict",
         "intenum", "function", "cycle"],
)
def test_states_that_cannot_be_restored_fail_at_save_time(make, message):
    # Before: each of these fell back to torch.save, so the save "worked" and every restart failed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        state = make()
    with pytest.raises(CheckpointError, match=message):
        torch_payload(state)


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**130), max_value=2**130), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=8), st.complex_numbers(allow_nan=False),
)
_trees = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.integers(), st.text(max_size=4)), inner, max_size=4),
        st.dictionaries(st.text(max_size=4), inner, max_size=4).map(collections.OrderedDict),
        st.frozensets(st.integers(), max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_any_tree_of_plain_values_round_trips(tree):
    from rankwarden.checkpoint._tensors import load_tensor_payload

    payload = torch_payload({"tree": tree})
    data = bytearray(b"".join(bytes(c) for c in payload.chunks()))
    assert _same({"tree": tree}, load_tensor_payload(data))


def test_async_snapshots_keep_types_and_freeze_generators(tmp_path):
    store = CheckpointStore(str(tmp_path), "job")
    model = torch.nn.Linear(2, 2)
    gen = torch.Generator().manual_seed(9)
    state = {"model": model.state_dict(), "point": Point(torch.ones(1), 2), "gen": gen,
             "np": np.arange(3.0), "counts": collections.defaultdict(int, {"a": 1})}
    expected = {"model": model.state_dict(), "point": Point(torch.ones(1), 2),
                "gen": torch.Generator().set_state(gen.get_state()), "np": np.arange(3.0),
                "counts": collections.defaultdict(int, {"a": 1})}
    checkpointer = AsyncCheckpointer(lambda step, snap: store.save(step, {"r.pt": torch_payload(snap)}))
    checkpointer.save(1, state)
    torch.randn(100, generator=gen)  # training goes on while the save runs
    state["np"][0] = 99.0
    manifest = checkpointer.wait()
    assert _same(expected, load_torch(store.read(manifest, "r.pt")))


def test_loaded_tensors_start_their_own_storage(tmp_path):
    # torch.set_rng_state reads the storage from its start: a tensor at an
    # offset inside one shared storage crashed the process (segfault).
    torch.manual_seed(5)
    state = {"weights": torch.randn(1000), "rng": torch.get_rng_state(), "col": torch.arange(12.0).reshape(3, 4)[:, 1]}
    expected = torch.rand(3)
    loaded = _round_trip(tmp_path, state)
    for tensor in loaded.values():
        assert tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes
    torch.manual_seed(6)
    torch.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
