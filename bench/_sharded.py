"""One rank of bench/checkpoint.py's ``sharded`` section (gloo, CPU); rank 0 prints the results as JSON.

DDP: a replicated state of --mib MiB, saved the old way (one rankwarden file
per rank) and the sharded way (DCP: replicas written once); bytes per step
and save time. Sharded: a state of --mib MiB split across the ranks
(``distribute_tensor`` Shard(0)), saved and loaded by rankwarden (DCP
through the store: CRC-32, fsync, manifest commit, LATEST) and by plain
``dcp.save``/``dcp.load`` with ``FileSystemWriter`` (fsync on), trials
interleaved. Times are from a barrier before to a barrier after, so they
are the slowest rank's, commit included.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rankwarden.checkpoint import load_sharded
from rankwarden.worker import RankCheckpointer


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    directory, mib, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    per = 8
    numel = (mib << 20) // 4 // per
    gen = torch.Generator().manual_seed(0)
    full = {f"layer{i}.weight": torch.randn(numel // 1024, 1024, generator=gen) for i in range(per)}
    results: dict = {"world": world, "mib": mib}

    # -- DDP: replicated tensors ------------------------------------------------------------
    url = os.path.join(directory, "ddp")
    ckpt = RankCheckpointer(url, job="bench", rank=rank, world_size=world, tag="t")
    before, after, t_before, t_after = [], [], [], []
    for trial in range(trials):
        step = 2 * trial + 1
        t_before.append(timed(lambda: ckpt.save_state(step, {"model": full})))
        t_after.append(timed(lambda: ckpt.save_sharded(step + 1, {"model": full})))
        if rank == 0:
            before.append(sum(f.size for f in ckpt.store.verify(step, checksums=False).files))
            after.append(sum(f.size for f in ckpt.store.verify(step + 1, checksums=False).files))
    results["ddp"] = {"model_bytes": sum(t.numel() * 4 for t in full.values()),
                      "bytes_per_rank_files": before[-1] if before else 0, "bytes_dcp": after[-1] if after else 0,
                      "save_s_rank_files": statistics.median(t_before), "save_s_dcp": statistics.median(t_after)}

    # -- Sharded: DTensor Shard(0) ------------------------------------------------------------
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    del full
    url = os.path.join(directory, "sharded")
    ckpt = RankCheckpointer(url, job="bench", rank=rank, world_size=world, tag="t")
    times: dict[str, list[float]] = {"rankwarden_save": [], "dcp_save": [], "rankwarden_load": [], "dcp_load": []}
    into = {"model": {k: torch.zeros_like(v) for k, v in sharded.items()}}
    for trial in range(trials):
        plain = os.path.join(directory, f"plain_{trial}")
        order = ["rankwarden", "dcp"] if trial % 2 == 0 else ["dcp", "rankwarden"]
        for who in order:
            if who == "rankwarden":
                times["rankwarden_save"].append(timed(lambda: ckpt.save_sharded(trial + 1, {"model": sharded})))
            else:
                times["dcp_save"].append(timed(lambda: dcp.save({"model": sharded}, checkpoint_id=plain)))
        manifest = ckpt.store.verify(trial + 1, checksums=False)
        for who in order:
            if who == "rankwarden":
                times["rankwarden_load"].append(timed(lambda: load_sharded(ckpt.store, manifest, into)))
            else:
                times["dcp_load"].append(timed(lambda: dcp.load(into, checkpoint_id=plain)))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(plain, ignore_errors=True)
    results["sharded"] = {k: statistics.median(v) for k, v in times.items()}
    if rank == 0:
        print(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
