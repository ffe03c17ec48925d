"""DDP training of a small CNN that survives crashes and hangs and resumes exactly.

Written for torchrun; runs unchanged under either of

    torchrun --nproc-per-node 2 demo/train.py --data rankwarden-jobs/data --ckpt-url rankwarden-jobs/ckpt
    rankwarden run --nproc-per-node 2 --checkpoint rankwarden-jobs/ckpt demo/train.py --data rankwarden-jobs/data

NCCL with one GPU per rank when CUDA is available, gloo on CPU otherwise.
Through rankwarden.worker it reports each step (so a hang is seen), saves a
checkpoint every --ckpt-every steps (model, optimizer, RNG states and the
exact data position) and, when restarted, continues from the newest committed
one with exactly the next sample. On CPU a run that was killed and resumed
ends with the same weights, bit for bit, as one that never stopped.

Two signals exist for fault injection (rankwarden chaos uses them):
SIGUSR1 makes this rank hang for real (alive, heartbeating, no progress: a
deadlock stand-in); SIGUSR2 arms a crash in the middle of its next checkpoint
write (SIGKILL with half a file on disk).
"""

import time

T_START = time.time()  # before anything heavy: the restart-floor benchmark measures from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

# Deterministic cuBLAS (torch.use_deterministic_algorithms refuses CUDA matmuls
# without it); read when the first cuBLAS handle is made, so setting it here is enough.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import rankwarden.worker as rw  # noqa: E402
from rankwarden.checkpoint import set_fault_hook  # noqa: E402
from rankwarden.data import ShardedRecords  # noqa: E402

T_IMPORTED = time.time()

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="rankwarden-jobs/data")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch", type=int, default=32, help="per rank")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--ckpt-every", type=int, default=16)
parser.add_argument("--ckpt-url", default=None, help="checkpoint store when not run by rankwarden")
parser.add_argument("--final-weights", default=None, help="rank 0 writes the trained weights here")
parser.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step (to watch it live)")
parser.add_argument("--no-graceful-stop", action="store_true",
                    help="do not turn stop requests into checkpoint-and-exit (benchmarks compare launchers without it)")
parser.add_argument("--sharded", action="store_true",
                    help="FSDP2 (fully_shard) instead of DDP, checkpointed sharded through torch.distributed.checkpoint")
parser.add_argument("--live", action="store_true",
                    help="train through rankwarden.worker.live: under a live job a failed rank is replaced and the "
                         "survivors keep their processes and state")
parser.add_argument("--trace", default=None, help="append timestamped phases and steps here (JSON lines; benchmarks)")
args = parser.parse_args()
_trace_file = open(args.trace, "a", buffering=1) if args.trace else None


def trace(event, **fields):
    if _trace_file is not None:
        _trace_file.write(json.dumps({"t": fields.pop("t", time.time()), "event": event, "rank": int(os.environ["RANK"]),
                                      "pid": os.getpid(),
                                      "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), **fields}) + "\n")


trace("start", t=T_START)
trace("imported", t=T_IMPORTED)


def hang(signum, frame):
    while True:  # a deadlock stand-in: alive, heartbeating, going nowhere
        time.sleep(3600)


def crash_in_next_save(signum, frame):
    def kill_mid_write(point):
        if point == "mid_payload":
            chaos_dir = os.environ.get("RANKWARDEN_CHAOS_DIR")
            if chaos_dir:  # tell the chaos harness exactly when the fault happened
                with open(os.path.join(chaos_dir, f"fault-{os.getpid()}"), "w") as f:
                    f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    set_fault_hook(kill_mid_write)


signal.signal(signal.SIGUSR1, hang)
signal.signal(signal.SIGUSR2, crash_in_next_save)
if not args.no_graceful_stop:
    rw.graceful_stop()  # a stop request: checkpoint, then exit 0

# NCCL wants a GPU of its own per rank ("Duplicate GPU detected" otherwise):
# with fewer GPUs than local ranks, train on CPU with gloo and say so.
local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
if torch.cuda.is_available() and not use_cuda and os.environ.get("LOCAL_RANK", "0") == "0":
    print(f"{torch.cuda.device_count()} GPU(s) for {local_world} local ranks: NCCL needs one per rank; "
          "training on CPU with gloo", flush=True)
_timeout = rw.collective_timeout()  # a live job: a rank blocked on a hung peer gives up first
dist.init_process_group("nccl" if use_cuda else "gloo", **({"timeout": _timeout} if _timeout else {}))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
if use_cuda:
    torch.cuda.set_device(device)
trace("process_group")
torch.use_deterministic_algorithms(True)
torch.manual_seed(args.seed)

with open(os.path.join(args.data, "index.json")) as f:
    index = json.load(f)
shard_cache = {}


def load_shard(i):
    if i not in shard_cache:
        shard_cache.clear()  # one shard in memory at a time
        data = torch.load(os.path.join(args.data, index["shards"][i]), weights_only=True)
        shard_cache[i] = list(zip(data["x"], data["y"]))
    return shard_cache[i]


# Sizes given, so the sharding need not load every shard to count it (equal
# shards: every rank reads (shards // world) * records_per_shard per epoch).
records = ShardedRecords(len(index["shards"]), load_shard, rank=rank, world_size=world, seed=args.seed,
                         shard_sizes=[index["records_per_shard"]] * len(index["shards"]))
steps_per_epoch = (len(index["shards"]) // world) * index["records_per_shard"] // args.batch
total_steps = args.epochs * steps_per_epoch

model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU(), torch.nn.Linear(64, index["classes"]),
).to(device)
if args.sharded:
    from torch.distributed.checkpoint.state_dict import (  # noqa: E402
        StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict)
    from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
    from torch.distributed.fsdp import fully_shard  # noqa: E402

    from rankwarden.checkpoint import Resharded  # noqa: E402

    fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)


def sharded_state(step):
    # The job's state, sharded (DTensors); what differs per rank goes in per_rank.
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optimizer": optim_sd, "step": step}


trace("model_built")
start = 0
if args.sharded:
    state = sharded_state(0)
    found = rw.restore(url=args.ckpt_url, map_location=device, into=state)
    if found is not None:
        start, per_rank = found
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if isinstance(per_rank, Resharded):  # another world size: redistribute the data positions
            records.load_state_dict([p["data"] for p in per_rank.ranks])
        else:
            records.load_state_dict(per_rank["data"])
            rw.set_rng_state(per_rank["rng"])
else:
    found = rw.restore(url=args.ckpt_url, map_location=device)
    if found is not None:
        start, state = found
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        records.load_state_dict(state["data"])
        rw.set_rng_state(state["rng"])
trace("restored", step=start)
live = args.live and not args.sharded
# In live mode the wrapper is made by rw.live (a replacement must not run DDP's collectives before it joins).
ddp = model if args.sharded or live else DDP(model, device_ids=[device.index] if use_cuda else None)
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
print(f"rank {rank}/{world} on {device}, restart {restart}: step {start} of {total_steps}", flush=True)


def checkpoint(step):
    if args.sharded:  # collective: every rank saves the same step
        rw.save(step, sharded_state(step), per_rank={"data": records.state_dict(), "rng": rw.rng_state()},
                url=args.ckpt_url)
        return
    # Live: do not block on the commit (a survivor waiting for a dead peer's commit is not at its step boundary).
    rw.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "data": records.state_dict(),
                   "rng": rw.rng_state(), "step": step}, url=args.ckpt_url, wait=not live)


step = start
loss = torch.tensor(float("nan"))
def stop_requested():
    if args.no_graceful_stop:
        return False
    if not args.sharded:
        return rw.drain_requested()
    # A sharded save is a collective: every rank must stop at the same step.
    flag = torch.tensor([int(rw.drain_requested())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_step(number, model_):
    """Step ``number`` (1-based) on the live group's wrapper ``model_``."""
    batch = [next(records) for _ in range(args.batch)]
    x = torch.stack([b[0] for b in batch]).unsqueeze(1).float().div(255).to(device)
    y = torch.stack([b[1] for b in batch]).to(device)
    loss = F.cross_entropy(model_(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if args.step_time:
        time.sleep(args.step_time)
    return loss


if live:
    trainer = rw.live(model, opt, wrap=lambda m: DDP(m, device_ids=[device.index] if use_cuda else None),
                      # the data position is the same on every rank at a step (equal shards): replicated state
                      state=records.state_dict, load_state=lambda s: records.load_state_dict({**s, "rank": rank}))
    for step, loss in trainer.steps(start + 1, total_steps + 1, train_step):
        rw.report(step, samples=step * args.batch * world, loss=loss.item())
        trace("step", step=step)
        if step % args.ckpt_every == 0 or step == total_steps:
            checkpoint(step)
        if stop_requested():
            checkpoint(step)
            print(f"rank {rank}: stop requested; checkpointed step {step}", flush=True)
            sys.exit(0)
    ddp = trainer.model
    step = max(step, start)

while not live and step < total_steps:
    if stop_requested():
        checkpoint(step)
        print(f"rank {rank}: stop requested; checkpointed step {step}", flush=True)
        sys.exit(0)
    batch = [next(records) for _ in range(args.batch)]
    x = torch.stack([b[0] for b in batch]).unsqueeze(1).float().div(255).to(device)
    y = torch.stack([b[1] for b in batch]).to(device)
    loss = F.cross_entropy(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if args.step_time:
        time.sleep(args.step_time)
    rw.report(step, samples=step * args.batch * world, loss=loss.item())
    trace("step", step=step)
    if step % args.ckpt_every == 0 or step == total_steps:
        checkpoint(step)

test = torch.load(os.path.join(args.data, index["test"]), weights_only=True)
with torch.no_grad():
    logits = model(test["x"].unsqueeze(1).float().div(255).to(device))
    accuracy = (logits.argmax(dim=1).cpu() == test["y"]).float().mean().item()
if start >= total_steps:
    # Resumed a finished run (the same command again): no loss to report.
    print(f"rank {rank}: resumed at step {start} of {total_steps}: nothing left to train; "
          f"test accuracy {accuracy:.4f}", flush=True)
else:
    print(f"rank {rank}: trained {total_steps} steps, final loss {loss.item():.4f}, test accuracy {accuracy:.4f}",
          flush=True)
if args.sharded:  # gathered on every rank (a collective), written by rank 0
    final = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    final = model.state_dict()
if rank == 0 and args.final_weights:
    torch.save({k: v.cpu() for k, v in final.items()}, args.final_weights + ".tmp")
    os.replace(args.final_weights + ".tmp", args.final_weights)
dist.destroy_process_group()
if args.sharded:
    # FSDP2's module still references the process group: free it while the
    # interpreter is whole (README, known limits: an abort in finalisation otherwise).
    import gc  # noqa: E402

    del model, opt, ddp, state
    gc.collect()
