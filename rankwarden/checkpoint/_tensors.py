"""rankwarden's tensor payload: a msgpack skeleton plus the tensors' raw bytes.

    0    8 bytes   magic b"RWTENS01"
    8    8 bytes   header length H, little-endian
    16   H bytes   msgpack header: {"tree": skeleton, "tensors": [[dtype, shape, offset, nbytes], ...]}
    D    ...       tensor bytes; offsets are relative to D = 16 + H rounded up to 64

Why not just torch.save: its zip writer copies and CRCs every byte on the
training process's one core, and loading it means unpickling. Here the bytes
are written straight from the tensors' memory while a second thread
checksums the same memory, so a save runs at the disk's speed; and loading
runs no pickle at all, and makes the tensors views of the buffer the file
was read into (no copy).

What a save must hold is what a load can give back, so there is no
fallback: a state either round-trips exactly (same types, same values, bit
for bit) or ``TensorPayload(state)`` raises ``CheckpointError`` at save time,
naming the path inside the state (``state['rng']['numpy']: numpy.ndarray of
dtype object ...``). What round-trips:

    None, bool, int (any size), float, complex, str (lone surrogates too), bytes, bytearray
    dict, list, tuple, set, frozenset
    collections.OrderedDict, with its attributes (a module state dict's ``_metadata``)
    collections.defaultdict whose default_factory is None or a builtin container/number type
    namedtuple: the same class when its module is imported at load time (it is looked
        up, never imported); otherwise a new namedtuple class with the same name and
        fields (equal as a tuple, same attribute access, ``type(x) is C`` false)
    torch.Tensor and torch.nn.Parameter (requires_grad kept), every dtype but the
        quantized ones; torch.Size, torch.dtype, torch.device, torch.Generator (its state)
    numpy.ndarray (bool, int, uint, float, complex, datetime, timedelta, bytes and
        str dtypes, any byte order) and numpy scalars of those dtypes

Tensors and arrays come back contiguous (a transposed, sliced, expanded,
conjugated or negative-bit view comes back as a fresh tensor holding the
values the view showed), and on the CPU unless ``map_location`` says
otherwise. Objects the state holds twice come back as two equal copies.
Anything else (custom classes, enums, str/int subclasses, sparse, quantized,
nested or meta tensors, tensor subclasses, numpy object or structured arrays,
reference cycles) is refused at save time.

Skeleton nodes: None, bool, int, float, str, bytes as themselves; everything
else as {"t": kind, ...}: "d" dict (pairs, so int keys and order survive),
"od" OrderedDict, "dd" defaultdict, "l" list, "u" tuple, "nt" namedtuple,
"set", "fs" frozenset, "S" torch.Size, "T" tensor index, "dt" dtype, "D"
device, "G" generator, "N" numpy array, "ns" numpy scalar, "bi" big int,
"c" complex, "s8" non-UTF-8 str, "ba" bytearray.
"""

from __future__ import annotations

import collections
import ctypes
import struct
import sys
from typing import Any, Iterator

import msgspec

from rankwarden.errors import CheckpointError, CorruptCheckpoint

__all__ = ["MAGIC", "TensorPayload", "is_tensor_payload", "load_tensor_payload"]

MAGIC = b"RWTENS01"
_ALIGN = 64
_PAD = bytes(_ALIGN)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack holds as an int
_NUMPY_KINDS = "biufcmMSU"  # fixed-size dtypes whose dtype.str names them exactly
_FACTORIES = {f.__name__: f for f in (dict, list, set, frozenset, tuple, int, float, complex, str, bytes, bool)}
_FACTORIES["OrderedDict"] = collections.OrderedDict
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _format_path(path: tuple) -> str:
    return "state" + "".join(path)


def _type_name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


class TensorPayload:
    """A payload the store writes chunk by chunk, checksumming the same memory in parallel.

    Raises ``CheckpointError`` if ``state`` holds anything that would not load back as it is."""

    def __init__(self, state: Any) -> None:
        import torch

        self._torch = torch
        self._np = sys.modules.get("numpy")  # a state can hold numpy objects only if numpy is imported
        self._blobs: list = []  # contiguous CPU tensors or uint8 memoryviews, in file order
        self._active: set[int] = set()  # containers on the current path (cycle detection)
        try:
            tree = self._encode(state, ())
        except RecursionError:
            raise CheckpointError("state is nested too deeply to be saved in a checkpoint") from None
        entries, offset = [], 0
        for blob, dtype, shape in self._entries:
            nbytes = _nbytes(blob)
            entries.append([dtype, shape, offset, nbytes])
            offset += nbytes + (-nbytes % _ALIGN)
        header = _encoder.encode({"tree": tree, "tensors": entries})
        self._prefix = MAGIC + struct.pack("<Q", len(header)) + header
        self._prefix += bytes(-len(self._prefix) % _ALIGN)
        self.size = len(self._prefix) + offset

    @property
    def _entries(self) -> Iterator[tuple]:
        for blob in self._blobs:
            if isinstance(blob, memoryview):
                yield blob, "uint8", [len(blob)]
            else:
                yield blob, _dtype_name(blob.dtype), list(blob.shape)

    def _refuse(self, path: tuple, what: str, hint: str) -> CheckpointError:
        return CheckpointError(f"{_format_path(path)}: {what} cannot be saved in a checkpoint: {hint}")

    def _encode(self, node: Any, path: tuple) -> Any:
        kind = type(node)
        if node is None or kind is bool or kind is float or kind is bytes:
            return node
        if kind is int:
            if _INT_MIN <= node <= _INT_MAX:
                return node
            return {"t": "bi", "v": node.to_bytes(node.bit_length() // 8 + 1, "little", signed=True)}
        if kind is str:
            if node.isascii():
                return node
            try:
                node.encode("utf-8")
                return node
            except UnicodeEncodeError:
                return {"t": "s8", "v": node.encode("utf-8", "surrogatepass")}
        if kind is complex:
            return {"t": "c", "v": [node.real, node.imag]}
        if kind is bytearray:
            return {"t": "ba", "v": bytes(node)}
        torch = self._torch
        if isinstance(node, torch.Tensor):
            return self._tensor(node, path)
        if kind is torch.Size:
            return {"t": "S", "v": list(node)}
        if kind is torch.dtype:
            return {"t": "dt", "v": _dtype_name(node)}
        if kind is torch.device:
            return {"t": "D", "v": str(node)}
        if kind is torch.Generator:
            return {"t": "G", "d": str(node.device), "v": bytes(node.get_state().tolist())}
        np = self._np
        if np is not None and isinstance(node, (np.ndarray, np.generic)):
            return self._numpy(node, path, np)
        if kind in (dict, collections.OrderedDict, collections.defaultdict, list, tuple, set, frozenset) or (
            isinstance(node, tuple) and hasattr(kind, "_fields")
        ):
            if id(node) in self._active:
                raise self._refuse(path, _type_name(kind), "it contains itself (a reference cycle)")
            self._active.add(id(node))
            try:
                return self._container(node, kind, path)
            finally:
                self._active.discard(id(node))
        raise self._refuse(path, f"{_type_name(kind)} {_short_repr(node)}",
                           "only plain values, containers, tensors and numpy values are; "
                           "store what it holds (e.g. its state_dict(), or int(x) for an enum)")

    def _container(self, node: Any, kind: type, path: tuple) -> Any:
        if kind is list or kind is tuple:
            return {"t": "l" if kind is list else "u", "v": [self._encode(v, path + (f"[{i}]",)) for i, v in enumerate(node)]}
        if kind is set or kind is frozenset:
            where = path + ("{...}",)
            return {"t": "set" if kind is set else "fs", "v": [self._encode(v, where) for v in node]}
        if isinstance(node, tuple):  # a namedtuple
            values = [self._encode(v, path + (f".{f}",)) for f, v in zip(kind._fields, node)]
            return {"t": "nt", "m": kind.__module__, "q": kind.__qualname__, "n": kind.__name__,
                    "f": list(kind._fields), "v": values}
        pairs = [[self._encode(k, path + (f"<key {k!r}>",)), self._encode(v, path + (f"[{k!r}]",))] for k, v in node.items()]
        if kind is dict:
            return {"t": "d", "v": pairs}
        if kind is collections.defaultdict:
            factory = node.default_factory
            name = "" if factory is None else getattr(factory, "__name__", "")
            if factory is not None and _FACTORIES.get(name) is not factory:
                raise self._refuse(path, f"a defaultdict whose default_factory is {factory!r}",
                                   "only None or a builtin type (list, dict, int, ...) can be restored; use dict(d)")
            return {"t": "dd", "f": name, "v": pairs}
        attrs = {k: self._encode(v, path + (f".{k}",)) for k, v in vars(node).items()}
        return {"t": "od", "v": pairs, **({"a": attrs} if attrs else {})}

    def _tensor(self, node: Any, path: tuple) -> Any:
        torch = self._torch
        kind = type(node)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            raise self._refuse(path, f"a tensor of type {_type_name(kind)}", "save a plain tensor (t.as_subclass(torch.Tensor))")
        if node.is_quantized:
            raise self._refuse(path, "a quantized tensor", "save t.int_repr(), t.q_scale() and t.q_zero_point(), or t.dequantize()")
        if node.is_nested:
            raise self._refuse(path, "a nested tensor", "save its components (t.unbind())")
        if node.layout != torch.strided:
            raise self._refuse(path, f"a tensor with layout {node.layout}", "save t.to_dense() or its indices and values")
        if node.device.type == "meta":
            raise self._refuse(path, "a tensor on the meta device", "it has no data; materialise it first")
        if getattr(node, "__dict__", None):
            raise self._refuse(path, f"a tensor with Python attributes {sorted(vars(node))}",
                               "they would be lost; save them beside the tensor")
        tensor = node.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        # A conjugate or negative-bit view shares the memory of its base: the
        # bytes to write are those of the values it shows, so resolve them.
        if tensor.is_conj():
            tensor = tensor.resolve_conj()
        if tensor.is_neg():
            tensor = tensor.resolve_neg()
        if not tensor.is_contiguous():
            tensor = _contiguous(tensor, torch)
        self._blobs.append(tensor)
        encoded = {"t": "T", "i": len(self._blobs) - 1}
        if kind is torch.nn.Parameter:
            encoded["p"] = True
        if node.requires_grad:
            encoded["g"] = True
        return encoded

    def _numpy(self, node: Any, path: tuple, np) -> Any:
        dtype = node.dtype
        kind = type(node)
        if dtype.kind not in _NUMPY_KINDS or dtype.itemsize == 0:
            raise self._refuse(path, f"{_type_name(kind)} of dtype {dtype}",
                               "only bool, number, datetime, bytes and str dtypes are (no object or structured dtypes)")
        if isinstance(node, np.generic):
            return {"t": "ns", "d": dtype.str, "v": node.tobytes()}
        if kind is not np.ndarray:
            raise self._refuse(path, f"{_type_name(kind)}", "save np.asarray(x) (a plain ndarray)")
        flat = np.ascontiguousarray(node).reshape(-1).view(np.uint8)
        self._blobs.append(memoryview(flat))
        return {"t": "N", "i": len(self._blobs) - 1, "d": dtype.str, "s": list(node.shape)}

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self._prefix)
        for blob in self._blobs:
            nbytes = _nbytes(blob)
            if nbytes:
                yield blob if isinstance(blob, memoryview) else _memory(blob, nbytes)
            if nbytes % _ALIGN:
                yield memoryview(_PAD)[: -nbytes % _ALIGN]


def _nbytes(blob) -> int:
    return len(blob) if isinstance(blob, memoryview) else blob.numel() * blob.element_size()


def _memory(tensor, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _contiguous(tensor, torch):
    # Copy through a same-width integer view: not every dtype has a copy
    # kernel (int1..uint7 do not), but every bit pattern can be moved.
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(tensor.element_size())
    if bits is None or tensor.dtype == bits:
        return tensor.contiguous()
    return tensor.view(bits).contiguous().view(tensor.dtype)


def _short_repr(node: Any) -> str:
    try:
        text = repr(node)
    except Exception:  # a broken __repr__ must not hide the real error
        return "(unprintable)"
    return text if len(text) <= 60 else text[:57] + "..."


def is_tensor_payload(data) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def load_tensor_payload(data: bytes | bytearray | memoryview, *, map_location: Any = "cpu") -> Any:
    """Rebuild the state.

    With a writable buffer (the bytearray ``CheckpointStore.read`` returns),
    CPU tensors and numpy arrays are views of it, not copies: the buffer
    lives as long as any of them does. A read-only buffer (bytes) is copied once."""
    import torch

    view = memoryview(data).cast("B")
    if view.readonly:
        view = memoryview(bytearray(view))
    try:
        (length,) = struct.unpack_from("<Q", view, len(MAGIC))
        if 16 + length > len(view):
            raise ValueError(f"header of {length} bytes does not fit in {len(view)}")
        header = _decoder.decode(view[16 : 16 + length])
        base = 16 + length + (-(16 + length) % _ALIGN)
        return _Decoder(view, base, header["tensors"], torch, map_location).decode(header["tree"])
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError, AttributeError,
            struct.error, msgspec.DecodeError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"tensor payload does not decode: {exc}") from None


class _Decoder:
    def __init__(self, view: memoryview, base: int, entries: list, torch, map_location: Any) -> None:
        self.view, self.base, self.entries, self.torch = view, base, entries, torch
        self.move = map_location not in (None, "cpu") and map_location != torch.device("cpu")
        self.map_location = map_location
        self.namedtuples: dict = {}

    def _entry(self, index: int) -> tuple:
        dtype_name, shape, offset, nbytes = self.entries[index]
        torch = self.torch
        dtype = getattr(torch, str(dtype_name), None)
        if (
            not isinstance(dtype, torch.dtype)
            or _dtype_name(dtype) in _QUANTIZED
            or not all(type(n) is int and n >= 0 for n in shape)
            or type(offset) is not int or offset < 0 or offset % _ALIGN
            or type(nbytes) is not int or nbytes < 0 or self.base + offset + nbytes > len(self.view)
        ):
            raise ValueError(f"bad tensor entry {dtype_name} at {offset}")
        numel = 1
        for n in shape:
            numel *= n
        if nbytes != numel * dtype.itemsize:
            raise ValueError(f"bad tensor entry {dtype_name} at {offset}: {nbytes} bytes for shape {shape}")
        return dtype, shape, self.base + offset, nbytes

    def tensor(self, index: int):
        # Each tensor gets its own storage over its bytes of the buffer (not a
        # slice of one big storage): some torch code reads a tensor's storage
        # from its start, ignoring storage_offset (torch.set_rng_state crashes).
        dtype, shape, start, nbytes = self._entry(index)
        torch = self.torch
        if nbytes:
            raw = torch.frombuffer(self.view, dtype=torch.uint8, count=nbytes, offset=start)
        else:
            raw = torch.empty(0, dtype=torch.uint8)
        tensor = raw.view(dtype).reshape(shape)
        return tensor.to(self.map_location) if self.move else tensor

    def array(self, node: dict):
        try:
            import numpy as np
        except ImportError:
            raise CheckpointError("this checkpoint holds numpy arrays: install numpy to load it") from None
        dtype = np.dtype(str(node["d"]))
        if dtype.kind not in _NUMPY_KINDS or dtype.itemsize == 0:
            raise ValueError(f"unsupported numpy dtype {node['d']!r}")
        if node["t"] == "ns":
            if len(node["v"]) != dtype.itemsize:
                raise ValueError("numpy scalar of the wrong size")
            return np.frombuffer(node["v"], dtype=dtype)[0]
        _, _, start, nbytes = self._entry(node["i"])
        shape = [int(n) for n in node["s"]]
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize != nbytes:
            raise ValueError(f"numpy array of shape {shape} does not fit {nbytes} bytes")
        if not nbytes:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(self.view, dtype=dtype, count=count, offset=start).reshape(shape)

    def namedtuple(self, node: dict):
        fields = tuple(str(f) for f in node["f"])
        values = [self.decode(v) for v in node["v"]]
        key = (node["m"], node["q"], fields)
        cls = self.namedtuples.get(key)
        if cls is None:
            # Look the class up among modules already imported (never import,
            # never run a module's __getattr__); else an equivalent new one.
            obj = sys.modules.get(str(node["m"]))
            for part in str(node["q"]).split("."):
                obj = vars(obj).get(part) if obj is not None and hasattr(obj, "__dict__") else None
            if isinstance(obj, type) and issubclass(obj, tuple) and getattr(obj, "_fields", None) == fields:
                cls = obj
            else:
                cls = collections.namedtuple(str(node["n"]), fields)
            self.namedtuples[key] = cls
        return cls._make(values)

    def decode(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        kind = node["t"]
        torch = self.torch
        if kind == "T":
            tensor = self.tensor(node["i"])
            if node.get("p"):
                return torch.nn.Parameter(tensor, requires_grad=bool(node.get("g")))
            return tensor.requires_grad_() if node.get("g") else tensor
        if kind in ("d", "od", "dd"):
            pairs = [(self.decode(k), self.decode(v)) for k, v in node["v"]]
            if kind == "d":
                return dict(pairs)
            if kind == "dd":
                name = str(node["f"])
                if name and name not in _FACTORIES:
                    raise ValueError(f"unknown defaultdict factory {name!r}")
                return collections.defaultdict(_FACTORIES[name] if name else None, pairs)
            result = collections.OrderedDict(pairs)
            for attr, value in node.get("a", {}).items():
                if not isinstance(attr, str) or attr.startswith("__"):
                    raise ValueError(f"bad attribute name {attr!r}")
                setattr(result, attr, self.decode(value))
            return result
        if kind == "l":
            return [self.decode(v) for v in node["v"]]
        if kind == "u":
            return tuple(self.decode(v) for v in node["v"])
        if kind == "set":
            return {self.decode(v) for v in node["v"]}
        if kind == "fs":
            return frozenset(self.decode(v) for v in node["v"])
        if kind == "nt":
            return self.namedtuple(node)
        if kind in ("N", "ns"):
            return self.array(node)
        if kind == "bi":
            return int.from_bytes(node["v"], "little", signed=True)
        if kind == "c":
            real, imag = node["v"]
            return complex(float(real), float(imag))
        if kind == "s8":
            return bytes(node["v"]).decode("utf-8", "surrogatepass")
        if kind == "ba":
            return bytearray(node["v"])
        if kind == "S":
            return torch.Size([int(v) for v in node["v"]])
        if kind == "D":
            return torch.device(str(node["v"]))
        if kind == "G":
            try:
                generator = torch.Generator(device=str(node["d"]))
            except RuntimeError as exc:  # not damage: this process lacks that device
                raise CheckpointError(f"the checkpoint holds a torch.Generator on {node['d']!r}, "
                                      f"which this process cannot create ({exc})") from None
            return generator.set_state(torch.tensor(list(bytes(node["v"])), dtype=torch.uint8))
        if kind == "dt":
            dtype = getattr(torch, str(node["v"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {node['v']!r}")
            return dtype
        raise ValueError(f"unknown node kind {kind!r}")
