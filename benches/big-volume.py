#!/usr/bin/python3
"""benches/big-volume.py: what write-intent tracking costs on a 1 TiB volume.

fio (ioengine=nbd, 4k randwrite, iodepth=32, numjobs=2, each job over its
own half of the volume) through `crossmirror serve` on a sparse 1 TiB volume:
no copy, one sync copy host with --direct, one async copy; interleaved
rounds, medians and ratios printed as Markdown. Nearly every write lands in
a bitmap region (and an activity-log extent) not touched before, the worst
case for write-intent tracking.

After each run with a copy, the time until the copy is up to date with
every bit cleared is printed, with the bytes of the last resync pass when
the copy had fallen behind its lag bound (it is resynced then, in the parts
of its regions that the writes it missed touched).

Then the crash case: a sync copy, the same fio load, production SIGKILLed
mid-load, restarted; the resync it runs is compared with what was written
since the last quiet point (copy up to date, no dirty bits) and with the
activity log's bound (a crash leaves at most the log's extents plus the
bitmap bits written so far to resync).

Usage:
    /usr/bin/python3 benches/big-volume.py
    ROUNDS=1 RUNTIME=5 /usr/bin/python3 benches/big-volume.py   # quick check

Environment: ROUNDS [3], RUNTIME [20] seconds per fio run, CONFIGS ["none
sync1d async1"; "tracked": a copy brought up to date whose host is then
killed, so every write is tracked and none shipped: the cost of
write-intent tracking alone], SIZE [1T], SERVE_ARGS [extra serve options, e.g.
"--activity-log 0"], COPY_OPTIONS [appended to every copy's --mirror, e.g.
",lag_bytes_max=8M" for an async copy that falls behind sooner],
CATCH_UP_MAX [1200: seconds to wait for a copy to be up to date after a
run; past it the run is reported not caught up and the next one starts], CRASH [1: run the crash case], CM_BIN
[target/release/crossmirror], SCRATCH [/var/tmp], OUT [also write the
report here], STORE [file]. Every volume is a sparse file; the script
removes them. SERVE_ARGS='--activity-log 1T' measures a log that covers the
whole volume (1,024 extents of 1 GiB): tracking then costs one transaction
per extent first touched, and a crash resyncs every extent written since the
start (CRASH=1 would then resync up to the whole 1 TiB: run it with CRASH=0).

STORE=file puts the volumes (production's and the copies') on SCRATCH, the
disk: O_DIRECT writes into a sparse 1 TiB file allocate blocks all over it,
and ext4's allocation bounds a `--direct` copy there (fio alone, 4k random
O_DIRECT QD32 on such a file: about 12k IOPS on this machine, against about
100k on written blocks). STORE=tmpfs puts the volumes on a tmpfs the script
mounts (a store with no allocation cost, as a logical volume or a raw disk
is) and keeps every metadata file (bitmap, activity log, records) on the
disk with --metadata-dir, so write-intent tracking pays its real flushes;
each round starts on new stores, so memory holds only one round's writes.
METADATA=tmpfs (with STORE=tmpfs) puts the metadata on the tmpfs too: a
durable metadata write then costs no device round trip and no sleep, as on
an NVRAM or power-loss-protected device (on the tmpfs a power cut would lose
it: this is a measurement of that case, not a way to run).
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
mirror = __import__("mirror")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "20"))
CONFIGS = os.environ.get("CONFIGS", "none sync1d async1").split()
SIZE = os.environ.get("SIZE", "1T")
SERVE_ARGS = os.environ.get("SERVE_ARGS", "").split()
COPY_OPTIONS = os.environ.get("COPY_OPTIONS", "")
CATCH_UP_MAX = float(os.environ.get("CATCH_UP_MAX", "1200"))
CRASH = os.environ.get("CRASH", "1") == "1"
SCRATCH_PARENT = os.environ.get("SCRATCH", "/var/tmp")
STORE = os.environ.get("STORE", "file")
if STORE not in ("file", "tmpfs"):
    sys.exit(f"STORE={STORE}: use file or tmpfs")
METADATA = os.environ.get("METADATA", "disk")
if METADATA not in ("disk", "tmpfs"):
    sys.exit(f"METADATA={METADATA}: use disk or tmpfs")
if METADATA == "tmpfs" and STORE != "tmpfs":
    sys.exit("METADATA=tmpfs needs STORE=tmpfs")
HOSTS = os.environ.get("HOSTS", "shared")
if HOSTS not in ("shared", "split"):
    sys.exit(f"HOSTS={HOSTS}: use shared or split")
# HOSTS=split stands in for separate hosts on this 2-core machine: production
# and fio (the production host and its application) run on CPU 0, every copy
# host on CPU 1, in every configuration (the unmirrored run too, so each ratio
# compares one production core with one production core).
PRODUCTION_CPU = ["taskset", "-c", "0"] if HOSTS == "split" else []
COPY_CPU = ["taskset", "-c", "1"] if HOSTS == "split" else []
COPIES = {
    "none": [],
    "sync1": [("east", "127.0.0.2", "")],
    "sync1d": [("east", "127.0.0.2", ",direct")],
    "async1": [("dr", "127.0.0.2", ",mode=async")],
    "async1d": [("dr", "127.0.0.2", ",mode=async,direct")],
    # A copy that was up to date and whose host is then killed: every write
    # is tracked (bitmap and activity log), nothing is shipped, so this is
    # write-intent tracking alone (each round starts on new stores).
    "tracked": [("east", "127.0.0.2", ",direct")],
}
log = mirror.log


def size_bytes(text):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    return int(text[:-1]) << units[text[-1]] if text[-1] in units else int(text)


class Setup:
    """A production host on its own sparse volume and its copies; stores
    persist across rounds (the first start of a copy is skipped with
    --assume-clean: both stores are empty sparse files)."""

    def __init__(self, scratch, config, binary, secret, data=None):
        self.scratch, self.config, self.binary, self.secret = scratch, config, binary, secret
        # Volumes on `data` (a tmpfs), metadata on the scratch disk (or, with
        # METADATA=tmpfs, on the tmpfs too); or both on scratch.
        self.data = data or scratch
        metadata_dir = scratch
        if data and METADATA == "tmpfs":
            metadata_dir = os.path.join(data, "metadata")
            os.makedirs(metadata_dir, exist_ok=True)
        self.metadata_dir = metadata_dir
        self.metadata = ["--metadata-dir", metadata_dir] if data else []
        self.processes = []
        self.volume = os.path.join(self.data, f"{config}-production.img")

    def start(self, wait=True):
        mirrors = []
        self.mirror_args = []
        for name, ip, options in COPIES[self.config]:
            port = mirror.free_port(ip)
            store = os.path.join(self.data, f"{self.config}-{name}.img")
            args = COPY_CPU + [self.binary, "copy-host", "--volume", store, "--size", SIZE, "--listen", f"{ip}:{port}",
                    "--secret-file", self.secret] + self.metadata
            if ",direct" in options:
                args.append("--direct")
                options = options.replace(",direct", "")
            process = self.spawn(args, f"{self.config}-{name}")
            mirror.wait_listening(ip, port, process)
            mirrors += ["--mirror", f"{name}={ip}:{port}{options}{COPY_OPTIONS}"]
        self.mirror_args = mirrors
        self.port = mirror.free_port("127.0.0.1")
        self.admin = f"127.0.0.1:{mirror.free_port('127.0.0.1')}"
        args = PRODUCTION_CPU + [self.binary, "serve", "--volume", self.volume, "--size", SIZE, "--listen", f"127.0.0.1:{self.port}"]
        args += self.metadata
        if mirrors:
            args += mirrors + ["--secret-file", self.secret, "--admin", self.admin, "--assume-clean"] + SERVE_ARGS
        self.production = self.spawn(args, f"{self.config}-production")
        mirror.wait_listening("127.0.0.1", self.port, self.production, timeout=120)
        if mirrors and wait:
            mirror.wait_up_to_date(self.admin)
        if self.config == "tracked":
            copy_host = self.processes[0]
            copy_host.send_signal(signal.SIGKILL)
            copy_host.wait()
            deadline = time.time() + 30
            while mirror.status(self.admin)["copies"][0]["state"] == "up_to_date" and time.time() < deadline:
                time.sleep(0.1)

    def spawn(self, args, label):
        return mirror.spawn_logged(self.scratch, self.processes, args, label)

    def stop(self):
        mirror.stop_processes(self.processes)
        self.processes = []


def fio_args(port, runtime):
    half = size_bytes(SIZE) // 2
    return PRODUCTION_CPU + ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}", "--numjobs=2",
            f"--size={half}", f"--offset_increment={half}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
            "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--group_reporting", "--output-format=json"]


def fio(port):
    output = subprocess.run(fio_args(port, RUNTIME), capture_output=True, text=True, check=True).stdout
    report = json.loads(output[output.find("{"):])
    return report["jobs"][0]["write"]["iops"]


def crash_case(scratch, binary, secret, data):
    """SIGKILL production under the load, restart it, and measure the resync."""
    setup = Setup(scratch, "crash", binary, secret, data)
    COPIES["crash"] = [("east", "127.0.0.2", ",direct")]
    try:
        setup.start()
        quiet = mirror.status(setup.admin)["copies"][0]
        assert quiet["dirty_bytes"] == 0, quiet
        load = subprocess.Popen(fio_args(setup.port, 60)[:-1] + ["--output-format=json"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(12)
        before = mirror.status(setup.admin)["copies"][0]
        setup.production.send_signal(signal.SIGKILL)
        setup.production.wait()
        output, _ = load.communicate(timeout=120)
        # fio's byte count of the writes it issued (answered or not) is an
        # upper bound for what reached the volume; its log has the count.
        written = None
        try:
            report = json.loads(output[output.find("{"):])
            written = report["jobs"][0]["write"]["io_bytes"]
        except (ValueError, KeyError, IndexError):
            pass
        log(f"crash: production killed; copy status just before: {before}")
        # Restart production alone (the copy host keeps running).
        copies = setup.processes[:-1]
        setup.processes = copies
        port = mirror.free_port("127.0.0.1")
        setup.port = port
        args = PRODUCTION_CPU + [binary, "serve", "--volume", setup.volume, "--size", SIZE, "--listen", f"127.0.0.1:{port}",
                *setup.metadata, *setup.mirror_args, "--secret-file", secret,
                "--admin", setup.admin] + SERVE_ARGS
        started = time.time()
        setup.production = setup.spawn(args, "crash-production")
        mirror.wait_listening("127.0.0.1", port, setup.production, timeout=300)
        after_open = mirror.status(setup.admin)["copies"][0]
        mirror.wait_up_to_date(setup.admin, timeout=1200)
        done = mirror.status(setup.admin)["copies"][0]
        return {"written": written, "dirty_at_restart": after_open["dirty_bytes"],
                "resync_total": done["resync_bytes_total"], "resync_done": done["resync_bytes_done"],
                "seconds": time.time() - started, "log": al_line(scratch)}
    finally:
        setup.stop()


def wait_caught_up(admin, fell_behind):
    """Wait (at most CATCH_UP_MAX s) until the copy is up to date with every
    bit cleared: (seconds or None, the last pass's bytes or 0, its bytes
    done, whether it fell behind)."""
    started = time.time()
    while True:
        copy = mirror.status(admin)["copies"][0]
        seconds = time.time() - started
        if copy["state"] == "up_to_date" and copy["dirty_bytes"] == 0 and copy["lag_bytes"] == 0:
            return (seconds, copy["resync_bytes_total"] if fell_behind else 0, copy["resync_bytes_done"], fell_behind)
        if seconds > CATCH_UP_MAX:
            return (None, copy["resync_bytes_total"], copy["resync_bytes_done"], fell_behind)
        time.sleep(0.1)


def catch_up_text(catch_up):
    seconds, total, done, fell_behind = catch_up
    if seconds is None:
        return (f"not up to date {CATCH_UP_MAX:.0f} s after the run (a resync pass of {total / 2**20:.0f} MiB, "
                f"{done / 2**20:.0f} MiB of it sent)")
    if fell_behind:
        return f"{seconds:.1f} s (it fell behind: a resync pass of {total / 2**20:.0f} MiB)"
    return f"{seconds:.1f} s"


def al_counts(before, after, iops):
    """What the activity log did between two status documents, per second
    of fio (its ramp second included: fio's rate is taken to hold through
    it). A field an older build lacks counts as zero."""
    seconds = RUNTIME + 1
    keys = ("transactions", "bitmap_syncs", "overlapped", "bitmap_sync_seconds")
    per_second = {key: (after.get(key, 0) - before.get(key, 0)) / seconds for key in keys}
    writes = iops / max(per_second["transactions"], 1e-9)
    return (f"{per_second['transactions']:.0f} transactions/s ({per_second['overlapped']:.0f}/s overlapped), "
            f"{per_second['bitmap_syncs']:.1f} bitmap syncs/s taking {per_second['bitmap_sync_seconds'] * 100:.1f} % "
            f"of the time, about {writes:.1f} writes per transaction")


def al_line(scratch):
    lines = []
    with open(os.path.join(scratch, "crash-production.log")) as f:
        for line in f:
            if "activity log" in line or "after a crash" in line:
                lines.append(line.strip())
    return lines[-3:]


def main():
    binary, commit = mirror.binary_and_commit()
    scratch = tempfile.mkdtemp(prefix="crossmirror-big-", dir=SCRATCH_PARENT)
    data = None
    if STORE == "tmpfs":
        data = os.path.join(scratch, "tmpfs")
        os.mkdir(data)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20g", "tmpfs", data], check=True)
    try:
        secret = mirror.write_secret(scratch)
        results = {}
        catch_ups = {}
        for round_number in range(ROUNDS):
            order = CONFIGS[round_number % len(CONFIGS):] + CONFIGS[:round_number % len(CONFIGS)]
            for config in order:
                setup = Setup(scratch, config, binary, secret, data)
                try:
                    setup.start()
                    before = mirror.status(setup.admin).get("activity_log") if config != "none" else None
                    iops = fio(setup.port)
                    results.setdefault(config, []).append(iops)
                    log(f"round {round_number + 1}: {config}: {iops:.0f} IOPS")
                    if config != "none":
                        status = mirror.status(setup.admin)
                        if before and status.get("activity_log"):
                            log(f"round {round_number + 1}: {config}: activity log over the run: "
                                + al_counts(before, status["activity_log"], iops))
                        copy = status["copies"][0]
                        log(f"round {round_number + 1}: {config}: copy after the run: {copy['state']}, "
                            f"dirty {copy['dirty_bytes']}, lag {copy['lag_bytes']}")
                        if config != "tracked":
                            catch_up = wait_caught_up(setup.admin, copy["state"] != "up_to_date")
                            catch_ups.setdefault(config, []).append(catch_up)
                            log(f"round {round_number + 1}: {config}: {catch_up_text(catch_up)}")
                finally:
                    setup.stop()
                if config == "tracked" or data:
                    # Its copy missed every write (tracked), or the stores are
                    # in memory: start the next round on new stores.
                    for directory in {scratch, setup.data, setup.metadata_dir}:
                        for name in os.listdir(directory):
                            # (metadata of a volume on the tmpfs is named by its escaped path)
                            if name.startswith(f"{config}-") or f"%2F{config}-" in name:
                                os.remove(os.path.join(directory, name))
        crash = crash_case(scratch, binary, secret, data) if CRASH else None
        mirror.emit(render(results, commit, crash, catch_ups))
    finally:
        if data:
            subprocess.run(["umount", data], check=False)
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


STORES_TEXT = ("sparse files on the disk, metadata beside them" if STORE == "file"
               else "sparse files on a tmpfs, metadata on the disk (--metadata-dir)" if METADATA == "disk"
               else "sparse files on a tmpfs, metadata on the tmpfs too (a durable write costs no device round trip, "
                    "as on an NVRAM or power-loss-protected device; a crash loses it here, so this measures only)")


def render(results, commit, crash, catch_ups):
    lines = [
        "# Write-intent tracking on a big volume",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}",
        f"- command: `STORE={STORE} METADATA={METADATA} HOSTS={HOSTS} ROUNDS={ROUNDS} RUNTIME={RUNTIME} SIZE={SIZE} CONFIGS='{' '.join(CONFIGS)}' "
        f"SERVE_ARGS='{' '.join(SERVE_ARGS)}' COPY_OPTIONS='{COPY_OPTIONS}' CATCH_UP_MAX={CATCH_UP_MAX:.0f} "
        "/usr/bin/python3 benches/big-volume.py`",
        f"- fio: ioengine=nbd 4k randwrite iodepth=32 numjobs=2 (each job over half of the {SIZE} sparse volume), "
        f"{RUNTIME} s; medians of {ROUNDS} interleaved rounds; "
        + ("all on this 2-core machine, sharing both cores" if HOSTS == "shared"
           else "production and fio on CPU 0, every copy host on CPU 1 (HOSTS=split: one core per host)"),
        f"- stores: {STORES_TEXT}",
        "",
        "| 4k randwrite QD32 x2 | " + " | ".join(CONFIGS) + " | "
        + " | ".join(f"{c}/none" for c in CONFIGS if c != "none") + " |",
        "|---|" + "---:|" * (2 * len(CONFIGS) - 1),
    ]
    medians = {c: statistics.median(results[c]) for c in CONFIGS}
    row = ["IOPS (median)"] + [f"{medians[c]:.0f}" for c in CONFIGS]
    base = medians.get("none")
    row += [f"{medians[c] / base:.2f}" if base else "-" for c in CONFIGS if c != "none"]
    lines.append("| " + " | ".join(row) + " |")
    lines.append("| all rounds | " + " | ".join(", ".join(f"{v:.0f}" for v in results[c]) for c in CONFIGS)
                 + " |" + " |" * (len(CONFIGS) - 1))
    lines.append("")
    for config, runs in catch_ups.items():
        lines.append(f"- {config}: up to date with every bit cleared, after each run: "
                     + "; ".join(catch_up_text(run) for run in runs))
    if catch_ups:
        lines.append("")
    if crash:
        written = crash["written"]
        lines.append(
            f"Crash under load (sync --direct copy, SIGKILL after 12 s of the load): fio wrote "
            f"{written / 2**20:.0f} MiB since the quiet point; " if written else "Crash under load: fio's count lost; ")
        lines[-1] += (f"dirty at restart {crash['dirty_at_restart'] / 2**20:.0f} MiB, resync moved "
                      f"{crash['resync_done'] / 2**20:.0f} MiB (of {crash['resync_total'] / 2**20:.0f} MiB) "
                      f"in {crash['seconds']:.1f} s.")
        for line in crash["log"]:
            lines.append(f"    {line}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
