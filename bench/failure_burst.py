"""CPU the coordinator spends failing N ranks at the same instant (rank scope, MockClock).

Every rank says hello, heartbeats once, then goes silent: all N reach their
heartbeat deadline at the same virtual instant. The CPU time of the virtual
second around that instant is printed (the fake ranks' own teardown is in it
too). ``--profile`` prints the rankwarden functions that cost the most.

    python bench/failure_burst.py 1000
    python bench/failure_burst.py 1000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import trio  # noqa: E402
from trio.testing import MockClock  # noqa: E402

from rankwarden.coordinator import Coordinator  # noqa: E402
from rankwarden.events import RankFailed  # noqa: E402
from rankwarden.spec import JobSpec  # noqa: E402
from rankwarden.testing import MemoryListener, open_fake_launcher  # noqa: E402


async def burst(ranks: int, profile: cProfile.Profile | None) -> tuple[int, set[float], float]:
    spec = JobSpec.from_dict(dict(
        entrypoint="f.py", world_size=ranks, job_id="burst", job_dir=os.path.join(tempfile.mkdtemp(), "job"),
        heartbeat_timeout=2.0, heartbeat_interval=0.1, progress_timeout=0, startup_timeout=600,
        restart_scope="rank", max_restarts=ranks, backoff=dict(initial=1000.0, max=1000.0, jitter=0.0)))

    async def behaviour(fake):
        await fake.hello()
        if fake.attempt == 1:
            await fake.heartbeat(step=1)
        await trio.sleep_forever()

    listener = MemoryListener()
    failed: list[float] = []
    async with open_fake_launcher(behaviour, listener) as launcher:
        coordinator = Coordinator(spec, launcher=launcher, listeners=[listener])
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)

            async def watch() -> None:
                async for event in coordinator.events():
                    if isinstance(event, RankFailed):
                        failed.append(trio.current_time())

            nursery.start_soon(watch)
            await trio.sleep(1.5)
            if profile is not None:
                profile.enable()
            cpu = time.process_time()
            await trio.sleep(1.0)  # the deadlines are at 2.0
            cpu = time.process_time() - cpu
            if profile is not None:
                profile.disable()
            coordinator.stop(force=True)
            await coordinator.wait()
            nursery.cancel_scope.cancel()
    return len(failed), set(failed), cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", type=int, nargs="?", default=1000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    profile = cProfile.Profile() if args.profile else None
    count, times, cpu = trio.run(burst, args.ranks, profile, clock=MockClock(autojump_threshold=0))
    print(f"{count} of {args.ranks} ranks failed at virtual time(s) {sorted(times)}; CPU {cpu * 1000:.0f} ms "
          f"({cpu * 1000 / max(1, count):.2f} ms per failure)")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats("rankwarden", 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
