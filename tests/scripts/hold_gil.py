"""Hold the GIL in one C call for about SECONDS of CPU (like json.load of a huge file), then exit 0.

``sum(range(n))`` runs entirely in C and never reaches the interpreter's
eval loop, so no other thread (the heartbeat's) runs until it returns.
Prints the longest gap another thread saw, to prove it was starved."""

import sys
import threading
import time

seconds = float(sys.argv[1])
#: Seconds to live on after the hold, so the heartbeat thread gets to judge what it missed.
after = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
probe = 2_000_000
start = time.thread_time()
sum(range(probe))
per_item = max(time.thread_time() - start, 1e-4) / probe

gaps = []


def ticker(stop):
    last = time.monotonic()
    while not stop.is_set():
        time.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


stop = threading.Event()
thread = threading.Thread(target=ticker, args=(stop,), daemon=True)
thread.start()
time.sleep(0.05)
begin = time.monotonic()
sum(range(int(seconds / per_item)))
held = time.monotonic() - begin
stop.set()
thread.join()
print(f"held the GIL for {held:.2f}s; longest gap another thread saw: {max(gaps):.2f}s", flush=True)
time.sleep(after)
