"""torch payloads: the only module of the checkpoint plane that imports torch (lazily)."""

from __future__ import annotations

import io
from typing import Any

from rankwarden.checkpoint._tensors import is_tensor_payload, load_tensor_payload, try_tensor_payload

__all__ = ["copy_to_buffers", "load_torch", "torch_payload"]


def torch_payload(state: Any) -> Any:
    """A payload for a state dict (or any tree of tensors and plain values).

    The tensor format when ``state`` fits it (raw bytes at disk speed, no
    pickle on load); otherwise ``torch.save`` straight to the store's file."""
    payload = try_tensor_payload(state)
    if payload is not None:
        return payload

    def write(path: str) -> None:
        import torch

        torch.save(state, path)

    return write


def load_torch(data: bytes, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Load a payload written by ``torch_payload``; torch.save payloads load with
    ``weights_only`` (no arbitrary pickles), tensor-format ones run no pickle at all."""
    if is_tensor_payload(data):
        return load_tensor_payload(data, map_location=map_location)
    import torch

    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)


def copy_to_buffers(state: Any, buffers: dict, path: tuple = ()) -> Any:
    """A CPU copy of ``state`` whose tensors live in ``buffers``, reused from the last call.

    This is all the training thread pays for an async save: one memcpy per
    tensor into memory it already owns (pinned when the source is on a GPU),
    no allocation after the first save."""
    import torch

    if isinstance(state, torch.Tensor):
        source = state.detach()
        buffer = buffers.get(path)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            buffers[path] = buffer
        buffer.copy_(source, non_blocking=source.is_cuda)
        return buffer
    if isinstance(state, dict):
        return type(state)((k, copy_to_buffers(v, buffers, path + (k,))) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        copied = [copy_to_buffers(v, buffers, path + (i,)) for i, v in enumerate(state)]
        return type(state)(copied) if isinstance(state, list) else tuple(copied)
    return state  # ints, floats, strings: immutable or cheap; saved as they are now
