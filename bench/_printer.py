"""A rank for bench/api_streams.py: prints `rank seq wall-time` lines at a steady rate, then exits.

The time in each line is taken just before the line is written, so the bench
times delivery from the rank's write to the client's receipt. The number of
lines printed is also written to ``<out>/printed_<rank>`` (outside the
server), so lines lost are counted against what the rank printed.
"""

import os
import sys
import time

rate, seconds = float(sys.argv[1]), float(sys.argv[2])
out = sys.argv[3] if len(sys.argv) > 3 else None
lead = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
rank = os.environ["RANK"]
time.sleep(lead)  # the bench's subscribers connect meanwhile
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
if out:
    with open(os.path.join(out, f"printed_{rank}"), "w") as f:
        f.write(f"{sent + 1}\n")  # the numbered lines and the `done` line
