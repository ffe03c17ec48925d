"""Checkpoint write and read speed, side by side on the same disk in one run.

For a ~512 MiB state (8 float32 tensors of 64 MiB) it measures, over
interleaved trials so that disk noise hits every contender alike:

  raw         the tensors' bytes written to one file + fsync (the disk's ceiling)
  rankwarden  CheckpointStore.save: torch.save + sha256 + fsync + manifest + rename + LATEST
  torch.save  torch.save to a temp file + os.replace (what many scripts do; NOT durable: no fsync)
  resume      CheckpointStore.load_latest (checksum verified) + torch.load
  async       the training thread's stall in AsyncCheckpointer.save vs a bare copy
              of the state into preallocated buffers (the floor for any async save)

    python bench/checkpoint.py [--mib 512] [--trials 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from rankwarden.checkpoint import AsyncCheckpointer, CheckpointStore, load_torch, torch_payload


def stats(values: list[float]) -> str:
    return f"min {min(values):7.3f}  median {statistics.median(values):7.3f}  max {max(values):7.3f}"


def make_state(mib: int) -> dict:
    per = 8
    numel = (mib << 20) // 4 // per
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(numel, generator=gen) for i in range(per)}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # Zero-copy view of a contiguous CPU tensor's memory (no numpy needed).
    return memoryview((ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())).cast("B")


def raw_write(state: dict, path: str) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        for tensor in state.values():
            f.write(tensor_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    os.remove(path)
    return elapsed


def torch_save_replace(state: dict, directory: str) -> float:
    start = time.perf_counter()
    torch.save(state, os.path.join(directory, "plain.pt.tmp"))
    os.replace(os.path.join(directory, "plain.pt.tmp"), os.path.join(directory, "plain.pt"))
    elapsed = time.perf_counter() - start
    os.remove(os.path.join(directory, "plain.pt"))
    return elapsed


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dir", default=".", help="a directory on the disk to measure")
    args = parser.parse_args()

    state = make_state(args.mib)
    size = sum(t.numel() * t.element_size() for t in state.values())
    mib = size / (1 << 20)
    work = tempfile.mkdtemp(prefix="rankwarden-bench-", dir=args.dir)
    try:
        store = CheckpointStore(work, "bench")
        raw, ours, plain, resume = [], [], [], []
        cold = None
        for trial in range(args.trials):
            raw.append(raw_write(state, os.path.join(work, "raw.bin")))
            start = time.perf_counter()
            store.save(trial + 1, {"rank_00000.pt": torch_payload(state)})
            ours.append(time.perf_counter() - start)
            plain.append(torch_save_replace(state, work))
            cold = drop_caches()
            start = time.perf_counter()
            manifest, files = store.load_latest(["rank_00000.pt"])
            loaded = load_torch(files["rank_00000.pt"])
            resume.append(time.perf_counter() - start)
            assert manifest.step == trial + 1 and torch.equal(loaded["layer0.weight"], state["layer0.weight"])
            del loaded, files
            store.retain(1)

        # Async: first save allocates the buffers; measure the stall of the next ones.
        buffers = {k: torch.empty_like(v) for k, v in state.items()}
        copies, stalls = [], []
        checkpointer = AsyncCheckpointer(lambda step, snap: store.save(step, {"rank_00000.pt": torch_payload(snap)}))
        checkpointer.save(100, state)
        checkpointer.wait()
        for trial in range(args.trials):
            start = time.perf_counter()
            for key, tensor in state.items():
                buffers[key].copy_(tensor)
            copies.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpointer.save(101 + trial, state)
            stalls.append(time.perf_counter() - start)
            checkpointer.wait()
            store.retain(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bandwidth = lambda seconds: [mib / s for s in seconds]  # noqa: E731
    raw_bw, our_bw, plain_bw = bandwidth(raw), bandwidth(ours), bandwidth(plain)
    ratio = statistics.median(our_bw) / statistics.median(raw_bw)
    stall_ratio = statistics.median(stalls) / statistics.median(copies)
    print(f"# checkpoint: {mib:.0f} MiB state, {args.trials} trials, {os.cpu_count()} CPUs, dir {os.path.abspath(args.dir)}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"raw write+fsync          MiB/s  {stats(raw_bw)}")
    print(f"rankwarden sync save     MiB/s  {stats(our_bw)}")
    print(f"torch.save+os.replace    MiB/s  {stats(plain_bw)}   (no fsync: not durable)")
    print(f"resume (load_latest+torch.load) s  {stats(resume)}   ({'page cache dropped' if cold else 'page cache NOT dropped'})")
    print(f"copy into reused buffers s      {stats(copies)}")
    print(f"async save stall         s      {stats(stalls)}")
    print(f"ratio sync save / raw write+fsync (median bandwidth) = {ratio:.2f}x   (target >= 0.90)")
    print(f"ratio async stall / copy time (median)              = {stall_ratio:.2f}x   (target <= 1.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
