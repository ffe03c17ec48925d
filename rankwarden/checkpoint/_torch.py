"""torch payloads: the only module of the checkpoint plane that imports torch (lazily)."""

from __future__ import annotations

import copy
import io
import sys
from typing import Any

from rankwarden.checkpoint._tensors import TensorPayload, is_tensor_payload, load_tensor_payload

__all__ = ["copy_to_buffers", "load_torch", "torch_payload"]


def torch_payload(state: Any) -> TensorPayload:
    """A payload for a state dict (or any tree of tensors, numpy values and plain values).

    Always rankwarden's tensor format (raw bytes at disk speed, no pickle on
    load). A state that would not load back exactly (a custom object, a
    quantized tensor, ...) raises ``CheckpointError`` here, at save time,
    naming the path of the offending value; see ``_tensors`` for the list."""
    return TensorPayload(state)


def load_torch(data: bytes | bytearray | memoryview, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Load a payload written by ``torch_payload`` (or a ``torch.save`` file).

    Tensor-format payloads run no pickle at all; from a writable buffer (the
    bytearray ``CheckpointStore.read`` returns) CPU tensors are views of it,
    not copies. ``torch.save`` payloads (older checkpoints) load with
    ``weights_only`` (no arbitrary pickles)."""
    if is_tensor_payload(data):
        return load_tensor_payload(data, map_location=map_location)
    import torch

    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)


def copy_to_buffers(state: Any, buffers: dict, path: tuple = ()) -> Any:
    """A CPU copy of ``state`` whose tensors live in ``buffers``, reused from the last call.

    This is all the training thread pays for an async save: one memcpy per
    tensor into memory it already owns (pinned when the source is on a GPU),
    no allocation after the first save. Everything mutable that training may
    change before the background write (numpy arrays, generators) is copied;
    container types (OrderedDict with its attributes, defaultdict, namedtuple) are kept."""
    import torch

    if isinstance(state, torch.Tensor):
        if type(state) is not torch.Tensor and type(state) is not torch.nn.Parameter:
            from torch.distributed.tensor import DTensor

            if isinstance(state, DTensor):
                # A shard of sharded state (FSDP2): its local part into a reused
                # buffer, wrapped again with the same mesh and placements (no
                # communication), for a sharded save through DCP.
                local = copy_to_buffers(state.to_local().detach(), buffers, path + ("<local shard>",))
                return DTensor.from_local(local, state.device_mesh, state.placements, run_check=False,
                                          shape=state.shape, stride=state.stride())
            return state.clone()  # refused by the payload with a clear error; never aliased
        source = state.detach()
        buffer = buffers.get(path)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            buffers[path] = buffer
        buffer.copy_(source, non_blocking=source.is_cuda)
        if type(state) is torch.nn.Parameter:
            return torch.nn.Parameter(buffer, requires_grad=state.requires_grad)
        return buffer.detach().requires_grad_() if state.requires_grad else buffer
    if isinstance(state, torch.Generator):
        return torch.Generator(device=state.device).set_state(state.get_state())
    if isinstance(state, dict):
        copied = copy.copy(state)  # keeps the type, a defaultdict's factory, an OrderedDict's _metadata
        for key, value in state.items():
            copied[key] = copy_to_buffers(value, buffers, path + (key,))
        return copied
    if isinstance(state, (list, tuple)):
        items = [copy_to_buffers(v, buffers, path + (i,)) for i, v in enumerate(state)]
        if isinstance(state, list):
            return items
        return type(state)._make(items) if hasattr(type(state), "_fields") else tuple(items)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(state, np.ndarray):
        return state.copy()
    return state  # ints, floats, strings: immutable or cheap; saved as they are now
