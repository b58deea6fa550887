#!/usr/bin/python3
"""benches/compression.py: what link compression buys and costs, in one run.

A production host (`serve`) with one async copy host (127.0.0.2), the copy
link compressed with none, lz4 and zstd (level 3) in turn; fio 1M seqwrite
QD8 through NBD, with compressible buffers (fio's
buffer_compress_percentage=COMPRESSIBLE, default 50) and with random ones.
For each: fio's MB/s, the link's bytes in / bytes sent (the ratio), and the
production host's CPU seconds spent compressing per GiB offered, all read
from the copy's `compression` status. Interleaved over ROUNDS; medians.

On loopback the link is never the bottleneck, so this measures the ratio
and the CPU cost; what the ratio buys on a WAN is the link's rate times the
ratio (see issue 13's WAN rig, not built yet).

Usage: /usr/bin/python3 benches/compression.py  (ROUNDS [3], RUNTIME [8],
COMPRESSIBLE [50], CM_BIN [target/release/crossmirror])
"""

import os
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib

mirror = importlib.import_module("mirror")

REPO = mirror.REPO
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "8"))
COMPRESSIBLE = int(os.environ.get("COMPRESSIBLE", "50"))
SETTINGS = ["none", "lz4", "zstd:3"]
DATA = {
    "compressible": [f"--buffer_compress_percentage={COMPRESSIBLE}", "--refill_buffers"],
    "random": ["--refill_buffers"],
}


def fio(port, extra):
    args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}", "--numjobs=1",
            "--size=1G", "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1", "--rw=write", "--bs=1M",
            "--iodepth=8", "--output-format=json"] + extra
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    report = mirror.json.loads(output[output.find("{"):])
    return report["jobs"][0]["write"]["bw_bytes"] / 1e6


def run_rounds(binary, scratch, secret, results):
    """Every configuration and data kind, ROUNDS times, interleaved."""
    for round_ in range(ROUNDS):
        for data, extra in DATA.items():
            for setting in SETTINGS:
                setup = mirror.Setup(scratch, setting, binary, secret)
                setup.start()
                try:
                    before = mirror.status(setup.admin)["copies"][0]["compression"]
                    mbps = fio(setup.port, extra)
                    mirror.wait_up_to_date(setup.admin)
                    after = mirror.status(setup.admin)["copies"][0]["compression"]
                finally:
                    setup.stop()
                bytes_in = after["bytes_in"] - before["bytes_in"]
                bytes_out = after["bytes_out"] - before["bytes_out"]
                cpu = after["cpu_seconds"] - before["cpu_seconds"]
                ratio = bytes_in / bytes_out if bytes_out else 1.0
                cpu_per_gib = cpu / (bytes_in / (1 << 30)) if bytes_in else 0.0
                results[(setting, data)].append((mbps, ratio, cpu_per_gib))
                mirror.log(f"round {round_ + 1} {data} {setting}: {mbps:.0f} MB/s, ratio {ratio:.2f}, "
                           f"{cpu_per_gib:.2f} CPU s/GiB")


def main():
    binary, commit = mirror.binary_and_commit()
    scratch = tempfile.mkdtemp(prefix="crossmirror-compress-", dir=mirror.SCRATCH_PARENT)
    secret = os.path.join(scratch, "secret")
    with open(secret, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(secret, 0o600)
    with open(os.path.join(scratch, "production.img"), "wb") as f:
        f.truncate(mirror.SIZE)
    for setting in SETTINGS:
        mirror.COPIES[setting] = [("dr", "127.0.0.2", f",mode=async,compress={setting}")]
    results = {(setting, data): [] for setting in SETTINGS for data in DATA}
    try:
        run_rounds(binary, scratch, secret, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"## Link compression ({datetime.now().strftime('%Y-%m-%d')}, commit {commit})\n")
    print(f"Command: `ROUNDS={ROUNDS} RUNTIME={RUNTIME} COMPRESSIBLE={COMPRESSIBLE} "
          "CM_BIN=target/release/crossmirror /usr/bin/python3 benches/compression.py`; fio 1M seqwrite QD8 "
          "through NBD, one async copy on 127.0.0.2; medians of the rounds.\n")
    print("| data | compress | MB/s | MB/s vs none | ratio (in/sent) | CPU s per GiB offered |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for data in DATA:
        base = statistics.median(r[0] for r in results[("none", data)])
        for setting in SETTINGS:
            rows = results[(setting, data)]
            mbps = statistics.median(r[0] for r in rows)
            ratio = statistics.median(r[1] for r in rows)
            cpu = statistics.median(r[2] for r in rows)
            print(f"| {data} | {setting} | {mbps:.0f} | {mbps / base:.2f} | {ratio:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
