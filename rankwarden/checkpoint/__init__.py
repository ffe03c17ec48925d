"""Atomic, verified, resumable checkpoints on any fsspec URL.

A step is committed by its manifest, written last; resume takes the newest
step that verifies. ``CheckpointStore`` works on its own (one process) or
driven by the coordinator (each rank writes its files, the coordinator
commits when every rank has reported). Sharded state (DTensor/FSDP2, DDP
replicas written once) goes through torch.distributed.checkpoint under the
same commit (``save_sharded``/``load_sharded``, manifest ``layout: "dcp"``);
such a step is a plain DCP checkpoint at ``dcp_location`` and resumes at
another world size. torch is imported only by the functions that
(de)serialise torch payloads.
"""

from rankwarden.checkpoint._dcp import Resharded, dcp_location
from rankwarden.checkpoint._faults import POINTS as FAULT_POINTS, set_fault_hook
from rankwarden.checkpoint._manifest import FileEntry, Manifest, Writer, step_dir_name
from rankwarden.checkpoint._resume import ResumePlan, SkippedStep, choose_resume
from rankwarden.checkpoint._store import CheckpointStore, rank_file_name


def __getattr__(name: str):
    # These pull in torch helpers: load them only when asked for. Nothing here
    # imports the worker or the coordinator: the store is usable on its own
    # (the rank side, RankCheckpointer, lives in rankwarden.worker).
    if name == "AsyncCheckpointer":
        from rankwarden.checkpoint._async import AsyncCheckpointer

        return AsyncCheckpointer
    if name in ("save_sharded", "load_sharded"):
        from rankwarden.checkpoint import _dcp

        return getattr(_dcp, name)
    if name in ("torch_payload", "load_torch"):
        from rankwarden.checkpoint import _torch

        return getattr(_torch, name)
    raise AttributeError(f"module 'rankwarden.checkpoint' has no attribute {name!r}")


__all__ = [
    "AsyncCheckpointer",
    "FAULT_POINTS",
    "load_torch",
    "torch_payload",
    "CheckpointStore",
    "Resharded",
    "dcp_location",
    "load_sharded",
    "save_sharded",
    "FileEntry",
    "Manifest",
    "ResumePlan",
    "SkippedStep",
    "Writer",
    "choose_resume",
    "rank_file_name",
    "set_fault_hook",
    "step_dir_name",
]
