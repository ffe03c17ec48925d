"""Checkpoint write and read speed, side by side on the same disk in one run.

For a ~512 MiB state (8 float32 tensors of 64 MiB) it measures, over
trials that run the three writers in a random (seeded) order, each write
to a new file after a sync and a page-cache drop, so that disk noise and
writeback hit every contender alike (the save/raw ratio is reported per
trial pair, and only when the raw and rankwarden figures are stable):

  raw         the tensors' bytes written to one file + fsync (the disk's ceiling)
  rankwarden  CheckpointStore.save: tensor payload + CRC-32 + fsync + manifest + rename + LATEST
  torch.save  torch.save to a temp file + os.replace (what many scripts do; NOT durable: no fsync)
  resume      CheckpointStore.load_latest (checksum verified) + load_torch
  async       the training thread's stall in AsyncCheckpointer.save vs a bare copy
              of the state into preallocated buffers (the floor for any async save)

and, for a GPT-2-small-shaped training state (embeddings, 12 layers of
attention + MLP at d_model 768, vocab 50257, plus AdamW exp_avg/exp_avg_sq:
124M parameters, 1.39 GiB), the load time and peak memory of

  rankwarden  CheckpointStore.latest + read (CRC-32 verified) + load_torch
  torch.load  of a torch.save of the same state (weights_only=True, no mmap)
  dcp         torch.distributed.checkpoint.load (single process, no_dist=True)
              into a state of preallocated empty tensors, as DCP requires

each in a fresh subprocess (peak RSS = VmHWM after the load minus VmRSS
before it, so methods cannot pollute each other), interleaved over trials,
page cache warm (the files were just written).

Section ``sharded`` (2 ranks, gloo, CPU; see bench/_sharded.py): bytes per
step of a DDP (replicated) state saved as one file per rank vs through DCP
(replicas once), and a state sharded across the ranks saved/loaded by
rankwarden (DCP through the store, commit included) vs plain DCP.

    python bench/checkpoint.py [--mib 512] [--trials 3] [--dir DIR] [--sections save,load]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rankwarden.checkpoint import AsyncCheckpointer, CheckpointStore, load_torch, torch_payload


def cv(values: list[float]) -> float:
    """Coefficient of variation (stdev / mean); infinite with fewer than 3 values."""
    return statistics.stdev(values) / statistics.mean(values) if len(values) >= 3 else float("inf")


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


# -- load: rankwarden vs torch.load vs torch.distributed.checkpoint -------------------------

GPT = {"vocab": 50257, "context": 1024, "d_model": 768, "layers": 12}


def gpt_shapes() -> dict[str, tuple[int, ...]]:
    d, shapes = GPT["d_model"], {"wte.weight": (GPT["vocab"], GPT["d_model"]), "wpe.weight": (GPT["context"], GPT["d_model"])}
    for i in range(GPT["layers"]):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                   p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                   p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
                   p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)}
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,)}


def gpt_state(make) -> dict:
    """A model + AdamW state dict shaped like GPT-2 small; ``make(shape)`` makes each tensor."""
    shapes = gpt_shapes()
    model = {name: make(shape) for name, shape in shapes.items()}
    state = {i: {"step": torch.tensor(1000.0), "exp_avg": make(shape), "exp_avg_sq": make(shape)}
             for i, shape in enumerate(shapes.values())}
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
               "foreach": None, "maximize": False, "capturable": False, "differentiable": False, "fused": None,
               "params": list(range(len(shapes)))}]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "step": 1000}


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def load_child(method: str, work: str) -> None:
    """Run in a fresh process: load one way, print seconds and peak RSS growth as JSON."""
    import torch.distributed.checkpoint as dcp  # imported before the baseline, like torch

    template = gpt_state(lambda shape: torch.empty(shape)) if method == "dcp" else None
    baseline = _memory_kib("VmRSS")
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if method == "rankwarden":
        store = CheckpointStore(work, "gpt")
        manifest = store.latest()
        state = load_torch(store.read(manifest, "rank_00000.pt"))
    elif method == "torch.load":
        state = torch.load(os.path.join(work, "gpt.pt"), map_location="cpu", weights_only=True)
    else:
        dcp.load(template, checkpoint_id=os.path.join(work, "gpt.dcp"), no_dist=True)
        state = template
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    peak = _memory_kib("VmHWM") - baseline
    check = float(state["optimizer"]["state"][3]["exp_avg_sq"].double().sum() + state["model"]["wte.weight"][7].sum())
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_kib": peak, "check": check}))


def bench_load(directory: str, trials: int) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    gen = torch.Generator().manual_seed(0)
    state = gpt_state(lambda shape: torch.randn(shape, generator=gen))
    params = sum(t.numel() for t in state["model"].values())
    size = sum(t.numel() * t.element_size() for part in (state["model"], *state["optimizer"]["state"].values())
               for t in part.values())
    work = tempfile.mkdtemp(prefix="rankwarden-bench-load-", dir=directory)
    try:
        CheckpointStore(work, "gpt").save(1, {"rank_00000.pt": torch_payload(state)})
        torch.save(state, os.path.join(work, "gpt.pt"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state, checkpoint_id=os.path.join(work, "gpt.dcp"), no_dist=True)
        del state
        methods = ["rankwarden", "torch.load", "dcp"]
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for trial in range(trials):
            for method in methods[trial % 3:] + methods[: trial % 3]:  # rotate who goes first
                out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", method, "--dir", work],
                                     check=True, capture_output=True, text=True).stdout
                results[method].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    checks = {m: r[0]["check"] for m, r in results.items()}
    assert len(set(checks.values())) == 1, f"the methods loaded different states: {checks}"
    gib = size / (1 << 30)
    ref = {k: statistics.median(r[k] for r in results["torch.load"]) for k in ("seconds", "peak_kib")}
    print(f"# load: GPT-2-small-shaped model + AdamW state, {params / 1e6:.0f}M parameters, {gib:.2f} GiB of tensors, "
          f"{trials} trials, fresh process per load, page cache warm")
    best = min(r["seconds"] for r in results["torch.load"])
    print(f"{'method':<11} {'load s min/median/max':>23} {'CPU s':>6} {'peak RSS GiB':>12} {'x state':>7} "
          f"{'median/torch.load':>17} {'min/torch.load':>14} {'peak/torch.load':>15}")
    for method, runs in results.items():
        secs = [r["seconds"] for r in runs]
        cpu = statistics.median(r["cpu"] for r in runs)
        peak = statistics.median(r["peak_kib"] for r in runs) * 1024
        print(f"{method:<11} {min(secs):7.2f} {statistics.median(secs):7.2f} {max(secs):7.2f} {cpu:6.2f} "
              f"{peak / (1 << 30):12.2f} {peak / size:7.2f} {statistics.median(secs) / ref['seconds']:16.2f}x "
              f"{min(secs) / best:13.2f}x {peak / (ref['peak_kib'] * 1024):14.2f}x")
    print("targets: rankwarden load time <= 1.0x torch.load, peak RSS <= 1.1x the state "
          "(CPU s: user+sys of all threads; on a busy machine the wall time of 2 threads suffers most)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dir", default=".", help="a directory on the disk to measure")
    parser.add_argument("--sections", default="save,load,sharded",
                        help="save (512 MiB save/resume/async), load (GPT state), sharded (2 ranks through DCP)")
    parser.add_argument("--sharded-mib", type=int, default=256, help="state size of the sharded section")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the contenders in each save trial")
    parser.add_argument("--max-cv", type=float, default=0.15,
                        help="report the save/raw ratio only if both figures vary less than this (stdev/mean)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load_child(args.child, args.dir)
        return 0
    if "save" in args.sections.split(","):
        bench_save(args)
    if "load" in args.sections.split(","):
        bench_load(args.dir, max(args.trials, 5))  # more trials: one load is short and noisy
    if "sharded" in args.sections.split(","):
        bench_sharded(args)
    return 0


def bench_sharded(args, world: int = 2) -> None:
    """Two ranks (gloo) on this host; bench/_sharded.py measures, rank 0 reports."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = tempfile.mkdtemp(prefix="rw-bench-sharded-", dir=args.dir)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded.py")
    procs = []
    try:
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, script, work, str(args.sharded_mib), str(args.trials)],
                                          env=env, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL))
        out, _ = procs[0].communicate(timeout=900)
        for proc in procs[1:]:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    result = json.loads(out.decode().strip().splitlines()[-1])
    ddp, sh, mib = result["ddp"], result["sharded"], 2**20
    print(f"\nsharded: {world} ranks (gloo, CPU), median of {args.trials} trials")
    print(f"  DDP, replicated state of {ddp['model_bytes'] / mib:.0f} MiB: bytes per step")
    print(f"    one file per rank (before)  {ddp['bytes_per_rank_files'] / mib:8.1f} MiB  "
          f"({ddp['bytes_per_rank_files'] / ddp['model_bytes']:.2f}x the model)  save {ddp['save_s_rank_files']:.3f} s")
    print(f"    through DCP (after)         {ddp['bytes_dcp'] / mib:8.1f} MiB  "
          f"({ddp['bytes_dcp'] / ddp['model_bytes']:.2f}x the model)  save {ddp['save_s_dcp']:.3f} s")
    size = result["mib"]
    print(f"  state of {size} MiB sharded across the ranks (Shard(0)):")
    for what in ("save", "load"):
        ours, theirs = sh[f"rankwarden_{what}"], sh[f"dcp_{what}"]
        print(f"    {what}: rankwarden {ours:.3f} s ({size / ours:7.1f} MiB/s)   plain DCP {theirs:.3f} s "
              f"({size / theirs:7.1f} MiB/s)   rankwarden/DCP throughput {theirs / ours:.2f}x")
    print("  targets: DDP bytes ~1x the model; rankwarden >= 0.9x DCP's throughput (commit and CRC-32 included)")


def bench_save(args) -> None:

    state = make_state(args.mib)
    size = sum(t.numel() * t.element_size() for t in state.values())
    mib = size / (1 << 20)
    work = tempfile.mkdtemp(prefix="rankwarden-bench-", dir=args.dir)
    try:
        store = CheckpointStore(work, "bench")
        raw, ours, plain, resume = [], [], [], []
        cold = None
        # Fair trials: the contenders run in a fresh random order each trial
        # (seeded), and each timed write starts from the same state: the
        # previous writes synced and the page cache dropped, so none pays for
        # another's writeback (torch.save leaves 512 MiB dirty) or finds the
        # disk idler than the others did. Every write goes to a new file.
        rng = random.Random(args.seed)
        orders = []
        for trial in range(args.trials):
            order = ["raw", "rankwarden", "torch.save"]
            rng.shuffle(order)
            orders.append(order)
            for contender in order:
                cold = drop_caches()
                if contender == "raw":
                    raw.append(raw_write(state, os.path.join(work, f"raw-{trial}.bin")))
                elif contender == "rankwarden":
                    start = time.perf_counter()
                    store.save(trial + 1, {"rank_00000.pt": torch_payload(state)})
                    ours.append(time.perf_counter() - start)
                else:
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
    # The ratio of each trial's pair (the same disk state, minutes apart at
    # most), reported only when the raw figures agree with each other: a
    # ratio of unstable figures says more about the disk than the code.
    ratios = [o / r for o, r in zip(our_bw, raw_bw)]
    spread = {name: cv(values) for name, values in (("raw", raw_bw), ("rankwarden", our_bw))}
    unstable = [f"{name} CV {value:.0%}" for name, value in spread.items() if not value <= args.max_cv]
    stall_ratio = statistics.median(stalls) / statistics.median(copies)
    print(f"# checkpoint: {mib:.0f} MiB state, {args.trials} trials, {os.cpu_count()} CPUs, dir {os.path.abspath(args.dir)}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"trial orders (seed {args.seed}): " + "; ".join(",".join(order) for order in orders)
          + f"; before each write: sync + {'page cache dropped' if cold else 'page cache NOT dropped (not root?)'}")
    print(f"raw write+fsync          MiB/s  {stats(raw_bw)}   CV {spread['raw']:.0%}")
    print(f"rankwarden sync save     MiB/s  {stats(our_bw)}   CV {spread['rankwarden']:.0%}")
    print(f"torch.save+os.replace    MiB/s  {stats(plain_bw)}   (no fsync: not durable)")
    print(f"resume (load_latest+torch.load) s  {stats(resume)}   ({'page cache dropped' if cold else 'page cache NOT dropped'})")
    print(f"copy into reused buffers s      {stats(copies)}")
    print(f"async save stall         s      {stats(stalls)}")
    if unstable:
        print(f"ratio sync save / raw write+fsync: unstable ({', '.join(unstable)} > {args.max_cv:.0%}; "
              f"per-trial ratios {', '.join(f'{r:.2f}' for r in ratios)}): run again on a quieter disk, or more --trials")
    else:
        print(f"ratio sync save / raw write+fsync (median of per-trial ratios) = {statistics.median(ratios):.2f}x   "
              f"(target >= 0.90; per trial {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"ratio async stall / copy time (median)              = {stall_ratio:.2f}x   (target <= 1.50)")


if __name__ == "__main__":
    sys.exit(main())
