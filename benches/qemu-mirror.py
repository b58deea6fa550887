#!/usr/bin/python3
"""benches/qemu-mirror.py: crossmirror's synchronous mirroring next to QEMU's,
the userspace peer a user would pick instead, and the QD1 latency floor
(issue 12).

Four configurations, interleaved over rounds (the order rotates each round),
same fio workloads (ioengine=nbd):

- cm-none:   `crossmirror serve` (buffered volume), no copy;
- cm-sync:   the same with one sync copy host on 127.0.0.2 (`--direct`);
- qemu-none: `qemu-storage-daemon` exporting the same volume file over NBD
             (file node cache.direct=off, aio=io_uring: buffered, like serve);
- qemu-sync: the same daemon with `blockdev-mirror sync=full
             copy-mode=write-blocking` to an NBD target (a second
             qemu-storage-daemon on 127.0.0.2 writing its file with
             cache.direct=on, aio=io_uring: O_DIRECT like `--direct`), the
             mirror's filter node exported once the job is ready (an export of
             the source node itself would bypass it).

Workloads: 4k randwrite QD32 and 1M seqwrite QD8 (numjobs=2, each job on its
own 512 MiB half of the 1 GiB volume; IOPS), 4k randwrite QD1 (numjobs=1 over
the whole volume; p50 of fio's total latency, lat_percentiles=1), and the same
QD1 in the first 16 MiB only, where crossmirror's 64 bitmap regions stay
marked (over the whole volume most QD1 writes find their region's bit cleared
since its last write, and wait for a bitmap msync).

Each round also measures the terms of the QD1 floor: a raw O_DIRECT 4k write
(fio psync direct=1 on a written file on the same filesystem as the volumes),
a loopback TCP round trip (4 KiB from 127.0.0.1 to a process on 127.0.0.2 and
a 16-byte answer back: a replicated write and its ack; Python on both ends),
and cm-none's QD1 p50 (local NBD). Target for cm-sync QD1 p50 = local NBD p50
+ RTT p50 + raw O_DIRECT write p50 (issue 12), each a median over the rounds.

In every round, before measuring, the script proves both mirrors really
synchronous, and fails loudly otherwise: (a) a write acknowledged through NBD
is already in the copy's file (read directly after the answer), (b) a write
issued while the copy's process is SIGSTOPped is not answered within 2 s, and
is once the copy is SIGCONTed. Once per run it also counts the fsyncs the copy
process submits (syscalls and io_uring ops, `perf stat`) while a client sends
flushes through the export: what each system does with a FLUSH.

QEMU's promises are weaker, which the report says: its mirror filter forwards
a FLUSH to the source only (block/mirror.c bdrv_mirror_top_flush), so a
flushed write may still sit in the target's volatile disk cache; its dirty
bitmap lives in memory (a source crash means a full resync); a hung target
blocks writes with no timeout; a failed target write fails the job, not the
client's write; the NBD link here has no authentication (QEMU can add TLS).

Usage:
    /usr/bin/python3 benches/qemu-mirror.py                         # ~15 min
    ROUNDS=1 RUNTIME=3 /usr/bin/python3 benches/qemu-mirror.py      # quick check

The page cache of the volume: with CACHE=warm (the default, as before) it is whatever the 1 GiB
fill by dd and the earlier workloads left, on this kernel (6.18) large folios, and each 4 KiB
buffered write into a large folio walks all its buffer heads in ext4_block_write_begin (a third
of all CPU under 4k QD32, on both systems' unmirrored and mirrored rows alike). With CACHE=cold
each workload starts with the volume written back and dropped from the page cache
(fdatasync + POSIX_FADV_DONTNEED), so 4k writes find small folios: each workload starts from the
same state, whatever ran before it.

Environment: ROUNDS [3], RUNTIME [8] s per fio run, CONFIGS [all four], CACHE [warm],
WORKLOADS ["4k-randwrite-qd32 1M-seqwrite-qd8 4k-randwrite-qd1
4k-randwrite-qd1-16M"], CM_BIN
[$CARGO_TARGET_DIR or target, /release/crossmirror; built unless given],
SCRATCH [/var/tmp], OUT [also write the report here]. Needs fio, qemu-utils,
python3-libnbd and perf (the flush count; skipped with a note without it).
"""

import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror  # noqa: E402  (the crossmirror side: Setup, fio_uri, free_port, wait_listening, ...)

REPO = mirror.REPO
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "8"))
CONFIGS = os.environ.get("CONFIGS", "cm-none cm-sync qemu-none qemu-sync").split()
WORKLOADS = os.environ.get(
    "WORKLOADS", "4k-randwrite-qd32 1M-seqwrite-qd8 4k-randwrite-qd1 4k-randwrite-qd1-16M").split()
OUT = os.environ.get("OUT", "")
COLD = os.environ.get("CACHE", "warm") == "cold"
SIZE = 1 << 30
QD1 = "4k-randwrite-qd1"
# QD1 workloads and the area they write: the whole volume (issue 12's row), and a 16 MiB area
# whose 64 bitmap regions stay marked (a write to a marked region costs crossmirror no bitmap msync).
QD1_AREAS = {QD1: "1G", "4k-randwrite-qd1-16M": "16M"}
# The two throughput workloads whose cm-sync/qemu-sync ratios make the geometric mean (issue 12).
GEOMEAN_WORKLOADS = ("4k-randwrite-qd32", "1M-seqwrite-qd8")
mirror.RUNTIME = RUNTIME


def log(message):
    print(f"[qemu-mirror {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


class Qmp:
    """A minimal QMP client over a unix socket: commands in, answers and events out."""

    def __init__(self, path, process, timeout=20):
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited with {process.returncode} before its QMP socket")
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
                if event.get("event") == "BLOCK_JOB_COMPLETED":
                    raise RuntimeError(f"the mirror job ended while waiting for {name}: {event}")
            self.events.append(self.read())
        raise RuntimeError(f"no QMP event {name} within {timeout} s")

    def close(self):
        self.file.close()
        self.sock.close()


class QemuSetup:
    """qemu-storage-daemon serving the volume, with or without a
    write-blocking mirror to a target daemon on 127.0.0.2."""

    def __init__(self, scratch, config, volume):
        self.scratch, self.config, self.volume = scratch, config, volume
        self.processes = []
        self.logs = []
        self.qmp = None
        self.target = None
        self.copy = os.path.join(scratch, "qemu-copy.img")

    def spawn(self, args, label):
        log_file = open(os.path.join(self.scratch, f"{label}.log"), "ab")
        self.logs.append(log_file)
        process = subprocess.Popen(args, stdout=log_file, stderr=log_file)
        self.processes.append(process)
        return process

    def start(self):
        self.port = mirror.free_port("127.0.0.1")
        self.uri = f"nbd://127.0.0.1:{self.port}/vol"
        qmp_path = os.path.join(self.scratch, f"{self.config}.qmp")
        if os.path.exists(qmp_path):
            os.remove(qmp_path)
        # Source: buffered (cache.direct=off), like `crossmirror serve`'s volume.
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=src-file,filename={self.volume},aio=io_uring",
                "--blockdev", "driver=raw,node-name=src,file=src-file"]
        if self.config == "qemu-sync":
            if not os.path.exists(self.copy):
                with open(self.copy, "wb") as f:
                    f.truncate(SIZE)
            target_port = mirror.free_port("127.0.0.2")
            # Target: O_DIRECT (cache.direct=on), like the copy host's --direct.
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
        self.qmp = Qmp(qmp_path, self.source)
        exported = "src"
        if self.config == "qemu-sync":
            self.qmp.command("blockdev-mirror", **{"job-id": "mirror", "device": "src", "target": "target",
                                                   "sync": "full", "copy-mode": "write-blocking",
                                                   "filter-node-name": "mirror-top"})
            self.qmp.wait_event("BLOCK_JOB_READY")
            exported = "mirror-top"
        self.qmp.command("nbd-server-start",
                         addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(self.port)}})
        self.qmp.command("block-export-add", type="nbd", id="vol", **{"node-name": exported}, name="vol",
                         writable=True)
        mirror.wait_listening("127.0.0.1", self.port, self.source)

    def copy_process(self):
        return self.target

    def settle(self):
        """After the proof: the mirror job still runs, ready and in write-blocking mode."""
        jobs = self.qmp.command("query-block-jobs")
        if len(jobs) != 1 or not jobs[0].get("ready") or jobs[0].get("status") != "ready":
            raise RuntimeError(f"the QEMU mirror job is not ready after the proof: {jobs}")

    def stop(self):
        resume(self.target)
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        mirror.stop_processes(self.processes)
        self.processes = []
        for log_file in self.logs:
            log_file.close()
        self.logs = []


class CrossmirrorSetup:
    """crossmirror serve, alone (cm-none) or with one sync --direct copy host (cm-sync)."""

    def __init__(self, scratch, config, binary, secret):
        mirror.COPIES["cm-none"] = []
        mirror.COPIES["cm-sync"] = [("east", "127.0.0.2", ",direct")]
        self.setup = mirror.Setup(scratch, config, binary, secret)
        self.config = config
        self.copy = os.path.join(scratch, "cm-sync-east.img")

    def start(self):
        self.setup.start()
        self.uri = f"nbd://127.0.0.1:{self.setup.port}"

    def copy_process(self):
        return self.setup.processes[0] if self.config == "cm-sync" and self.setup.processes else None

    def settle(self):
        """After the proof (the copy was stopped 2 s): measure only once the copy is up to date again."""
        mirror.wait_up_to_date(self.setup.admin, timeout=120)

    def stop(self):
        resume(self.copy_process())
        self.setup.stop()


def resume(process):
    """SIGCONT a copy process a failed proof may have left stopped, so it can take its SIGTERM."""
    if process is not None and process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


PROOF = r"""
import nbd, os, sys, time, signal
uri, copy, pid, offset = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
data = os.urandom(4096)
h.pwrite(data, offset)
with open(copy, "rb") as f:
    f.seek(offset)
    assert f.read(4096) == data, "(a) an acknowledged write is not in the copy's file"
os.kill(pid, signal.SIGSTOP)
try:
    later = os.urandom(4096)
    cookie = h.aio_pwrite(later, offset + 4096)
    deadline = time.time() + 2
    while time.time() < deadline:
        h.poll(100)
        assert not h.aio_command_completed(cookie), "(b) a write completed while the copy was stopped"
finally:
    os.kill(pid, signal.SIGCONT)
deadline = time.time() + 30
while not h.aio_command_completed(cookie):
    assert time.time() < deadline, "(b) the write stayed unanswered 30 s after the copy resumed"
    h.poll(100)
with open(copy, "rb") as f:
    f.seek(offset + 4096)
    assert f.read(4096) == later, "(b) the write answered after the copy resumed is not in its file"
h.shutdown()
print("synchronous")
"""


def prove_synchronous(setup, label, offset):
    """(a) an acknowledged write is in the copy's file; (b) a write issued while the copy is stopped waits."""
    try:
        result = subprocess.run(["/usr/bin/python3", "-c", PROOF, setup.uri, setup.copy,
                                 str(setup.copy_process().pid), str(offset)], capture_output=True, text=True,
                                timeout=90)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"PROOF FAILED: {label}: the proof hung: {e}") from e
    finally:
        resume(setup.copy_process())
    if result.returncode != 0 or "synchronous" not in result.stdout:
        raise RuntimeError(f"PROOF FAILED: {label} is not synchronous: {result.stdout}{result.stderr}")
    setup.settle()
    log(f"{label}: proven synchronous (acknowledged write in the copy's file; a write waits while the copy "
        "is stopped, completes once it runs)")


FLUSHES = r"""
import nbd, os, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(os.urandom(4096), (800 << 20) + i * 4096)
    h.flush()
h.shutdown()
"""


def count_flushes(setup, label, count=50):
    """What a FLUSH through the export does on the copy: the fsyncs the copy's process submits (fsync and
    fdatasync syscalls, IORING_OP_FSYNC io_uring requests) while a client sends `count` write+flush
    pairs. Informational: a count, not a pass/fail (a copy may also fsync on its own)."""
    if not shutil.which("perf"):
        return None
    pid = setup.copy_process().pid
    events = ["-e", "syscalls:sys_enter_fsync", "-e", "syscalls:sys_enter_fdatasync",
              "-e", "io_uring:io_uring_submit_req", "--filter", "opcode == 3"]
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "--per-thread", "-p", str(pid)] + events,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        subprocess.run(["/usr/bin/python3", "-c", FLUSHES, setup.uri, str(count)], check=True, timeout=120)
        time.sleep(0.5)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=30)
    total = 0
    seen = False
    for line in err.splitlines():
        fields = line.split(",")
        # --per-thread lines: thread,count,unit,event,...
        for i, field in enumerate(fields):
            if field.strip() in ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync",
                                 "io_uring:io_uring_submit_req"):
                seen = True
                value = fields[i - 2] if i >= 2 else ""
                if value.strip().isdigit():
                    total += int(value)
    if not seen:
        log(f"{label}: perf stat gave no counts: {err.strip()[:300]}")
        return None
    log(f"{label}: {count} flushes through the export, {total} fsyncs submitted by the copy's process")
    return total


RTT_SERVER = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.2", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
view = memoryview(bytearray(4096))
ack = b"a" * 16
while True:
    n = 0
    while n < 4096:
        r = c.recv_into(view[n:])
        if r == 0:
            sys.exit(0)
        n += r
    c.sendall(ack)
"""


def loopback_rtt_us(samples=20000, warmup=2000):
    """p50 of a 4 KiB message from 127.0.0.1 to a process on 127.0.0.2 and its 16-byte answer (a replicated
    write and its ack), TCP_NODELAY, both ends in Python (their overhead is in the number)."""
    server = subprocess.Popen(["/usr/bin/python3", "-c", RTT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.connect(("127.0.0.2", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = os.urandom(4096)
        ack = memoryview(bytearray(16))
        times = []
        clock = time.perf_counter_ns
        for i in range(samples + warmup):
            started = clock()
            sock.sendall(payload)
            n = 0
            while n < 16:
                r = sock.recv_into(ack[n:])
                if r == 0:
                    raise RuntimeError("the RTT server closed")
                n += r
            if i >= warmup:
                times.append(clock() - started)
        sock.close()
        return statistics.median(times) / 1000
    finally:
        server.kill()
        server.wait()


def fio_json(args):
    output = subprocess.run(["fio"] + args + ["--output-format=json"], capture_output=True, text=True,
                            check=True).stdout
    return json.loads(output[output.find("{"):])["jobs"][0]["write"]


def p50_us(side):
    return side["lat_ns"]["percentile"]["50.000000"] / 1000


def p99_us(side):
    return side["lat_ns"]["percentile"]["99.000000"] / 1000


def fio_qd1(uri, area):
    """fio 4k randwrite QD1 through NBD, one job over the first `area` of the volume: (IOPS, p50 and p99
    of the total latency in µs)."""
    side = fio_json(["--name=qd1", "--ioengine=nbd", f"--uri={uri}", "--numjobs=1", f"--size={area}",
                     "--rw=randwrite", "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={RUNTIME}",
                     "--ramp_time=1", "--lat_percentiles=1"])
    return side["iops"], p50_us(side), p99_us(side)


def raw_direct_write_us(path):
    """p50 of a 4k O_DIRECT pwrite (fio psync, QD1) on an already written file on the volumes' filesystem."""
    side = fio_json(["--name=raw", "--ioengine=psync", "--direct=1", f"--filename={path}", "--size=256M",
                     "--rw=randwrite", "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={RUNTIME}",
                     "--ramp_time=1", "--lat_percentiles=1"])
    return p50_us(side)


def cm_binary():
    binary = os.environ.get("CM_BIN")
    if binary:
        return binary
    subprocess.run(["cargo", "build", "--release", "-p", "crossmirror"], cwd=REPO, check=True)
    return os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "crossmirror")


def main():
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: every setup's finally stops its daemons.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    binary = cm_binary()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    scratch = tempfile.mkdtemp(prefix="crossmirror-qemu-bench-", dir=mirror.SCRATCH_PARENT)
    try:
        measure(scratch, binary, commit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(scratch, binary, commit):
    started = time.time()
    load = {"start": loadavg(), "rounds": []}
    secret = mirror.write_secret(scratch)
    volume = os.path.join(scratch, "production.img")
    log("filling the 1 GiB volume from /dev/urandom")
    subprocess.run(["dd", "if=/dev/urandom", f"of={volume}", "bs=1M", "count=1024", "status=none"], check=True)
    raw = os.path.join(scratch, "raw.img")
    subprocess.run(["dd", "if=/dev/zero", f"of={raw}", "bs=1M", "count=256", "conv=fsync", "status=none"],
                   check=True)

    def make(config):
        if config.startswith("cm-"):
            return CrossmirrorSetup(scratch, config, binary, secret)
        return QemuSetup(scratch, config, volume)

    results = {}
    tails = {}
    floor = {"raw": [], "rtt": []}
    flushes = {}
    proofs = {}
    for round_number in range(ROUNDS):
        load["rounds"].append(loadavg())
        order = CONFIGS[round_number % len(CONFIGS):] + CONFIGS[:round_number % len(CONFIGS)]
        for config in order:
            setup = make(config)
            log(f"round {round_number + 1} {config}: starting")
            try:
                setup.start()
                if config.endswith("-sync"):
                    prove_synchronous(setup, config, (900 << 20) + round_number * 8192)
                    proofs[config] = proofs.get(config, 0) + 1
                    if round_number == 0:
                        flushes[config] = count_flushes(setup, config)
                        setup.settle()
                for workload in WORKLOADS:
                    if COLD:
                        mirror.drop_cached(volume)
                    if workload in QD1_AREAS:
                        iops, p50, p99 = fio_qd1(setup.uri, QD1_AREAS[workload])
                        results.setdefault((config, workload), []).append(p50)
                        tails.setdefault((config, workload), []).append((iops, p99))
                        log(f"round {round_number + 1} {config} {workload}: {iops:.0f} IOPS, p50 {p50:.1f} µs, "
                            f"p99 {p99:.1f} µs")
                    else:
                        iops, _ = mirror.fio_uri(setup.uri, workload)
                        results.setdefault((config, workload), []).append(iops)
                        log(f"round {round_number + 1} {config} {workload}: {iops:.0f} IOPS")
            finally:
                setup.stop()
        floor["raw"].append(raw_direct_write_us(raw))
        floor["rtt"].append(loopback_rtt_us())
        log(f"round {round_number + 1} floor terms: raw O_DIRECT 4k write p50 {floor['raw'][-1]:.1f} µs, "
            f"loopback 4 KiB RTT p50 {floor['rtt'][-1]:.1f} µs")
    load["end"] = loadavg()
    report = render(results, tails, floor, flushes, proofs, load, commit, binary, time.time() - started)
    print(report)
    if OUT:
        with open(OUT, "w") as f:
            f.write(report)


def render(results, tails, floor, flushes, proofs, load, commit, binary, elapsed):
    median = {key: statistics.median(values) for key, values in results.items()}
    throughput = [w for w in WORKLOADS if w not in QD1_AREAS]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — crossmirror sync mirror vs QEMU write-blocking "
        f"mirror, and the QD1 floor (commit {commit})",
        "",
        f"- command: `CM_BIN={binary} CACHE={'cold' if COLD else 'warm'} ROUNDS={ROUNDS} RUNTIME={RUNTIME} "
        f"CONFIGS='{' '.join(CONFIGS)}' "
        f"WORKLOADS='{' '.join(WORKLOADS)}' /usr/bin/python3 benches/qemu-mirror.py` ({elapsed / 60:.0f} min)",
        f"- machine: {os.cpu_count()} CPUs, shared; /proc/loadavg (1/5/15 min) at start {' '.join(load['start'])}, "
        f"at each round's start {'; '.join(' '.join(r) for r in load['rounds'])}, at end {' '.join(load['end'])}",
        f"- medians of {ROUNDS} interleaved rounds (order rotated each round); fio ioengine=nbd; 1 GiB volume "
        "(buffered on both sides); copies on 127.0.0.2 written with O_DIRECT (crossmirror `--direct`, QEMU "
        "target `cache.direct=on`), both aio io_uring; the volume's page cache "
        + ("written back and dropped before each workload (CACHE=cold)" if COLD else
           "as the dd fill and the earlier workloads left it (CACHE=warm)"),
        "- proof, in every round before measuring: " + ", ".join(f"{c} proven synchronous {n}×" for c, n in
                                                                  sorted(proofs.items())) +
        " ((a) an acknowledged write is in the copy's file; (b) a write issued while the copy's process is "
        "SIGSTOPped is not answered within 2 s, and is after SIGCONT)",
    ]
    if flushes:
        lines.append("- FLUSH check (`perf stat` on the copy's process: fsync/fdatasync syscalls + IORING_OP_FSYNC, "
                     "while 50 × (4k write + FLUSH) go through the export): " +
                     "; ".join(f"{c}: {'n/a' if n is None else n} fsyncs" for c, n in sorted(flushes.items())))
    lines += [
        "",
        "| workload (IOPS) | " + " | ".join(CONFIGS) + " | cm-sync/cm-none | qemu-sync/qemu-none | cm-sync/qemu-sync |",
        "|---|" + "---:|" * (len(CONFIGS) + 3),
    ]

    def ratio(a, b, workload):
        x, y = median.get((a, workload)), median.get((b, workload))
        return x / y if x and y else None

    def cell(value, digits=2):
        return f"{value:.{digits}f}" if value else "-"

    head_to_head = []
    for workload in throughput:
        row = [workload] + [cell(median.get((c, workload)), 0) for c in CONFIGS]
        row += [cell(ratio(a, b, workload)) for a, b in
                (("cm-sync", "cm-none"), ("qemu-sync", "qemu-none"), ("cm-sync", "qemu-sync"))]
        if workload in GEOMEAN_WORKLOADS and ratio("cm-sync", "qemu-sync", workload):
            head_to_head.append(ratio("cm-sync", "qemu-sync", workload))
        lines.append("| " + " | ".join(row) + " |")
    for workload in [w for w in WORKLOADS if w in QD1_AREAS]:
        row = [f"{workload}: p50 µs (lower is better)"] + [cell(median.get((c, workload)), 1) for c in CONFIGS]
        row += [cell(ratio(a, b, workload)) for a, b in
                (("cm-sync", "cm-none"), ("qemu-sync", "qemu-none"), ("cm-sync", "qemu-sync"))]
        lines.append("| " + " | ".join(row) + " |")
    if len(head_to_head) == len(GEOMEAN_WORKLOADS):
        geomean = math.exp(sum(math.log(r) for r in head_to_head) / len(head_to_head))
        lines += ["", f"crossmirror sync / QEMU write-blocking mirror, geometric mean of the "
                      f"{' and '.join(GEOMEAN_WORKLOADS)} IOPS ratios: **{geomean:.2f}** (issue 12 target: ≥ 2.0)"]
    if tails:
        lines += ["", "QD1 beyond the p50 (medians over the rounds; IOPS at QD1 = 1 / mean latency):", "",
                  "| workload | " + " | ".join(f"{c} p99 µs | {c} IOPS" for c in CONFIGS) + " |",
                  "|---|" + "---:|" * (2 * len(CONFIGS))]
        for workload in [w for w in WORKLOADS if w in QD1_AREAS]:
            row = [workload]
            for c in CONFIGS:
                values = tails.get((c, workload), [])
                row += [cell(statistics.median(v[1] for v in values), 1) if values else "-",
                        cell(statistics.median(v[0] for v in values), 0) if values else "-"]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per round (in round order; IOPS, p50 µs for the QD1 rows):", ""]
    for (config, workload), values in sorted(results.items()):
        digits = 1 if workload in QD1_AREAS else 0
        lines.append(f"- {config} {workload}: {' / '.join(f'{v:.{digits}f}' for v in values)}")
    raw, rtt = statistics.median(floor["raw"]), statistics.median(floor["rtt"])
    lines += [f"- raw O_DIRECT 4k write p50 µs: {' / '.join(f'{v:.1f}' for v in floor['raw'])}",
              f"- loopback 4 KiB + 16 B round trip p50 µs: {' / '.join(f'{v:.1f}' for v in floor['rtt'])}"]
    local, synced = median.get(("cm-none", QD1)), median.get(("cm-sync", QD1))
    if local and synced:
        target = local + rtt + raw
        lines += [
            "",
            "QD1 floor (issue 12), medians over the rounds, all measured in this run:",
            "",
            "| term | p50 µs |",
            "|---|---:|",
            f"| local NBD (cm-none, 4k randwrite QD1) | {local:.1f} |",
            f"| loopback TCP round trip, 4 KiB out, 16 B back (Python both ends) | {rtt:.1f} |",
            f"| raw O_DIRECT 4k write (fio psync direct=1, same filesystem) | {raw:.1f} |",
            f"| **target** = sum | **{target:.1f}** |",
            f"| **measured**: cm-sync 4k randwrite QD1 | **{synced:.1f}** ({synced / target:.2f} of the target; "
            f"{'met' if synced <= target else 'not met'}) |",
        ]
        qemu = median.get(("qemu-sync", QD1))
        if qemu:
            lines.append(f"| qemu-sync 4k randwrite QD1, for comparison | {qemu:.1f} |")
        hot_local, hot_synced = median.get(("cm-none", "4k-randwrite-qd1-16M")), median.get(
            ("cm-sync", "4k-randwrite-qd1-16M"))
        if hot_local and hot_synced:
            hot_target = hot_local + rtt + raw
            lines.append(f"| the same in a 16 MiB area (bitmap regions stay marked): target {hot_target:.1f}, "
                         f"cm-sync | {hot_synced:.1f} ({hot_synced / hot_target:.2f} of its target) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
