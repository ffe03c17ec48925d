"""rankwarden's tensor payload: a msgpack skeleton plus the tensors' raw bytes.

    0    8 bytes   magic b"RWTENS01"
    8    8 bytes   header length H, little-endian
    16   H bytes   msgpack header: {"tree": skeleton, "tensors": [[dtype, shape, offset, nbytes], ...]}
    D    ...       tensor bytes; offsets are relative to D = 16 + H rounded up to 64

Why not just torch.save: its zip writer copies and CRCs every byte on the
training process's one core, and loading it means unpickling. Here the bytes
are written straight from the tensors' memory while a second thread
checksums the same memory, so a save runs at the disk's speed; and loading
runs no pickle at all (only the types below can appear). A state with
anything else in it (a numpy array, a custom object) falls back to torch.save.

Skeleton nodes: None, bool, int, float, str, bytes as themselves; containers
and tensors as {"t": kind, ...}: "d" dict (pairs, so int keys and order
survive), "l" list, "u" tuple, "S" torch.Size, "T" tensor index, "dt" dtype. Tensors that
share storage are stored twice (state dicts copy on load anyway).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Iterator

import msgspec

from rankwarden.errors import CorruptCheckpoint

__all__ = ["MAGIC", "TensorPayload", "is_tensor_payload", "load_tensor_payload", "try_tensor_payload"]

MAGIC = b"RWTENS01"
_ALIGN = 64
_PAD = bytes(_ALIGN)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class _Unsupported(Exception):
    pass


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TensorPayload:
    """A payload the store writes chunk by chunk, checksumming the same memory in parallel."""

    def __init__(self, state: Any) -> None:
        import torch

        self._torch = torch
        self._tensors: list = []
        tree = self._encode(state)
        entries, offset = [], 0
        for tensor in self._tensors:
            nbytes = tensor.numel() * tensor.element_size()
            entries.append([_dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes])
            offset += nbytes + (-nbytes % _ALIGN)
        header = _encoder.encode({"tree": tree, "tensors": entries})
        self._prefix = MAGIC + struct.pack("<Q", len(header)) + header
        self._prefix += bytes(-len(self._prefix) % _ALIGN)
        self.size = len(self._prefix) + offset

    def _encode(self, node: Any) -> Any:
        torch = self._torch
        if node is None or isinstance(node, (bool, int, float, str, bytes)):
            return node
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided or node.is_quantized or node.device.type == "meta":
                raise _Unsupported(f"tensor with layout {node.layout}")
            tensor = node.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            self._tensors.append(tensor.contiguous())
            return {"t": "T", "i": len(self._tensors) - 1}
        if isinstance(node, dict):
            return {"t": "d", "v": [[self._encode(k), self._encode(v)] for k, v in node.items()]}
        if isinstance(node, list):
            return {"t": "l", "v": [self._encode(v) for v in node]}
        if isinstance(node, torch.Size):
            return {"t": "S", "v": list(node)}
        if isinstance(node, tuple):
            return {"t": "u", "v": [self._encode(v) for v in node]}
        if isinstance(node, torch.dtype):
            return {"t": "dt", "v": _dtype_name(node)}
        raise _Unsupported(type(node).__name__)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self._prefix)
        for tensor in self._tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                yield memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
            if nbytes % _ALIGN:
                yield memoryview(_PAD)[: -nbytes % _ALIGN]


def try_tensor_payload(state: Any) -> TensorPayload | None:
    """The tensor payload of ``state``, or None if it holds something only pickle can store."""
    try:
        return TensorPayload(state)
    except _Unsupported:
        return None


def is_tensor_payload(data) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def load_tensor_payload(data: bytes | bytearray | memoryview, *, map_location: Any = "cpu") -> Any:
    """Rebuild the state; tensors are copied out of ``data`` (``data`` may be dropped after)."""
    import torch

    view = memoryview(data)
    try:
        (length,) = struct.unpack_from("<Q", view, len(MAGIC))
        header = _decoder.decode(view[16 : 16 + length])
        base = 16 + length + (-(16 + length) % _ALIGN)
        tensors = []
        for dtype_name, shape, offset, nbytes in header["tensors"]:
            dtype = getattr(torch, str(dtype_name), None)
            if not isinstance(dtype, torch.dtype) or base + offset + nbytes > len(view):
                raise ValueError(f"bad tensor entry {dtype_name} at {offset}")
            raw = bytearray(view[base + offset : base + offset + nbytes])
            flat = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            tensors.append(flat.reshape(shape).to(map_location) if map_location != "cpu" else flat.reshape(shape))
        return _decode(header["tree"], tensors, torch)
    except (ValueError, KeyError, TypeError, IndexError, struct.error, msgspec.DecodeError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"tensor payload does not decode: {exc}") from None


def _decode(node: Any, tensors: list, torch) -> Any:
    if not isinstance(node, dict):
        return node
    kind = node["t"]
    if kind == "T":
        return tensors[node["i"]]
    if kind == "d":
        return {_decode(k, tensors, torch): _decode(v, tensors, torch) for k, v in node["v"]}
    if kind == "l":
        return [_decode(v, tensors, torch) for v in node["v"]]
    if kind == "u":
        return tuple(_decode(v, tensors, torch) for v in node["v"])
    if kind == "S":
        return torch.Size([int(v) for v in node["v"]])
    if kind == "dt":
        dtype = getattr(torch, str(node["v"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {node['v']!r}")
        return dtype
    raise ValueError(f"unknown node kind {kind!r}")
