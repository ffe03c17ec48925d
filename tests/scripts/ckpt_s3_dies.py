"""Dies by SIGKILL in the middle of saving step 1 to an object store.

usage: ckpt_s3_dies.py URL JOB MODE
  in-callable  a function payload (torch.save style) has written its local file
  mid-stream   half of a 12 MiB chunked payload is uploaded (5 MiB parts: a multipart upload is open)
"""

import os
import signal
import sys

from rankwarden.checkpoint import CheckpointStore, set_fault_hook

url, job, mode = sys.argv[1:4]
store = CheckpointStore(url, job)


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def torch_save_like(path):
    with open(path, "wb") as f:
        f.write(b"x" * (1 << 20))
    die()


class Chunks:
    def chunks(self):
        for i in range(4):
            yield memoryview(bytes([i]) * (3 << 20))


if mode == "in-callable":
    store.save(1, {"rank_00000.pt": torch_save_like})
elif mode == "mid-stream":
    store.backend.part_size = 5 << 20
    set_fault_hook(lambda point: point == "mid_payload" and die())
    store.save(1, {"rank_00000.pt": Chunks()})
print("completed without dying")
