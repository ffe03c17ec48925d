"""A plain torchrun DDP script (gloo, CPU): it knows nothing about rankwarden.

It checkpoints every few steps (rank 0 writes, atomically) and resumes from the
checkpoint when restarted, like any elastic torchrun script.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--ckpt", required=True)
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DDP(torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
start = 0
if os.path.exists(args.ckpt):
    state = torch.load(args.ckpt, weights_only=True)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    start = state["step"]
print(f"rank {rank}/{world} restart={os.environ.get('TORCHELASTIC_RESTART_COUNT')} starting at step {start}", flush=True)
gen = torch.Generator().manual_seed(1234 + rank)
for step in range(start, args.steps):
    x = torch.randn(32, 16, generator=gen)
    loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0 and (step + 1) % 5 == 0:
        tmp = args.ckpt + ".tmp"
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
        os.replace(tmp, args.ckpt)
    dist.barrier()
print(f"rank {rank} finished at step {args.steps} loss {loss.item():.4f}", flush=True)
dist.destroy_process_group()
