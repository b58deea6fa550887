#!/usr/bin/python3
"""benches/group.py: what the group layer costs, measured in one run.

1. Formation: the three nodes of a group (production member 127.0.0.1, sync
   copy member 127.0.0.2, witness 127.0.0.3) started together on empty
   stores; seconds from the start of the last node to the record saying the
   copy is `current` (includes the initial sync of the sparse volume).
2. Recording a copy stale: SIGKILL the copy host, then read from the
   production node's log when `recorded copy west stale (record seq N)` was
   logged (after the quorum committed it); the latency is that minus the
   kill's time: the link noticing the loss plus the compare-and-set through
   the quorum. Repeated STALE_ROUNDS times (the copy host restarts and
   resyncs between rounds); p50 and p99.
3. The data path: fio 4k randwrite QD32 and 1M seqwrite QD8 through the
   group's NBD vs through `serve --mirror` to a `copy-host` (the same
   machine, stores and sync copy), interleaved over ROUNDS; the ratio
   group / standalone (target >= 0.95: the group layer must cost nothing on
   the data path).

Usage: /usr/bin/python3 benches/group.py    (ROUNDS [3], RUNTIME [8],
STALE_ROUNDS [20], FORMATIONS [5], CM_BIN [target/release/crossmirror])
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import json
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib

mirror = importlib.import_module("mirror")

import atexit

# Every process a benchmark started, killed at exit even when it fails.
STARTED = []


@atexit.register
def kill_started():
    for process in STARTED:
        if process.poll() is None:
            process.kill()
            process.wait()

REPO = mirror.REPO
ROUNDS = int(os.environ.get("ROUNDS", "3"))
STALE_ROUNDS = int(os.environ.get("STALE_ROUNDS", "20"))
FORMATIONS = int(os.environ.get("FORMATIONS", "5"))
WORKLOADS = ["4k-randwrite-qd32", "1M-seqwrite-qd8"]

CONFIG = """
group = "bench"
volume_size = "1G"
secret_file = "{secret}"
[ports]
quorum = {quorum}
mirror = {mirror}
nbd = {nbd}
admin = {admin}
[[site]]
name = "east"
role = "production"
[[site]]
name = "west"
role = "copy"
mode = "sync"
[[member]]
name = "a"
site = "east"
address = "127.0.0.1"
volume = "{dir}/east.img"
backup_order = 1
state_dir = "{dir}/a"
[[member]]
name = "b"
site = "west"
address = "127.0.0.2"
volume = "{dir}/west.img"
backup_order = 1
state_dir = "{dir}/b"
[[witness]]
name = "w"
address = "127.0.0.3"
state_dir = "{dir}/w"
"""


def status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=2) as response:
        return json.load(response)


class Group:
    def __init__(self, scratch, binary, secret, label):
        self.dir = os.path.join(scratch, label)
        os.makedirs(self.dir)
        ports = [mirror.free_port("127.0.0.1") for _ in range(4)]
        self.ports = dict(zip(["quorum", "mirror", "nbd", "admin"], ports))
        self.config = os.path.join(self.dir, "group.toml")
        with open(self.config, "w") as file:
            file.write(CONFIG.format(secret=secret, dir=self.dir, **self.ports))
        self.binary = binary
        self.processes = {}

    def start(self, name):
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.processes[name] = subprocess.Popen(
            [self.binary, "node", "--config", self.config, "--name", name],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
        STARTED.append(self.processes[name])

    def record(self):
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            try:
                return status(f"{ip}:{self.ports['admin']}")["record"]
            except Exception:
                continue
        return None

    def wait_current(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            record = self.record()
            if record and record["copies"][0]["state"] == "current" and record["copies"][0]["host"]:
                return
            time.sleep(0.02)
        raise RuntimeError(f"copy never current: {self.record()}")

    def stop(self):
        mirror.stop_processes([self.processes[name] for name in ("w", "b", "a") if name in self.processes])
        self.processes = {}


def stale_times(log_path, after):
    times = []
    with open(log_path, errors="replace") as file:
        for line in file:
            if "recorded copy west stale" in line:
                when = datetime.strptime(line.split()[0][:26], "%Y-%m-%dT%H:%M:%S.%f")
                seconds = (when - datetime(1970, 1, 1)).total_seconds()
                if seconds >= after:
                    times.append(seconds)
    return times


def prepare(label):
    """The binary (built unless CM_BIN names one), the commit, a scratch
    directory and a group secret in it."""
    binary = os.environ.get("CM_BIN") or os.path.join(REPO, "target/release/crossmirror")
    if not os.environ.get("CM_BIN"):
        subprocess.run(["cargo", "build", "--release", "-p", "crossmirror"], cwd=REPO, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    scratch = tempfile.mkdtemp(prefix=f"cm-{label}-bench-", dir=os.environ.get("SCRATCH", "/var/tmp"))
    secret = os.path.join(scratch, "secret")
    with open(secret, "wb") as file:
        file.write(os.urandom(32))
    os.chmod(secret, 0o600)
    return binary, commit, scratch, secret


def publish(lines):
    """Print the report, and append it to OUT when set."""
    report = "\n".join(lines) + "\n"
    print(report)
    if os.environ.get("OUT"):
        with open(os.environ["OUT"], "a") as file:
            file.write(report)


def main():
    binary, commit, scratch, secret = prepare("group")

    formations = []
    for index in range(FORMATIONS):
        group = Group(scratch, binary, secret, f"form{index}")
        for name in ("w", "b", "a"):
            group.start(name)
        last_start = time.time()
        group.wait_current()
        formations.append(time.time() - last_start)
        group.stop()
    mirror.log(f"formation: {[round(f, 2) for f in formations]}")

    group = Group(scratch, binary, secret, "stale")
    for name in ("w", "b", "a"):
        group.start(name)
    group.wait_current()
    latencies = []
    for _ in range(STALE_ROUNDS):
        killed = time.time()
        group.processes["b"].send_signal(signal.SIGKILL)
        group.processes["b"].wait()
        deadline = time.time() + 10
        found = []
        while not found and time.time() < deadline:
            found = stale_times(os.path.join(group.dir, "a.log"), killed - 0.001)
            time.sleep(0.01)
        if found:
            latencies.append((found[0] - killed) * 1000)
        group.start("b")
        group.wait_current()
    group.stop()
    latencies.sort()
    mirror.log(f"stale latencies ms: {[round(l, 1) for l in latencies]}")

    # The data path: the group's NBD vs serve --mirror + copy-host.
    results = {workload: {"group": [], "standalone": []} for workload in WORKLOADS}
    group = Group(scratch, binary, secret, "path")
    standalone = mirror.Setup(scratch, "sync1", binary, secret)
    original_spawn = standalone.spawn

    def spawn_and_remember(args, label):
        process = original_spawn(args, label)
        STARTED.append(process)
        return process

    standalone.spawn = spawn_and_remember
    with open(standalone.volume, "wb") as file:
        file.truncate(1 << 30)
    for round_index in range(ROUNDS):
        for kind in ("group", "standalone"):
            if kind == "group":
                for name in ("w", "b", "a"):
                    group.start(name)
                group.wait_current()
                uri = f"nbd://127.0.0.1:{group.ports['nbd']}"
            else:
                standalone.start()
                uri = f"nbd://127.0.0.1:{standalone.port}"
            for workload in WORKLOADS:
                iops, _ = mirror.fio_uri(uri, workload)
                results[workload][kind].append(iops)
            if kind == "group":
                group.stop()
            else:
                standalone.stop()
    lines = [
        f"## Group layer, {time.strftime('%Y-%m-%d')}, commit {commit}",
        "",
        f"`/usr/bin/python3 benches/group.py` (ROUNDS={ROUNDS}, RUNTIME={mirror.RUNTIME}, STALE_ROUNDS={STALE_ROUNDS}, FORMATIONS={FORMATIONS})",
        "",
        f"- group formation, last node start → copy current (1 GiB sparse, empty): median {statistics.median(formations):.2f} s, max {max(formations):.2f} s (target < 3 s)",
        f"- copy recorded stale after its host's SIGKILL: p50 {statistics.median(latencies):.1f} ms, p99 {latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]:.1f} ms over {len(latencies)} kills (target p99 < 50 ms)",
        "",
        "| workload | group IOPS | serve --mirror IOPS | group / standalone |",
        "| --- | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        g = statistics.median(results[workload]["group"])
        s = statistics.median(results[workload]["standalone"])
        lines.append(f"| {workload} | {g:.0f} | {s:.0f} | {g / s:.2f} |")
    publish(lines)


if __name__ == "__main__":
    main()
