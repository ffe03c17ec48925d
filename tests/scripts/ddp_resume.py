"""DDP (gloo, CPU) that checkpoints through rankwarden.worker and records what it resumed from.

Every --every steps it saves model, optimizer and step (``--no-wait``: without
waiting for the commit). Data is a pure function of (seed, step, rank), so a
run resumed from any committed step ends with the same weights as one that
never stopped. At the end each rank writes its parameters to --out, so a test
can compare the replicas bit for bit.
"""

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import rankwarden.worker as rw

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--every", type=int, default=4)
parser.add_argument("--no-wait", action="store_true")
parser.add_argument("--out", required=True)
parser.add_argument("--url", default=None, help="checkpoint store when run without rankwarden (torchrun)")
args = parser.parse_args()
# Not an argument: arguments are part of the checkpoint's fingerprint, and a
# test reruns the same command to resume it.
args.tag = os.environ.get("RW_TEST_TAG", "run")
# Seconds each step sleeps, so a test can act mid-training (also not an argument).
step_time = float(os.environ.get("RW_TEST_STEP_TIME") or 0)

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

start = 0
found = rw.restore(url=args.url)
if found is not None:
    start, state = found
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
with open(os.path.join(args.out, f"{args.tag}_resume_r{rank}.json"), "w") as f:
    json.dump({"resumed_from": start}, f)

ddp = DDP(model)
for step in range(start + 1, args.steps + 1):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g)
    loss = (ddp(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    rw.report(step)
    if step_time:
        time.sleep(step_time)
    if step % args.every == 0:
        rw.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()}, wait=not args.no_wait, url=args.url)

torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
           os.path.join(args.out, f"{args.tag}_final_r{rank}.pt"))
dist.barrier()  # no rank tears gloo down while a peer still talks to it
dist.destroy_process_group()
# What still holds the process group goes now, while the interpreter is whole: torch 2.13's
# gloo otherwise sometimes aborts in finalisation ("terminate called without an active exception").
del ddp, model, opt
gc.collect()
