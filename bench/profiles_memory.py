"""Per-user profiles stay bounded (issue 16): a million distinct users each rate one answer and are routed once
through `tiergate_router.profiles.UserProfiles`; prints the table's bytes, the process RSS after every 100,000
users, the users held and the evictions, and the time per call.

    nice .venv/bin/python bench/profiles_memory.py [--users 1000000] [--max-users 100000] [--tiers 9]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tiergate_router.profiles import ProfileConfig, UserProfiles


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), not the peak: a bounded table keeps it flat."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--max-users", type=int, default=100_000)
    ap.add_argument("--tiers", type=int, default=9)
    a = ap.parse_args()
    profiles = UserProfiles(ProfileConfig(tiers=a.tiers, max_users=a.max_users))
    quality = [0.5] * a.tiers
    mib = 1024 * 1024
    print(
        f"table {profiles.nbytes / mib:.2f} MiB for {a.max_users} users x {a.tiers} tiers; "
        f"RSS {rss_bytes() / mib:.1f} MiB"
    )
    t0 = time.perf_counter()
    for u in range(a.users):
        uid = f"user-{u}"
        profiles.observe(uid, u % a.tiers, 1.0 if u % 3 else -1.0, 0.5)
        profiles.adjust(uid, quality)
        if (u + 1) % 100_000 == 0:
            print(
                f"{u + 1:>9} distinct users: RSS {rss_bytes() / mib:.1f} MiB, held {len(profiles)}, "
                f"evictions {profiles.evictions}",
                flush=True,
            )
    per_call = (time.perf_counter() - t0) / (2 * a.users) * 1e6
    print(f"table still {profiles.nbytes / mib:.2f} MiB; {per_call:.1f} us per observe/adjust call")


if __name__ == "__main__":
    main()
