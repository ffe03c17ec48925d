"""A rank for bench/api_streams.py: prints `seq wall-time` lines at a steady rate, then exits."""

import os
import sys
import time

rate, seconds = float(sys.argv[1]), float(sys.argv[2])
rank = os.environ["RANK"]
start = time.time()
sent = 0
while (now := time.time()) - start < seconds:
    due = int((now - start) * rate)
    while sent < due:
        sent += 1
        sys.stdout.write(f"{rank} {sent} {time.time():.6f}\n")
    sys.stdout.flush()
    time.sleep(0.005)
print(f"{rank} done {sent}", flush=True)
