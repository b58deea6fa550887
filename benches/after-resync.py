#!/usr/bin/python3
"""benches/after-resync.py: how fast a volume takes 4k random writes right
after a copy's full sync read it, for one or more builds side by side.

A copy's initial sync reads the whole production volume. Read through the
page cache, that leaves the volume cached in large folios (readahead), and on
ext4 with large folios (Linux 6.x) each later 4 KiB buffered write into one
walks all of its buffer heads (`ext4_block_write_begin`). Since 7dd2568 the
resync reads with RWF_DONTCACHE, so the pages it reads in leave the cache.

Each round and build: a fresh 1 GiB volume written with O_DIRECT (nothing of
it cached), `crossmirror serve` with one sync `--direct` copy host on
127.0.0.2, wait until the copy is up to date (its full sync), count the
volume's cached pages (fincore), then fio 4k randwrite QD32 numjobs=2
(ioengine=nbd) for RUNTIME seconds. Builds alternate within each round.

Usage:
    CM_BINS="/path/old /path/new" /usr/bin/python3 benches/after-resync.py

Environment: CM_BINS [the release build of this checkout], ROUNDS [3],
RUNTIME [8] s, COPY [direct; buffered: a copy host without --direct],
SCRATCH [/var/tmp]. Needs fio and fincore (util-linux).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror  # noqa: E402  (the rig: copy hosts, serve, fio, waiting for up to date)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "8"))
DIRECT = os.environ.get("COPY", "direct") == "direct"
mirror.RUNTIME = RUNTIME


def cached_mib(path):
    """MiB of `path` in the page cache (fincore)."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                            capture_output=True, text=True, check=True).stdout
    return int(output.split()[0]) / (1 << 20)


def one(binary, label):
    scratch = tempfile.mkdtemp(prefix="crossmirror-after-resync-", dir=mirror.SCRATCH_PARENT)
    setup = None
    try:
        secret = mirror.write_secret(scratch)
        volume = os.path.join(scratch, "production.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={volume}", "bs=1M", "count=1024", "oflag=direct",
                        "status=none"], check=True)
        mirror.COPIES[label] = [("east", "127.0.0.2", ",direct" if DIRECT else "")]
        setup = mirror.Setup(scratch, label, binary, secret)
        started = time.time()
        setup.start()  # returns once the copy is up to date: its full sync is done
        synced = time.time() - started
        cached = cached_mib(volume)
        iops, _ = mirror.fio(setup.port, "4k-randwrite-qd32")
        return iops, cached, synced
    finally:
        if setup is not None:
            setup.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    def run(binary, index, round_number):
        iops, cached, synced = one(binary, f"after{index}")
        print(f"[after-resync] round {round_number + 1} {binary}: {iops:.0f} IOPS, {cached:.0f} MiB cached "
              f"after a {synced:.1f} s full sync", file=sys.stderr, flush=True)
        return iops, cached, synced

    results = mirror.builds_in_turn(ROUNDS, run)
    kind = "`--direct`" if DIRECT else "buffered"
    print(f"fio 4k randwrite QD32 x2 through NBD right after a sync {kind} copy's full sync of a 1 GiB "
          f"volume (medians of {ROUNDS} rounds, builds alternated; RUNTIME={RUNTIME})\n")
    print("| build | IOPS | volume cached after the sync (MiB) | start to up to date (s) | every round's IOPS |")
    print("|---|---:|---:|---:|---|")
    for binary, rows in results.items():
        print(f"| `{binary}` | {statistics.median(r[0] for r in rows):.0f} | "
              f"{statistics.median(r[1] for r in rows):.0f} | {statistics.median(r[2] for r in rows):.1f} | "
              + " / ".join(f"{r[0]:.0f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
