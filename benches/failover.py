#!/usr/bin/python3
"""benches/failover.py: how long the production role takes to move.

1. Site failover with the config's default timings (or those LEASE_MS,
   HEARTBEAT_MS, FAILURE_MS set): a group (production member 127.0.0.1, sync
   copy member 127.0.0.2, witness 127.0.0.3) under a QD1 4k writer; SIGKILL
   the production host; the time from the kill to the first write answered
   by the promoted copy host. ROUNDS runs (a fresh group each), median and
   max; each round also logs which voter led the raft quorum at the kill
   (the production host leading it adds a raft election to the failover).
   LEADER=a makes the production host the raft leader before each kill
   (the worst case): while another voter leads, that one is frozen
   (SIGSTOP) for 1.5 s and the group left to settle again.
2. Planned switchover: `crossmirror switchover --to-site west` under the same
   writer; the time from the request to the first write answered by the new
   host, and the command's own report.

Usage: /usr/bin/python3 benches/failover.py   (ROUNDS [10], CM_BIN
[target/release/crossmirror]; LEASE_MS, HEARTBEAT_MS, FAILURE_MS [the
config's defaults], LEADER [any])
"""

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib

group_bench = importlib.import_module("group")
mirror = importlib.import_module("mirror")

ROUNDS = int(os.environ.get("ROUNDS", "10"))
# Each unset: the config's default (cluster-glue/src/config.rs).
LEASE_MS = os.environ.get("LEASE_MS")
HEARTBEAT_MS = os.environ.get("HEARTBEAT_MS")
FAILURE_MS = os.environ.get("FAILURE_MS")
LEADER = os.environ.get("LEADER")

WRITER = r"""
import nbd, sys, time
uris = sys.argv[1].split(","); end = time.time() + float(sys.argv[2]); i = 0; h = None; at = None
while time.time() < end:
    if h is None:
        for at, uri in enumerate(uris):
            try:
                h = nbd.NBD(); h.connect_uri(uri); break
            except Exception:
                h = None
        if h is None:
            time.sleep(0.01); continue
    try:
        h.pwrite(i.to_bytes(8, "little") * 512, (i % 60000) * 4096)
        print("ok", uris[at], time.time(), flush=True); i += 1
    except Exception:
        h = None
"""


class Writer:
    """The QD1 writer; remembers every completion time."""

    def __init__(self, uris, seconds):
        self.times = []
        self.process = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, ",".join(uris), str(seconds)],
                                        stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.process.stdout:
            words = line.split()
            if len(words) == 3 and words[0] == "ok":
                self.times.append((words[1], float(words[2])))

    def first_after(self, moment, uri, timeout=30):
        """Seconds from `moment` to the first write `uri` answered after it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            later = [t for (served, t) in list(self.times) if t > moment and served == uri]
            if later:
                return later[0] - moment
            time.sleep(0.005)
        raise RuntimeError("no write answered after the event")

    def wait(self):
        self.process.wait()


def formed(group):
    group.wait_current()
    while True:
        record = group.record()
        if record and record["production"]["host"] == "a":
            return
        time.sleep(0.05)


def lead(group, name, tries=8):
    """Freeze whoever else leads the raft quorum until `name` does; whether
    it came to lead (in some groups the other two take turns)."""
    seen = []
    for _ in range(tries):
        leader = raft_leader(group)
        if leader == name:
            return True
        seen.append(str(leader))
        if leader in group.processes:
            group.processes[leader].send_signal(signal.SIGSTOP)
            time.sleep(1.5)
            group.processes[leader].send_signal(signal.SIGCONT)
        formed(group)
        time.sleep(1)
    mirror.log(f"{name} never led the raft quorum (leaders seen: {', '.join(seen)}); a fresh group")
    return False


def fresh_group(scratch, binary, secret, label):
    """A formed group, new; under LEADER, one that LEADER leads."""
    for attempt in range(5):
        group = group_bench.Group(scratch, binary, secret, label if attempt == 0 else f"{label}-{attempt}")
        for name in ("w", "a", "b"):
            group.start(name)
        formed(group)
        if not LEADER or lead(group, LEADER):
            return group
        group.stop()
    raise RuntimeError(f"{LEADER} led the raft quorum in none of 5 groups")


def raft_leader(group):
    """The voter that leads the group's raft quorum now, as a says."""
    try:
        return group_bench.status(f"127.0.0.1:{group.ports['admin']}")["quorum"]["leader"]
    except Exception as error:
        return f"unknown ({error})"


def main():
    binary, commit, scratch, secret = group_bench.prepare("failover")
    tables = ""
    if LEASE_MS:
        tables += f"[quorum]\nlease_ms = {int(LEASE_MS)}\n"
    if HEARTBEAT_MS or FAILURE_MS:
        tables += "[liveness]\n"
        tables += f"heartbeat_ms = {int(HEARTBEAT_MS)}\n" if HEARTBEAT_MS else ""
        tables += f"failure_ms = {int(FAILURE_MS)}\n" if FAILURE_MS else ""
    group_bench.CONFIG = group_bench.CONFIG.replace("[[site]]", f"{tables}[[site]]", 1)
    settings = ", ".join(f"{name}={value or 'default'}" for name, value in
                         [("LEASE_MS", LEASE_MS), ("HEARTBEAT_MS", HEARTBEAT_MS), ("FAILURE_MS", FAILURE_MS)])
    settings += f", LEADER={LEADER or 'any'}"

    failovers = []
    leaders = []
    for index in range(ROUNDS):
        group = fresh_group(scratch, binary, secret, f"fail{index}")
        uris = [f"nbd://{ip}:{group.ports['nbd']}" for ip in ("127.0.0.1", "127.0.0.2")]
        writer = Writer(uris, 20)
        time.sleep(1)
        leader = raft_leader(group)
        leaders.append(str(leader))
        killed = time.time()
        group.processes["a"].send_signal(signal.SIGKILL)
        failovers.append(writer.first_after(killed, uris[1]))
        writer.process.kill()
        writer.wait()
        group.stop()
        mirror.log(f"failover {index}: {failovers[-1]:.2f} s (raft leader at the kill: {leader})")

    switchovers = []
    group = group_bench.Group(scratch, binary, secret, "switch")
    for name in ("w", "a", "b"):
        group.start(name)
    formed(group)
    uris = [f"nbd://{ip}:{group.ports['nbd']}" for ip in ("127.0.0.1", "127.0.0.2")]
    for index, site in enumerate(["west", "east"] * (ROUNDS // 2 or 1)):
        writer = Writer(uris[::-1] if site == "west" else uris, 8)
        time.sleep(1)
        asked = time.time()
        subprocess.run([binary, "switchover", "--config", group.config, "--to-site", site], check=True,
                       capture_output=True)
        # The writer is still connected to the old host: it reconnects on
        # its first refused write, trying the new host first.
        new_host = uris[1] if site == "west" else uris[0]
        switchovers.append(writer.first_after(asked, new_host))
        writer.process.kill()
        writer.wait()
        group.wait_current()
        mirror.log(f"switchover {index} to {site}: {switchovers[-1]:.2f} s")
    group.stop()

    lines = [
        f"## Failover and switchover, {time.strftime('%Y-%m-%d')}, commit {commit}",
        "",
        f"`/usr/bin/python3 benches/failover.py` (ROUNDS={ROUNDS}, {settings}; QD1 4k writer, sync copy, one machine)",
        "",
        f"- site failover, SIGKILL of the production host → first write answered by the promoted copy host: "
        f"median {statistics.median(failovers):.2f} s, max {max(failovers):.2f} s over {len(failovers)} "
        f"(failure detection + lease + 200 ms margin + the new host's start); raft leader at each kill: "
        f"{', '.join(leaders)}",
        f"- planned switchover, request → first write answered by the new host: median "
        f"{statistics.median(switchovers):.2f} s, max {max(switchovers):.2f} s over {len(switchovers)}",
    ]
    group_bench.publish(lines)


if __name__ == "__main__":
    main()
