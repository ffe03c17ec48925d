"""DDP (gloo, CPU) trained through rankwarden.worker.live, for the live-recovery tests.

Data is a pure function of (step, rank); RNG is drawn every step (dropout),
so a recovery that restored the wrong RNG state or step would change the
final weights. Each rank appends what happened to ``--out/log_r<rank>.jsonl``
(pid, every completed step, every recovery) and, after each recovery,
writes its whole state (parameters, optimizer) to
``state_g<generation>_r<rank>.pt`` so the test can compare ranks tensor by
tensor. At the end rank files ``final_r<rank>.pt`` hold the same.
SIGUSR1 makes a rank hang for real (alive, heartbeating, no progress).
"""

import argparse
import gc
import hashlib
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import rankwarden.worker as rw

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--every", type=int, default=10)
parser.add_argument("--step-time", type=float, default=0.02)
parser.add_argument("--out", required=True)
args = parser.parse_args()


def hang(signum, frame):
    while True:  # a deadlock stand-in
        time.sleep(3600)


signal.signal(signal.SIGUSR1, hang)
timeout = rw.collective_timeout()
dist.init_process_group("gloo", **({"timeout": timeout} if timeout else {}))
rank = dist.get_rank()
log = open(os.path.join(args.out, f"log_r{rank}.jsonl"), "a", buffering=1)


def note(event, **fields):
    log.write(json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n")


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
start = 0
found = rw.restore()
if found is not None:
    start, state = found
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rw.set_rng_state(state["rng"])
    start += 1
note("start", start=start, generation=(rw.connect().welcome.live_generation if rw.connect() else 0))


def full_state():
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}


dumped = set()


def digest():
    # Of the weights after the step: where two runs part, the logs say at which step.
    h = hashlib.sha1()
    for value in model.state_dict().values():
        h.update(value.detach().numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()[:12]


def train_step(step, ddp):
    if live.recoveries and step == live.recoveries[-1][2] + 1 and live.generation not in dumped:
        # The state every rank loaded, before any rank trains on it.
        dumped.add(live.generation)
        torch.save(full_state(), os.path.join(args.out, f"state_g{live.generation}_r{rank}.pt"))
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    loss = (ddp(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(args.step_time)
    return loss.item()


# One bucket per parameter from the first step on: a bucket's flattened layout decides the order in
# which gloo's ring sums 3+ ranks' gradients, and a new wrapper otherwise starts with one bucket of
# everything and rebuilds it after its first step (find_unused_parameters keeps the first bucketing
# by size). With 2 ranks the order does not matter (a + b == b + a). See README, live recovery.
live = rw.live(model, opt, wrap=lambda m: DDP(m, bucket_cap_mb=1e-6, find_unused_parameters=True))
recoveries = 0
for step, loss in live.steps(start, args.steps, train_step):
    while recoveries < len(live.recoveries):
        generation, source, applied, _ = live.recoveries[recoveries]
        recoveries += 1
        note("recovered", generation=generation, source=source, applied=applied)
    note("step", step=step, digest=digest())
    rw.report(step)
    if step % args.every == 0:
        rw.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rw.rng_state()}, wait=False)

torch.save(full_state(), os.path.join(args.out, f"final_r{rank}.pt"))
note("end")
dist.barrier()
dist.destroy_process_group()
del live, model, opt
gc.collect()
