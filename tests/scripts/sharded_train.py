"""A sharded (FSDP2, or DDP through DCP) training job on CPU/gloo that checkpoints through rankwarden.

Data: ``ShardedRecords`` over 8 shards of 6 records, 2 records per rank per
step; each record's id is logged with the step, so a test can check that no
record is read twice in an epoch, across a change of world size too. Each
--every steps it saves {model, optimizer, step} sharded through DCP and
{data position, RNG} per rank. After restoring, and after its last save,
each rank dumps its local shards (``--out``) so a test can compare them bit
for bit; rank 0 also dumps the full model (gathered) for comparisons across
world sizes. ``RW_TEST_KILL=rank:step:point`` SIGKILLs that rank at that
fault point of that step's save (first attempt only). Each step sleeps
``RW_TEST_STEP_TIME`` seconds (default 0): a test that acts while it trains.
"""

import argparse
import gc
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict)

import rankwarden.worker as rw
from rankwarden.checkpoint import Resharded, set_fault_hook
from rankwarden.data import ShardedRecords

parser = argparse.ArgumentParser()
# Not an argument when it changes between runs of one job: arguments are the checkpoint's fingerprint.
parser.add_argument("--steps", type=int, default=int(os.environ.get("RW_TEST_STEPS", "0")))
parser.add_argument("--every", type=int, default=2)
parser.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
parser.add_argument("--out", required=True)
parser.add_argument("--url", default=None)
parser.add_argument("--background", action="store_true", help="async sharded saves (one in flight)")
args = parser.parse_args()
tag = os.environ.get("RW_TEST_TAG", "run")

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
attempt = int(os.environ.get("RANKWARDEN_ATTEMPT", "1"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
if args.mode == "fsdp":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    net = model
else:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
W_TRUE = torch.linspace(-1, 1, 8)


def load_shard(shard):
    g = torch.Generator().manual_seed(shard)
    xs = torch.randn(6, 8, generator=g)
    return [(shard * 100 + i, xs[i], (xs[i] @ W_TRUE).reshape(1)) for i in range(6)]


_g = torch.Generator().manual_seed(99)
EVAL_X = torch.randn(32, 8, generator=_g)
EVAL_Y = (EVAL_X @ W_TRUE).reshape(-1, 1)


def eval_loss():
    # Every rank runs it (FSDP's forward gathers parameters): the full model on a fixed batch.
    with torch.no_grad():
        return (net(EVAL_X) - EVAL_Y).pow(2).mean().item()


records = ShardedRecords(8, load_shard, rank=rank, world_size=world, seed=3, shard_sizes=[6] * 8)


def app_state(step):
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd, "step": step}


def dump(name, state):
    local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
             for k, v in state["model"].items()}
    torch.save(local, os.path.join(args.out, f"{tag}_{name}_r{rank}.pt"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(args.out, f"{tag}_{name}_full.pt"))


start = 0
state = app_state(0)
found = rw.restore(into=state, url=args.url)
if found is not None:
    start, per_rank = found
    assert start == state["step"], (start, state["step"])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if isinstance(per_rank, Resharded):
        records.load_state_dict([p["data"] for p in per_rank.ranks])
    else:
        records.load_state_dict(per_rank["data"])
        rw.set_rng_state(per_rank["rng"])
    dump("restored", app_state(start))
log = open(os.path.join(args.out, f"{tag}_log_r{rank}_a{attempt}.jsonl"), "a")
log.write(json.dumps({"resumed_from": start, "world": world, "eval": eval_loss()}) + "\n")

kill = os.environ.get("RW_TEST_KILL", "")
saver = rw.checkpointer(args.url).async_sharded() if args.background else None
for step in range(start + 1, args.steps + 1):
    batch = [next(records) for _ in range(2)]
    x = torch.stack([b[1] for b in batch])
    y = torch.stack([b[2] for b in batch])
    loss = (net(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    log.write(json.dumps({"step": step, "epoch": records.epoch, "ids": [b[0] for b in batch],
                          "loss": mean.item() / world}) + "\n")
    log.flush()
    rw.report(step, loss=mean.item() / world)
    time.sleep(float(os.environ.get("RW_TEST_STEP_TIME", "0")))
    if step % args.every == 0:
        if kill and attempt == 1:
            k_rank, k_step, k_point = kill.split(":")
            if int(k_rank) == rank and int(k_step) == step:
                set_fault_hook(lambda point: os.kill(os.getpid(), signal.SIGKILL) if point == k_point else None)
        per_rank = {"data": records.state_dict(), "rng": rw.rng_state()}
        if saver is not None:
            state = app_state(step)
            dump(f"saved{step}", state)
            saver.save(step, {"state": state, "per_rank": per_rank})  # training goes on while it is written
        else:
            rw.save(step, app_state(step), per_rank=per_rank, url=args.url)
        set_fault_hook(None)
if saver is not None:
    saver.wait()
dump("final", app_state(args.steps))
log.write(json.dumps({"final_eval": eval_loss()}) + "\n")
log.close()
dist.barrier()  # no rank tears gloo down while a peer still talks to it
dist.destroy_process_group()
# What still holds the process group (FSDP2's mesh, DCP's planners) goes now,
# while the interpreter is whole, not in its finalisation (see the README's known limits).
del model, opt, net, state
gc.collect()
