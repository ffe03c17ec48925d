"""Check live recovery on GPUs: NCCL's abort path, and CUDA state handed from a survivor to a replacement.

    python demo/live_nccl_check.py            # what this machine can check
    python demo/live_nccl_check.py --need-nccl-pair   # fail unless the 2-rank NCCL check ran

This script stands in for the coordinator (no rankwarden job is started): it
runs 2 rank processes through ``rankwarden.worker.live`` with a fake
heartbeat client, SIGKILLs rank 1 while rank 0 is blocked in DDP's gradient
allreduce, sends rank 0 the coordinator's ``Abort`` (which aborts an NCCL
communicator: NCCL may otherwise block on a dead peer until its timeout),
starts a replacement rank 1 on a fresh rendezvous port, sends ``Reconfigure``,
and checks that both ranks end with the same weights as a fault-free run,
bit for bit, and that rank 0 kept its process.

What runs depends on the GPUs present:

* 2+ GPUs: the 2-rank check with NCCL (one GPU per rank), the real thing.
* 1 GPU: NCCL refuses two ranks on one GPU, so (a) the 2-rank check runs with
  gloo on CUDA tensors (the state hand-over with CUDA tensors, DDP on CUDA),
  and (b) a 1-rank NCCL group is aborted through the same call the live path
  uses, destroyed, and a new NCCL group is created on a new port in the same
  process (what a survivor does), with an allreduce in each.
* no GPU: the 2-rank check with gloo on CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS, KILL_AT = 12, 5


def _stand_in_for_msgspec() -> None:
    """A GPU box with torch but without rankwarden's dependencies: the messages this check passes
    between processes are plain containers here (nothing is encoded), so a stand-in for
    ``msgspec.Struct`` is enough to import ``rankwarden.protocol``."""
    import types

    class Struct:
        def __init_subclass__(cls, **options):
            super().__init_subclass__()

        def __init__(self, *args, **kwargs):
            names = list(dict.fromkeys(n for c in reversed(type(self).__mro__) for n in vars(c).get("__annotations__", {})))
            values = dict(zip(names, args), **kwargs)
            for name in names:
                setattr(self, name, values[name] if name in values else getattr(type(self), name))

    stub = types.ModuleType("msgspec")
    stub.Struct = Struct
    stub.msgpack = types.SimpleNamespace(Encoder=lambda *a, **k: None, Decoder=lambda *a, **k: None)
    stub.DecodeError = stub.ValidationError = type("StandInError", (Exception,), {})
    sys.modules["msgspec"] = stub


try:
    if os.environ.get("RW_CHECK_WITHOUT_MSGSPEC"):
        raise ImportError
    import msgspec  # noqa: F401
except ImportError:
    _stand_in_for_msgspec()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeClient:
    """The worker's heartbeat client, as ``Live`` uses it, over two multiprocessing queues."""

    def __init__(self, inbox, outbox, generation: int) -> None:
        from rankwarden import protocol

        self.welcome = protocol.Welcome(version=protocol.PROTOCOL_VERSION, heartbeat_interval=1.0, attempt=1,
                                        live_generation=generation)
        self.live_abort = None
        self._outbox = outbox
        self._reconfigure = None
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox) -> None:
        from rankwarden import protocol

        while True:
            message = inbox.get()
            if isinstance(message, protocol.Abort) and self.live_abort is not None:
                self.live_abort(message)
            elif isinstance(message, protocol.Reconfigure):
                with self._cond:
                    self._reconfigure = message
                    self._cond.notify_all()

    def send(self, message) -> None:
        self._outbox.put(message)

    def wait_reconfigure(self, generation: int, timeout: float):
        with self._cond:
            self._cond.wait_for(lambda: self._reconfigure is not None and self._reconfigure.generation >= generation,
                                timeout)
            return self._reconfigure


def rank_main(rank: int, backend: str, device_kind: str, port: int, generation: int, fault: bool, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rankwarden.worker._live import Live

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      RANKWARDEN_LIVE="1", RANKWARDEN_LIVE_TIMEOUT="60", RANKWARDEN_LIVE_COLLECTIVE_TIMEOUT="30",
                      TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    device = torch.device(device_kind, rank % max(1, torch.cuda.device_count())) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import datetime

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=30),
                            **({"device_id": device} if backend == "nccl" else {}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    live = Live(model, opt, wrap=lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None),
                client=FakeClient(inbox, outbox, generation))

    def train_step(step, ddp):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(32, 16, generator=g).to(device)
        loss = (ddp(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        if fault and rank == 1 and step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)  # before backward: rank 0 blocks in the allreduce
        if fault and rank == 0 and step == KILL_AT:
            time.sleep(0.5)  # be inside the allreduce when rank 1 dies
        loss.backward()
        opt.step()
        return loss.item()

    for _step, _loss in live.steps(0, STEPS, train_step):
        pass
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    outbox.put(("done", rank, os.getpid(), weights, [r[:3] for r in live.recoveries]))
    dist.destroy_process_group()


def run_pair(backend: str, device_kind: str, fault: bool) -> dict:
    """Two ranks; with ``fault`` rank 1 dies in step KILL_AT and is replaced live. Returns rank -> (pid, weights)."""
    from rankwarden import protocol

    ctx = mp.get_context("spawn")
    outbox = ctx.Queue()
    inboxes = {0: ctx.Queue(), 1: ctx.Queue()}
    port = free_port()
    procs = {rank: ctx.Process(target=rank_main, args=(rank, backend, device_kind, port, 0, fault, inboxes[rank], outbox))
             for rank in (0, 1)}
    for p in procs.values():
        p.start()
    done: dict = {}
    deadline = time.monotonic() + 240
    replaced, ready, t0, new_port = False, None, 0.0, 0

    def reconfigure():
        inboxes[0].put(protocol.Reconfigure(generation=1, master_addr="127.0.0.1", master_port=new_port,
                                            world_size=2, rank=0))

    try:
        while len(done) < 2:
            if time.monotonic() > deadline:
                raise SystemExit(f"{backend}/{device_kind}: no result within 240 s")
            if fault and not replaced and procs[1].exitcode is not None:
                # Verdict first: rank 1 is dead and reaped. Then abort rank 0's group and replace rank 1.
                replaced, t0 = True, time.monotonic()
                inboxes[0].put(protocol.Abort(generation=0, reason="rank 1 failed"))
                new_port = free_port()
                inboxes[1] = ctx.Queue()
                procs[1] = ctx.Process(target=rank_main,
                                       args=(1, backend, device_kind, new_port, 1, False, inboxes[1], outbox))
                procs[1].start()
                if ready is not None:
                    reconfigure()
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(message, protocol.LiveReady):
                ready = message
                print(f"  rank 0 left its group{f' {time.monotonic() - t0:.2f}s after the verdict' if replaced else ''}: "
                      f"{message.error.splitlines()[0][:120]}")
                if replaced:
                    reconfigure()
            elif isinstance(message, tuple) and message[0] == "done":
                _, rank, pid, weights, recoveries = message
                done[rank] = (pid, weights, recoveries)
    finally:
        for p in procs.values():
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    return done | {"pids": {rank: p.pid for rank, p in procs.items()}}


def check_pair(backend: str, device_kind: str) -> bool:
    print(f"2-rank live recovery, {backend} on {device_kind}:")
    clean = run_pair(backend, device_kind, fault=False)
    faulty = run_pair(backend, device_kind, fault=True)
    same = clean[0][1] == faulty[0][1] == faulty[1][1]
    kept = faulty[0][0] == faulty["pids"][0]
    print(f"  recoveries seen by rank 0: {faulty[0][2]}; replacement: {faulty[1][2]}")
    print(f"  rank 0 kept its process: {'yes' if kept else 'NO'}; weights bit-identical to the fault-free run on "
          f"both ranks: {'yes' if same else 'NO'}")
    return same and kept and bool(faulty[0][2])


def nccl_single_rank_abort() -> bool:
    """One GPU: abort a 1-rank NCCL group the way the live path does, then build a new one in-process."""
    import datetime

    import torch
    import torch.distributed as dist

    from rankwarden.worker._live import _abort_nccl

    print("1-rank NCCL: abort the communicator, destroy, re-create on a new port, allreduce:")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    results = []
    for attempt in range(2):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=30), device_id=device)
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        results.append(t.sum().item())
        if attempt == 0:
            started = time.monotonic()
            _abort_nccl(dist)
            print(f"  abort returned in {time.monotonic() - started:.3f}s; default group still registered: "
                  f"{dist.is_initialized()}")
        if dist.is_initialized():  # an aborted group is already out of the registry (torch 2.11+)
            dist.destroy_process_group()
    ok = results == [4.0, 4.0]
    print(f"  allreduce before and after: {results}: {'ok' if ok else 'WRONG'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--need-nccl-pair", action="store_true", help="fail unless the 2-rank NCCL check ran")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch {torch.__version__}, {gpus} GPU(s), NCCL {'yes' if gpus and torch.distributed.is_nccl_available() else 'no'}")
    results = {}
    if gpus >= 2:
        results["nccl pair"] = check_pair("nccl", "cuda")
    elif gpus == 1:
        print("one GPU: NCCL refuses two ranks on one GPU; the 2-rank NCCL check needs 2 GPUs")
        results["gloo pair on cuda"] = check_pair("gloo", "cuda")
        results["nccl 1-rank abort"] = nccl_single_rank_abort()
    else:
        results["gloo pair on cpu"] = check_pair("gloo", "cpu")
    print("; ".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    if args.need_nccl_pair and "nccl pair" not in results:
        print("the 2-rank NCCL check did not run (needs 2 GPUs)")
        return 1
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
