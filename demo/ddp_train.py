"""DDP training written for torchrun; rankwarden makes it survive crashes and hangs.

Runs unchanged under `torchrun --nproc-per-node 2 demo/ddp_train.py` or
`rankwarden run --nproc-per-node 2 demo/ddp_train.py`. NCCL with one GPU per
rank when CUDA is available, gloo on CPU otherwise.

- learns a small synthetic classification task (made in-process, seeded);
- checkpoints every --ckpt-every steps (rank 0, atomic write-then-rename) and
  resumes from the newest checkpoint when restarted;
- calls rankwarden.worker.report(step) so the coordinator can see a hang (a
  no-op under plain torchrun);
- SIGUSR1 makes this rank hang for real (a deadlock stand-in: the process stays
  alive and its heartbeat thread keeps beating, but no step completes). The
  demo uses it to inject the failure torchrun cannot see.
"""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from rankwarden.worker import report
except ImportError:  # running without rankwarden installed
    def report(step, samples=None, **metrics):
        pass

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--ckpt-dir", default="rankwarden-jobs/demo-ckpt")
parser.add_argument("--ckpt-every", type=int, default=10)
parser.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step (to watch it live)")
args = parser.parse_args()


def hang(signum, frame):
    while True:  # a deadlock stand-in: alive, holding nothing, going nowhere
        time.sleep(3600)


signal.signal(signal.SIGUSR1, hang)

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
if use_cuda:
    torch.cuda.set_device(device)

# A synthetic task: 10 classes, each a noisy prototype in 64 dimensions.
g = torch.Generator().manual_seed(0)
prototypes = torch.randn(10, 64, generator=g)


def batch(step: int):
    gen = torch.Generator().manual_seed(10_000 * rank + step)  # deterministic per (rank, step)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    x = prototypes[y] + 0.8 * torch.randn(args.batch, 64, generator=gen)
    return x.to(device), y.to(device)


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(device)
model = DDP(model, device_ids=[device.index] if use_cuda else None)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

os.makedirs(args.ckpt_dir, exist_ok=True)
ckpt_path = os.path.join(args.ckpt_dir, "latest.pt")
start = 0
if os.path.exists(ckpt_path):
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    start = state["step"]
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
print(f"rank {rank}/{world} on {device}, restart {restart}: starting at step {start}", flush=True)

for step in range(start, args.steps):
    x, y = batch(step)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if args.step_time:
        time.sleep(args.step_time)
    report(step + 1, samples=(step + 1) * args.batch * world, loss=loss.item())
    if (step + 1) % args.ckpt_every == 0:
        if rank == 0:
            tmp = ckpt_path + ".tmp"
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt_path)
        dist.barrier()

with torch.no_grad():
    x, y = batch(10**6)
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
print(f"rank {rank}: finished {args.steps} steps, loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}", flush=True)
dist.destroy_process_group()
