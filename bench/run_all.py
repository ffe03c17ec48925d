"""`make bench`: run every benchmark once and write bench/RESULTS.md (machine, date, every figure).

Each benchmark measures side by side within its own run and prints ratios;
this only runs them in turn and keeps their output.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHES = [
    ("Recovery vs torchrun, and the restart floor", ["recovery.py", "--trials", "5", "--sigstop-wait", "120"]),
    ("Failure detection vs torchrun", ["detection.py", "--trials", "5"]),
    ("Coordinator scale", ["scale.py"]),
    ("API streams", ["api_streams.py"]),
    ("Checkpoint write and read", ["checkpoint.py", "--trials", "3"]),
]


def machine() -> str:
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / (1 << 20)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    sections = []
    started = time.time()
    for title, argv in BENCHES:
        print(f"== {title}: {' '.join(argv)}", flush=True)
        t0 = time.time()
        result = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], capture_output=True, text=True,
                                cwd=ROOT)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        print("\n".join(lines), flush=True)
        status = "" if result.returncode == 0 else f"\n(exit status {result.returncode}: {result.stderr.strip().splitlines()[-1:]})"
        sections.append(f"## {title}\n\n`python bench/{' '.join(argv)}` ({time.time() - t0:.0f} s)\n\n```\n"
                        + "\n".join(lines) + f"\n```{status}\n")
    body = (f"# Benchmark results\n\nMeasured by `make bench` on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{machine()}, in {(time.time() - started) / 60:.1f} minutes. The machine is shared and noisy: "
            "read medians and the ratios each benchmark prints side by side, not single figures.\n\n"
            + "\n".join(sections))
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(body)
    print(f"wrote bench/RESULTS.md in {(time.time() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
