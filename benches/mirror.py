#!/usr/bin/python3
"""benches/mirror.py: what mirroring costs, measured in one run.

fio (ioengine=nbd, numjobs=2) through `crossmirror serve` on a 1 GiB volume
with no copy, one sync copy, one async copy and two sync copies, all on this
machine (production on 127.0.0.1, copies on 127.0.0.2 and 127.0.0.3),
interleaved over rounds; then the resync throughput of 1 GiB of dirty regions
(a new copy's full initial sync), next to loopback TCP throughput (iperf3)
measured in the same run. Prints Markdown: medians, each configuration's
ratio to the unreplicated run, and the resync ratio.

Usage:
    /usr/bin/python3 benches/mirror.py                 # full run (~12 min)
    ROUNDS=1 RUNTIME=3 /usr/bin/python3 benches/mirror.py   # quick check

Environment: ROUNDS [3], RUNTIME [8] seconds per fio run, CONFIGS
["none sync1 async1 sync2"; also sync1d and async1d, copies with --direct], WORKLOADS [the four NBD workloads], CM_BIN
[target/release/crossmirror; built unless given], SCRATCH [/var/tmp], OUT
[also write the report here], REGION [serve's default] bitmap region size,
CACHE [warm]: `cold` writes back and drops from the page cache the volume and
the copies' stores (fdatasync + POSIX_FADV_DONTNEED, as benches/qemu-mirror.py
does) once each configuration is up, before its fio runs. Why it matters: on
kernels that cache files in large folios (6.18 here), the 1 MiB writes that
fill the volume leave folios of up to 2 MiB, and a 4 KiB buffered write into
one costs ext4 tens of microseconds under the inode lock (benches/RESULTS.md,
fifth and twelfth sessions); after a drop, random 4 KiB writes bring pages
back as 4 KiB folios. Compare ratios measured with the same CACHE only.
Needs iperf3 (apt-get install iperf3) besides fio. The production volume is
shared by the configurations and the copies are not compared: correctness is
the tests' job, this only measures.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "8"))
CONFIGS = os.environ.get("CONFIGS", "none sync1 async1 sync2").split()
WORKLOADS = os.environ.get(
    "WORKLOADS", "4k-randwrite-qd32 4k-randread-qd32 1M-seqwrite-qd8 1M-seqread-qd8"
).split()
SCRATCH_PARENT = os.environ.get("SCRATCH", "/var/tmp")
OUT = os.environ.get("OUT", "")
REGION = os.environ.get("REGION", "")
CACHE = os.environ.get("CACHE", "warm")
if CACHE not in ("warm", "cold"):
    sys.exit(f"CACHE must be warm or cold, not {CACHE!r}")
SIZE = 1 << 30

COPIES = {
    "none": [],
    "sync1": [("east", "127.0.0.2", "")],
    "async1": [("dr", "127.0.0.2", ",mode=async")],
    "sync2": [("east", "127.0.0.2", ""), ("west", "127.0.0.3", "")],
    # A sync copy host with --direct: its writes go through its io_uring,
    # many at once (a buffered copy host writes inline; engine/src/applier.rs).
    "sync1d": [("east", "127.0.0.2", ",direct")],
    "async1d": [("dr", "127.0.0.2", ",mode=async,direct")],
}
WORKLOAD_ARGS = {
    "4k-randwrite-qd32": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "4k-randread-qd32": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "1M-seqwrite-qd8": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "1M-seqread-qd8": ["--rw=read", "--bs=1M", "--iodepth=8"],
}


def log(message):
    print(f"[mirror {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait_listening(ip, port, process, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {ip}:{port}")
        try:
            socket.create_connection((ip, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {ip}:{port}")


def status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=10) as response:
        return json.load(response)


def wait_up_to_date(admin, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        copies = status(admin)["copies"]
        if all(c["state"] == "up_to_date" and c["dirty_bytes"] == 0 and c["lag_bytes"] == 0 for c in copies):
            return
        time.sleep(0.1)
    raise RuntimeError(f"copies not up to date: {status(admin)}")


class Setup:
    """A production host and its copies for one configuration; the stores
    persist across rounds, so only the first start of a copy is a full sync."""

    def __init__(self, scratch, config, binary, secret):
        self.scratch, self.config, self.binary, self.secret = scratch, config, binary, secret
        self.processes = []
        self.volume = os.path.join(scratch, "production.img")
        self.stores = []

    def start(self, wait=True):
        mirrors = []
        for name, ip, options in COPIES[self.config]:
            port = free_port(ip)
            store = os.path.join(self.scratch, f"{self.config}-{name}.img")
            self.stores.append(store)
            args = [self.binary, "copy-host", "--volume", store, "--size", "1G", "--listen", f"{ip}:{port}",
                    "--secret-file", self.secret]
            if ",direct" in options:
                args.append("--direct")
                options = options.replace(",direct", "")
            process = self.spawn(args, f"{self.config}-{name}")
            wait_listening(ip, port, process)
            mirrors += ["--mirror", f"{name}={ip}:{port}{options}"]
        self.port = free_port("127.0.0.1")
        self.admin = f"127.0.0.1:{free_port('127.0.0.1')}"
        # Each configuration keeps its own bitmap and mirror state.
        volume_link = os.path.join(self.scratch, f"{self.config}-production.img")
        if not os.path.exists(volume_link):
            os.symlink(self.volume, volume_link)
        args = [self.binary, "serve", "--volume", volume_link, "--listen", f"127.0.0.1:{self.port}"]
        if mirrors:
            args += mirrors + ["--secret-file", self.secret, "--admin", self.admin]
            if REGION:
                args += ["--region-size", REGION]
        process = self.spawn(args, f"{self.config}-production")
        wait_listening("127.0.0.1", self.port, process)
        self.production = process
        if mirrors and wait:
            wait_up_to_date(self.admin)

    def spawn(self, args, label):
        return spawn_logged(self.scratch, self.processes, args, label)

    def stop(self):
        stop_processes(self.processes)
        self.processes = []


def stop_processes(processes):
    """SIGTERM every process, last started first; kill what has not exited within 60 s."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fio(port, workload):
    return fio_uri(f"nbd://127.0.0.1:{port}", workload)


def fio_uri(uri, workload):
    """fio against `uri`: (IOPS, MB/s) of the workload's direction."""
    args = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--numjobs=2",
            "--size=512M", "--offset_increment=512M", "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1",
            "--group_reporting", "--output-format=json"] + WORKLOAD_ARGS[workload]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    report = json.loads(output[output.find("{"):])
    job = report["jobs"][0]
    side = "read" if "read" in workload else "write"
    return job[side]["iops"], job[side]["bw_bytes"] / 1e6


def iperf(scratch):
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.2", "-p", "5299", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        output = subprocess.run(["iperf3", "-c", "127.0.0.2", "-p", "5299", "-t", "5", "-J"],
                                capture_output=True, text=True, check=True).stdout
        return json.loads(output)["end"]["sum_received"]["bits_per_second"] / 8 / 1e6
    finally:
        server.wait(timeout=10)


def disk_write_rate(scratch):
    """MB/s of fio O_DIRECT 1 MiB sequential writes (QD16, 5 s) to a 1 GiB file in `scratch`: the
    most a --direct copy host whose store is on this file system can write."""
    path = os.path.join(scratch, "disk-rate.img")
    try:
        output = subprocess.run(["fio", "--name=disk", f"--filename={path}", "--size=1G", "--rw=write", "--bs=1M",
                                 "--iodepth=16", "--ioengine=io_uring", "--direct=1", "--time_based", "--runtime=5",
                                 "--output-format=json"], capture_output=True, text=True, check=True).stdout
        return json.loads(output[output.find("{"):])["jobs"][0]["write"]["bw_bytes"] / 1e6
    finally:
        if os.path.exists(path):
            os.remove(path)


def resync(scratch, binary, secret, direct):
    """A new copy of a fully written 1 GiB volume: time its initial sync
    (with `direct`, the copy host runs with --direct)."""
    setup = Setup(scratch, "resync", binary, secret)
    COPIES["resync"] = [("fresh", "127.0.0.2", ",direct" if direct else "")]
    store = os.path.join(scratch, "resync-fresh.img")
    for leftover in [store, store + ".cmmeta", os.path.join(scratch, "resync-production.img.cmcopies"),
                     os.path.join(scratch, "resync-production.img.cmbitmap"),
                     os.path.join(scratch, "resync-production.log")]:
        if os.path.exists(leftover):
            os.remove(leftover)
    started = time.time()
    try:
        setup.start(wait=False)
        while status(setup.admin)["copies"][0]["state"] != "up_to_date":
            if time.time() - started > 600:
                raise RuntimeError("the new copy never became up to date")
            time.sleep(0.02)
        copy = status(setup.admin)["copies"][0]
    finally:
        setup.stop()
    # The pass runs from the "connected" log line to the "up to date" one.
    stamps = {}
    with open(os.path.join(scratch, "resync-production.log")) as f:
        for line in f:
            for key, text in (("start", "connected to copy"), ("end", "is up to date")):
                if text in line and key not in stamps:
                    stamps[key] = line.split()[0]
    def seconds(stamp):
        clock = stamp.split("T")[1].rstrip("Z")
        hours, minutes, rest = clock.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(rest)
    return copy["resync_bytes_done"], seconds(stamps["end"]) - seconds(stamps["start"])


def commit_id():
    """The short commit of the checkout the benchmark runs from."""
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def write_secret(scratch):
    """A fresh shared secret for the rig's replication links, readable by its owner only (the
    binaries refuse one others can read): its path."""
    secret = os.path.join(scratch, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(secret, 0o600)
    return secret


def binary_and_commit():
    """CM_BIN, or the release binary built now; and the commit."""
    binary = os.environ.get("CM_BIN")
    if not binary:
        subprocess.run(["cargo", "build", "--release", "-p", "crossmirror"], cwd=REPO, check=True)
        binary = os.path.join(REPO, "target/release/crossmirror")
    return binary, commit_id()


def builds_in_turn(rounds, run):
    """An A/B of the builds in CM_BINS (default: this checkout's release
    build): `run(binary, index, round_number)` for each build in each round,
    the order rotated one build per round; {binary: [run's results]}."""
    binaries = os.environ.get("CM_BINS", "").split() or [binary_and_commit()[0]]
    results = {binary: [] for binary in binaries}
    for round_number in range(rounds):
        order = binaries[round_number % len(binaries):] + binaries[:round_number % len(binaries)]
        for index, binary in enumerate(order):
            results[binary].append(run(binary, index, round_number))
    return results


def spawn_logged(scratch, processes, args, label):
    """Start `args` with its stderr in `scratch/label.log`, kept in `processes`."""
    log_file = open(os.path.join(scratch, f"{label}.log"), "ab")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log_file,
                               env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
    processes.append(process)
    return process


def drop_cached(path):
    """Write back the file's dirty pages and drop its page cache, so that each workload starts from the
    same state: the data on disk, none of it cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def emit(report):
    """Print the report, and write it to OUT when set."""
    print(report)
    if OUT:
        with open(OUT, "w") as f:
            f.write(report)


def main():
    binary, commit = binary_and_commit()
    scratch = tempfile.mkdtemp(prefix="crossmirror-bench-", dir=SCRATCH_PARENT)
    try:
        secret = write_secret(scratch)
        volume = os.path.join(scratch, "production.img")
        log("filling the 1 GiB volume from /dev/urandom")
        subprocess.run(["dd", "if=/dev/urandom", f"of={volume}", "bs=1M", "count=1024", "status=none"], check=True)
        results = {}
        for round_number in range(ROUNDS):
            order = CONFIGS[round_number % len(CONFIGS):] + CONFIGS[:round_number % len(CONFIGS)]
            for config in order:
                setup = Setup(scratch, config, binary, secret)
                log(f"round {round_number + 1}: {config}: starting (copies sync first)")
                try:
                    setup.start()
                    if CACHE == "cold":
                        for path in [setup.volume] + setup.stores:
                            drop_cached(path)
                    for workload in WORKLOADS:
                        iops, mbs = fio(setup.port, workload)
                        results.setdefault((config, workload), []).append((iops, mbs))
                        log(f"round {round_number + 1}: {config} {workload}: {iops:.0f} IOPS {mbs:.1f} MB/s")
                    if config != "none":
                        wait_up_to_date(setup.admin)
                finally:
                    setup.stop()
        log("sync: write back what the fio runs left dirty, so it does not throttle the resync")
        subprocess.run(["sync"], check=True)
        log("loopback TCP throughput (iperf3, 5 s)")
        tcp = iperf(scratch)
        log("the disk's O_DIRECT sequential write rate (fio, 5 s): what a --direct copy host's store takes")
        disk = disk_write_rate(scratch)
        resyncs = {}
        for direct in (False, True):
            log(f"resync of 1 GiB (a new copy's full sync), copy host {'--direct' if direct else 'buffered'}")
            resyncs[direct] = resync(scratch, binary, secret, direct)
        emit(render(results, commit, tcp, disk, resyncs))
    finally:
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


def render(results, commit, tcp, disk, resyncs):
    lines = [
        "# Mirroring benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}",
        f"- command: `ROUNDS={ROUNDS} RUNTIME={RUNTIME} CONFIGS='{' '.join(CONFIGS)}' REGION={REGION or 'default'} CACHE={CACHE} "
        "/usr/bin/python3 benches/mirror.py`",
        "- fio: ioengine=nbd numjobs=2 size=512M offset_increment=512M, buffered server, 1 GiB volume; "
        "production on 127.0.0.1, copies on 127.0.0.2/127.0.0.3, all on this 2-core machine",
        f"- medians of {ROUNDS} interleaved rounds",
        "",
        "| workload | " + " | ".join(CONFIGS) + " | " + " | ".join(f"{c}/none" for c in CONFIGS if c != "none") + " |",
        "|---|" + "---:|" * (2 * len(CONFIGS) - 1),
    ]
    for workload in WORKLOADS:
        medians = {c: statistics.median(r[0] for r in results[(c, workload)]) for c in CONFIGS}
        row = [workload] + [f"{medians[c]:.0f}" for c in CONFIGS]
        base = medians.get("none")
        row += [f"{medians[c] / base:.2f}" if base else "-" for c in CONFIGS if c != "none"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for direct, (resynced, seconds) in resyncs.items():
        rate = resynced / seconds / 1e6
        lines.append(
            f"Resync to a {'--direct' if direct else 'buffered'} copy host: {resynced / 2**30:.2f} GiB in {seconds:.1f} s "
            f"(resync pass: 'connected' to 'up to date' in the production log) = {rate:.0f} MB/s; "
            f"loopback TCP (iperf3, one stream) {tcp:.0f} MB/s; ratio {rate / tcp:.2f}"
            + (f"; the disk under the copy's store (fio O_DIRECT 1M sequential writes, QD16) {disk:.0f} MB/s, "
               f"resync / disk {rate / disk:.2f}" if direct else ""))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
