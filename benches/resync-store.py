#!/usr/bin/python3
"""benches/resync-store.py: how fast a new copy's full sync runs, by where
the stores live, for one or more builds side by side.

Each round and build: a 1 GiB production volume written from /dev/urandom
(no holes), `crossmirror serve` with one new buffered copy host on
127.0.0.2, and the time from "connected to copy" to "is up to date" in the
production log (`mirror.resync`). Builds alternate within each round.

STORE=tmpfs puts the production volume and the copy's store on a tmpfs the
script mounts (root): there SEEK_HOLE visits every cached page from its
offset to the next hole, so a reader that asks it per range is quadratic in
the volume's size (the tenth session's fix). STORE=disk puts them on SCRATCH.

Usage:
    CM_BINS="/path/old /path/new" STORE=tmpfs /usr/bin/python3 benches/resync-store.py

Environment: CM_BINS [the release build of this checkout], ROUNDS [2],
STORE [tmpfs], SCRATCH [/var/tmp].
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror  # noqa: E402  (the rig: copy hosts, serve, the resync timing)

ROUNDS = int(os.environ.get("ROUNDS", "2"))
STORE = os.environ.get("STORE", "tmpfs")
if STORE not in ("tmpfs", "disk"):
    sys.exit(f"STORE={STORE}: use tmpfs or disk")


def one(binary):
    """Seconds and bytes of one full sync, on new stores."""
    scratch = tempfile.mkdtemp(prefix="crossmirror-resync-store-", dir=mirror.SCRATCH_PARENT)
    mounted = False
    try:
        if STORE == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g", "tmpfs", scratch], check=True)
            mounted = True
        secret = mirror.write_secret(scratch)
        volume = os.path.join(scratch, "production.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={volume}", "bs=1M", "count=1024", "status=none"], check=True)
        done, seconds = mirror.resync(scratch, binary, secret, False)
        return done, seconds
    finally:
        if mounted and subprocess.run(["umount", scratch]).returncode != 0:
            # Never rmtree into a tmpfs still mounted: say so and leave it.
            print(f"[resync-store] could not unmount {scratch}; left in place", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main():
    def run(binary, _index, round_number):
        done, seconds = one(binary)
        print(f"[resync-store] round {round_number + 1} {binary}: {done / 1e6:.0f} MB in {seconds:.2f} s",
              file=sys.stderr, flush=True)
        return done, seconds

    results = mirror.builds_in_turn(ROUNDS, run)
    print(f"A new buffered copy's full sync of a written 1 GiB volume, stores on {STORE} "
          f"(medians of {ROUNDS} rounds, builds alternated)\n")
    print("| build | seconds | MB/s | every round (s) |")
    print("|---|---:|---:|---|")
    for binary, rows in results.items():
        seconds = statistics.median(r[1] for r in rows)
        rate = statistics.median(r[0] for r in rows) / 1e6 / seconds
        print(f"| `{binary}` | {seconds:.2f} | {rate:.0f} | " + " / ".join(f"{r[1]:.2f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
