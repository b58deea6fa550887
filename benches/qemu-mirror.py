#!/usr/bin/python3
"""benches/qemu-mirror.py: crossmirror's synchronous mirroring next to QEMU's,
the userspace peer a user would pick instead (issue 12).

Four configurations, interleaved over rounds, same fio workloads (ioengine=nbd,
numjobs=2, each job on its own 512 MiB half of a 1 GiB volume):

- cm-none:   `crossmirror serve` (buffered volume), no copy;
- cm-sync:   the same with one sync copy host on 127.0.0.2 (`--direct`);
- qemu-none: `qemu-storage-daemon` exporting the same volume file over NBD;
- qemu-sync: the same daemon with `blockdev-mirror sync=full
             copy-mode=write-blocking` to an NBD target (a second
             qemu-storage-daemon on 127.0.0.2 writing its file with
             cache.direct=on), the mirror's filter node exported once the job
             is ready (an export of the source node itself would bypass it).

Before measuring, the script proves that both mirrors are really synchronous:
a write acknowledged through NBD is already in the copy's file, and a write
issued while the copy's process is SIGSTOPped does not complete until it is
SIGCONTed.

QEMU's promises are weaker, which the report says: its mirror sends no flush
to the target on a guest flush (a write-blocking mirror completes writes once
the target NBD server answered them), its dirty bitmap lives in memory (a
source crash means a full resync), a hung target blocks writes with no
timeout, and the NBD link has no authentication.

Usage:
    /usr/bin/python3 benches/qemu-mirror.py                         # ~10 min
    ROUNDS=1 RUNTIME=3 /usr/bin/python3 benches/qemu-mirror.py      # quick check

Environment: ROUNDS [3], RUNTIME [8] s per fio run, CONFIGS [all four],
WORKLOADS ["4k-randwrite-qd32 1M-seqwrite-qd8"], CM_BIN
[target/release/crossmirror, built unless given], SCRATCH [/var/tmp], OUT
[also write the report here]. Needs fio, qemu-utils and python3-libnbd.
"""

import json
import shutil
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror  # noqa: E402  (the crossmirror side: Setup, fio helpers)

REPO = mirror.REPO
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "8"))
CONFIGS = os.environ.get("CONFIGS", "cm-none cm-sync qemu-none qemu-sync").split()
WORKLOADS = os.environ.get("WORKLOADS", "4k-randwrite-qd32 1M-seqwrite-qd8").split()
OUT = os.environ.get("OUT", "")
SIZE = 1 << 30
mirror.RUNTIME = RUNTIME


def log(message):
    print(f"[qemu-mirror {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Qmp:
    """A minimal QMP client over a unix socket: commands in, answers and events out."""

    def __init__(self, path, timeout=20):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        self.events = []
        self.read()  # the greeting
        self.command("qmp_capabilities")

    def read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def command(self, execute, **arguments):
        self.file.write(json.dumps({"execute": execute, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            message = self.read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RuntimeError(f"QMP {execute}: {message['error']}")
            self.events.append(message)

    def wait_event(self, name, timeout=300):
        deadline = time.time() + timeout
        self.sock.settimeout(timeout)
        while time.time() < deadline:
            for event in self.events:
                if event.get("event") == name:
                    self.events.remove(event)
                    return event
            self.events.append(self.read())
        raise RuntimeError(f"no QMP event {name} within {timeout} s")


class QemuSetup:
    """qemu-storage-daemon serving the volume, with or without a
    write-blocking mirror to a target daemon on 127.0.0.2."""

    def __init__(self, scratch, config, volume):
        self.scratch, self.config, self.volume = scratch, config, volume
        self.processes = []
        self.copy = os.path.join(scratch, "qemu-copy.img")

    def spawn(self, args, label):
        log_file = open(os.path.join(self.scratch, f"{label}.log"), "ab")
        process = subprocess.Popen(args, stdout=log_file, stderr=log_file)
        self.processes.append(process)
        return process

    def start(self):
        self.port = mirror.free_port("127.0.0.1")
        self.uri = f"nbd://127.0.0.1:{self.port}/vol"
        qmp_path = os.path.join(self.scratch, f"{self.config}.qmp")
        if os.path.exists(qmp_path):
            os.remove(qmp_path)
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=src-file,filename={self.volume},aio=io_uring",
                "--blockdev", "driver=raw,node-name=src,file=src-file"]
        if self.config == "qemu-sync":
            if not os.path.exists(self.copy):
                with open(self.copy, "wb") as f:
                    f.truncate(SIZE)
            target_port = mirror.free_port("127.0.0.2")
            self.target = self.spawn([
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=copy,filename={self.copy},cache.direct=on,aio=io_uring",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.2,addr.port={target_port}",
                "--export", "type=nbd,id=copy-export,node-name=copy,name=copy,writable=on",
            ], "qemu-target")
            mirror.wait_listening("127.0.0.2", target_port, self.target)
            args += ["--blockdev", f"driver=nbd,node-name=target,server.type=inet,server.host=127.0.0.2,"
                                   f"server.port={target_port},export=copy"]
        args += ["--chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off", "--monitor", "chardev=qmp"]
        self.source = self.spawn(args, f"{self.config}-source")
        qmp = Qmp(qmp_path)
        exported = "src"
        if self.config == "qemu-sync":
            qmp.command("blockdev-mirror", **{"job-id": "mirror", "device": "src", "target": "target",
                                              "sync": "full", "copy-mode": "write-blocking",
                                              "filter-node-name": "mirror-top"})
            qmp.wait_event("BLOCK_JOB_READY")
            exported = "mirror-top"
        qmp.command("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(self.port)}})
        qmp.command("block-export-add", type="nbd", id="vol", **{"node-name": exported}, name="vol", writable=True)
        self.qmp = qmp
        mirror.wait_listening("127.0.0.1", self.port, self.source)

    def copy_process(self):
        return self.target

    def stop(self):
        mirror.stop_processes(self.processes)
        self.processes = []


class CrossmirrorSetup:
    """crossmirror serve, alone (cm-none) or with one sync --direct copy host (cm-sync)."""

    def __init__(self, scratch, config, binary, secret):
        mirror.COPIES["cm-none"] = []
        mirror.COPIES["cm-sync"] = [("east", "127.0.0.2", ",direct")]
        self.setup = mirror.Setup(scratch, config, binary, secret)
        self.scratch = scratch
        self.copy = os.path.join(scratch, "cm-sync-east.img")

    def start(self):
        self.setup.start()
        self.uri = f"nbd://127.0.0.1:{self.setup.port}"

    def copy_process(self):
        return self.setup.processes[0]

    def stop(self):
        self.setup.stop()


PROOF = r"""
import nbd, os, sys, time, signal
uri, copy, pid, offset = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
data = os.urandom(4096)
h.pwrite(data, offset)
with open(copy, "rb") as f:
    f.seek(offset)
    assert f.read(4096) == data, "an acknowledged write is not in the copy's file"
os.kill(pid, signal.SIGSTOP)
try:
    later = os.urandom(4096)
    cookie = h.aio_pwrite(later, offset + 4096)
    deadline = time.time() + 2
    while time.time() < deadline:
        h.poll(100)
        assert not h.aio_command_completed(cookie), "a write completed while the copy was stopped"
finally:
    os.kill(pid, signal.SIGCONT)
while not h.aio_command_completed(cookie):
    h.poll(100)
with open(copy, "rb") as f:
    f.seek(offset + 4096)
    assert f.read(4096) == later, "the write completed after the copy resumed is not in its file"
print("synchronous")
"""


def prove_synchronous(setup, label):
    """An acknowledged write is in the copy's file; a write issued while the copy is stopped waits."""
    offset = 900 << 20
    result = subprocess.run(["/usr/bin/python3", "-c", PROOF, setup.uri, setup.copy,
                             str(setup.copy_process().pid), str(offset)], capture_output=True, text=True)
    if result.returncode != 0 or "synchronous" not in result.stdout:
        raise RuntimeError(f"{label} is not synchronous: {result.stdout}{result.stderr}")
    log(f"{label}: proven synchronous (acknowledged write in the copy's file; a write waits while the copy is stopped)")


def main():
    binary = os.environ.get("CM_BIN")
    if not binary:
        subprocess.run(["cargo", "build", "--release", "-p", "crossmirror"], cwd=REPO, check=True)
        binary = os.path.join(REPO, "target/release/crossmirror")
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    scratch = tempfile.mkdtemp(prefix="crossmirror-qemu-bench-", dir=mirror.SCRATCH_PARENT)
    try:
        measure(scratch, binary, commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(scratch, binary, commit):
    secret = os.path.join(scratch, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(secret, 0o600)
    volume = os.path.join(scratch, "production.img")
    log("filling the 1 GiB volume from /dev/urandom")
    subprocess.run(["dd", "if=/dev/urandom", f"of={volume}", "bs=1M", "count=1024", "status=none"], check=True)

    def make(config):
        if config.startswith("cm-"):
            return CrossmirrorSetup(scratch, config, binary, secret)
        return QemuSetup(scratch, config, volume)

    for config in [c for c in CONFIGS if c.endswith("-sync")]:
        setup = make(config)
        try:
            setup.start()
            prove_synchronous(setup, config)
        finally:
            setup.stop()
    results = {}
    for round_number in range(ROUNDS):
        order = CONFIGS[round_number % len(CONFIGS):] + CONFIGS[:round_number % len(CONFIGS)]
        for config in order:
            setup = make(config)
            try:
                setup.start()
                for workload in WORKLOADS:
                    iops, _ = mirror.fio_uri(setup.uri, workload)
                    results.setdefault((config, workload), []).append(iops)
                    log(f"round {round_number + 1} {config} {workload}: {iops:.0f} IOPS")
            finally:
                setup.stop()
    report = render(results, commit)
    print(report)
    if OUT:
        with open(OUT, "w") as f:
            f.write(report)


def render(results, commit):
    median = {key: statistics.median(values) for key, values in results.items()}
    lines = [
        f"## {time.strftime('%Y-%m-%d')} — crossmirror sync mirror vs QEMU write-blocking mirror (commit {commit})",
        "",
        f"- command: `ROUNDS={ROUNDS} RUNTIME={RUNTIME} CONFIGS='{' '.join(CONFIGS)}' "
        f"WORKLOADS='{' '.join(WORKLOADS)}' /usr/bin/python3 benches/qemu-mirror.py`",
        f"- medians of {ROUNDS} interleaved rounds; fio ioengine=nbd, numjobs=2; 1 GiB volume; copies on 127.0.0.2",
        "- both sync configurations proven synchronous before measuring (acknowledged write in the copy's file; "
        "a write issued while the copy is SIGSTOPped waits)",
        "- QEMU promises less: no flush reaches its target, its dirty bitmap is in memory only (a crash means a full "
        "resync), no timeout on a hung target, no authentication",
        "",
        "| workload | " + " | ".join(CONFIGS) + " | cm-sync/cm-none | qemu-sync/qemu-none | cm-sync/qemu-sync |",
        "|---|" + "---:|" * (len(CONFIGS) + 3),
    ]
    ratios = []
    for workload in WORKLOADS:
        row = [workload] + [f"{median.get((c, workload), 0):.0f}" for c in CONFIGS]

        def ratio(a, b):
            x, y = median.get((a, workload)), median.get((b, workload))
            return x / y if x and y else None

        for a, b in (("cm-sync", "cm-none"), ("qemu-sync", "qemu-none"), ("cm-sync", "qemu-sync")):
            value = ratio(a, b)
            row.append(f"{value:.2f}" if value else "-")
        head_to_head = ratio("cm-sync", "qemu-sync")
        if head_to_head:
            ratios.append(head_to_head)
        lines.append("| " + " | ".join(row) + " |")
    if ratios:
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines += ["", f"crossmirror sync / QEMU write-blocking mirror, geometric mean over the workloads: "
                      f"**{geomean:.2f}**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
