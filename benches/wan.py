#!/usr/bin/python3
"""benches/wan.py: an async copy over an emulated WAN, measured in one run.

The copy host runs in a network namespace behind the WAN rig of
tests/src/wan.rs (the `wan-rig` helper binary: a veth pair shaped by tc tbf
both ways, and a delay proxy for the round trip), at 100 Mbit/40 ms and
1 Gbit/10 ms. For each link, fio (ioengine=nbd, 1 MiB writes, data 50 %
compressible: --buffer_compress_percentage=50 --refill_buffers) through
`crossmirror serve` on a VOLUME-sized volume, in two workloads:

- steady: writes at 40 % of the link's rate, four at a time;
- burst: writes as fast as the local store takes them, eight at a time
  (far above the link's rate);

with no copy (the baseline), then with one async copy under each link
compression setting (none, lz4). Reported per run: the application's MB/s
and its ratio to no copy, the worst write (fio's clat max), the copy's RPO
sampled every 0.5 s during the writes (median and worst: bytes, seconds,
and whether it was exact), the states seen, the catch-up time (writes
stopped → the copy up to date with an exact RPO of 0: it holds every
acknowledged write), and the bytes written vs the bytes shipped (link
payload, after compression) with their ratio.

Usage: /usr/bin/python3 benches/wan.py
Environment: RUNTIME [30] seconds of writes, LINKS ["100:40 1000:10"]
(Mbit:ms), SETTINGS ["none lz4"], WORKLOADS ["steady burst"], VOLUME [1G],
CM_BIN [target/release/crossmirror], RIG_BIN [target/release/wan-rig]
(both built unless given), SCRATCH [/var/tmp], OUT [also write the report
here]. Needs root, iproute2 (ip, tc) and fio.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = int(os.environ.get("RUNTIME", "30"))
LINKS = [tuple(int(part) for part in link.split(":")) for link in os.environ.get("LINKS", "100:40 1000:10").split()]
SETTINGS = os.environ.get("SETTINGS", "none lz4").split()
WORKLOADS = os.environ.get("WORKLOADS", "steady burst").split()
VOLUME = os.environ.get("VOLUME", "1G")
SCRATCH_PARENT = os.environ.get("SCRATCH", "/var/tmp")
COMPRESSIBLE = ["--buffer_compress_percentage=50", "--refill_buffers"]
COPY_PORT, COPY_ADMIN_PORT = 7000, 7001


def log(message):
    print(f"[wan {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same process and status helpers as the mirroring benchmark.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
mirror = __import__("mirror")
wait_listening = mirror.wait_listening
status = mirror.status


def caught_up(admin):
    """The copy holds every acknowledged write: up to date with an exact RPO
    of 0 bytes (its dirty bits may still wait for their periodic clearing)."""
    copy = status(admin)["copies"][0]
    return copy["state"] == "up_to_date" and copy["rpo"]["exact"] and copy["rpo"]["bytes"] == 0


class Rig:
    """The `wan-rig` helper: a rig for as long as its standard input is open."""

    def __init__(self, binary, rate_mbit, round_trip_ms):
        self.process = subprocess.Popen([binary, str(rate_mbit), str(round_trip_ms)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        hello = self.read()
        self.namespace, self.copy_ip = hello["namespace"], hello["copy_ip"]

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"wan-rig ended (exit {self.process.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"wan-rig: {reply['error']}")
        return reply

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def proxy(self, target):
        return self.ask(f"proxy {target}")["proxy"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Hosts:
    """A production host on a fresh volume, with one async copy host inside
    the rig (reached through a new proxy) unless `setting` is None."""

    def __init__(self, scratch, binary, secret, rig, setting, label):
        self.processes = []
        self.scratch, self.binary, self.label = scratch, binary, label
        volume = os.path.join(scratch, f"{label}-production.img")
        args = [binary, "serve", "--volume", volume, "--size", VOLUME]
        if setting is not None:
            store = os.path.join(scratch, f"{label}-copy.img")
            copy = self.spawn(["ip", "netns", "exec", rig.namespace, binary, "copy-host", "--volume", store, "--size",
                               VOLUME, "--listen", f"{rig.copy_ip}:{COPY_PORT}", "--secret-file", secret, "--admin",
                               f"{rig.copy_ip}:{COPY_ADMIN_PORT}"], "copy")
            wait_listening(rig.copy_ip, COPY_PORT, copy)
            proxy = rig.proxy(f"{rig.copy_ip}:{COPY_PORT}")
            self.admin = f"127.0.0.1:{free_port()}"
            args += ["--mirror", f"dr={proxy},mode=async,compress={setting}", "--secret-file", secret,
                     "--admin", self.admin]
        self.port = free_port()
        args += ["--listen", f"127.0.0.1:{self.port}"]
        wait_listening("127.0.0.1", self.port, self.spawn(args, "production"))

    def spawn(self, args, role):
        with open(os.path.join(self.scratch, f"{self.label}-{role}.log"), "w") as log_file:
            process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log_file)
        self.processes.append(process)
        return process

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fio(port, workload, rate_mbit):
    """fio's report for `workload` against the production host: (bytes
    written, MB/s, worst write ms, p99 ms)."""
    args = ["fio", "--name=wan", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}", "--rw=write", "--bs=1M",
            "--time_based", f"--runtime={RUNTIME}", "--output-format=json"] + COMPRESSIBLE
    if workload == "steady":
        args += ["--iodepth=4", f"--rate={int(rate_mbit * 1e6 / 8 * 0.4)}"]
    else:
        args += ["--iodepth=8"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    write = json.loads(output[output.find("{"):])["jobs"][0]["write"]
    clat = write["clat_ns"]
    return write["io_bytes"], write["bw_bytes"] / 1e6, clat["max"] / 1e6, clat["percentile"]["99.000000"] / 1e6


def sample_rpo(admin, samples, stop):
    while not stop.is_set():
        copy = status(admin)["copies"][0]
        rpo = copy["rpo"]
        samples.append((copy["state"], rpo["bytes"], rpo["seconds"], rpo["exact"]))
        stop.wait(0.5)


def measure(scratch, binary, secret, rig, rate_mbit, workload, setting, label):
    hosts = Hosts(scratch, binary, secret, rig, setting, label)
    try:
        if setting is None:
            written, mbps, worst, p99 = fio(hosts.port, workload, rate_mbit)
            return {"written": written, "mbps": mbps, "worst": worst, "p99": p99}
        deadline = time.time() + 600
        while not caught_up(hosts.admin):
            if time.time() > deadline:
                raise RuntimeError("the new copy never became up to date")
            time.sleep(0.1)
        before = status(hosts.admin)["copies"][0]
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample_rpo, args=(hosts.admin, samples, stop))
        sampler.start()
        try:
            written, mbps, worst, p99 = fio(hosts.port, workload, rate_mbit)
        finally:
            stop.set()
            sampler.join()
        stopped = time.time()
        while not caught_up(hosts.admin):
            if time.time() - stopped > 1800:
                raise RuntimeError("the copy did not catch up within 30 min")
            time.sleep(0.1)
        catch_up = time.time() - stopped
        after = status(hosts.admin)["copies"][0]
        return {"written": written, "mbps": mbps, "worst": worst, "p99": p99, "samples": samples,
                "catch_up": catch_up, "shipped": after["bytes_shipped"] - before["bytes_shipped"]}
    finally:
        hosts.stop()


def build(package, binary_name):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    subprocess.run(["cargo", "build", "--release", "-p", package, "--bin", binary_name], cwd=REPO, check=True)
    return os.path.join(target, "release", binary_name)


def main():
    binary = os.environ.get("CM_BIN") or build("crossmirror", "crossmirror")
    rig_binary = os.environ.get("RIG_BIN") or build("crossmirror-system-tests", "wan-rig")
    commit = mirror.commit_id()
    scratch = tempfile.mkdtemp(prefix="crossmirror-wan-", dir=SCRATCH_PARENT)
    results = {}
    try:
        secret = mirror.write_secret(scratch)
        for rate_mbit, round_trip_ms in LINKS:
            rig = Rig(rig_binary, rate_mbit, round_trip_ms)
            try:
                for workload in WORKLOADS:
                    for setting in [None] + SETTINGS:
                        name = setting or "no copy"
                        label = f"{rate_mbit}-{round_trip_ms}-{workload}-{name.replace(' ', '-')}"
                        log(f"{rate_mbit} Mbit/{round_trip_ms} ms, {workload}, {name}")
                        result = measure(scratch, binary, secret, rig, rate_mbit, workload, setting, label)
                        results[(rate_mbit, round_trip_ms, workload, name)] = result
                        log(f"  {result['mbps']:.1f} MB/s, worst write {result['worst']:.1f} ms"
                            + (f", catch-up {result['catch_up']:.1f} s" if "catch_up" in result else ""))
                        for leftover in os.listdir(scratch):
                            if leftover.startswith(label) and not leftover.endswith(".log"):
                                os.remove(os.path.join(scratch, leftover))
            finally:
                rig.close()
        mirror.emit(render(results, commit))
    finally:
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)


def mib(value):
    return f"{value / (1 << 20):.1f}"


def rpo_cell(samples, index, unit):
    values = [sample[index] for sample in samples if sample[index] is not None]
    if not values:
        return "-"
    return f"{unit(statistics.median(values))} / {unit(max(values))}"


def render(results, commit):
    environment = {"RUNTIME": RUNTIME, "LINKS": " ".join(f"{r}:{t}" for r, t in LINKS),
                   "SETTINGS": " ".join(SETTINGS), "WORKLOADS": " ".join(WORKLOADS), "VOLUME": VOLUME}
    command = " ".join(f"{key}='{value}'" for key, value in environment.items())
    lines = [
        "# Async copy over an emulated WAN",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}",
        f"- command: `{command} /usr/bin/python3 benches/wan.py`",
        f"- fio: ioengine=nbd, 1 MiB sequential writes, 50 % compressible, {RUNTIME} s; steady: 40 % of the "
        "link's rate, QD4; burst: unthrottled, QD8. Production (buffered) and copy host on this 2-core machine, "
        f"the copy in a namespace behind the WAN rig; {VOLUME} volume, default lag_bytes_max (64 MiB)",
        "- RPO: sampled every 0.5 s while writing, median / worst; exact = the copy followed every write "
        "(else the bound of its dirty regions and the time since it last did)",
        "",
        "| link | workload | copy | MB/s | vs no copy | worst write ms | p99 ms | RPO MiB | RPO s | exact "
        "| states | catch-up s | written MiB | shipped MiB | shipped/written |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for rate_mbit, round_trip_ms in LINKS:
        for workload in WORKLOADS:
            base = results[(rate_mbit, round_trip_ms, workload, "no copy")]
            for name in ["no copy"] + SETTINGS:
                result = results[(rate_mbit, round_trip_ms, workload, name)]
                row = [f"{rate_mbit} Mbit / {round_trip_ms} ms", workload, name, f"{result['mbps']:.1f}",
                       f"{result['mbps'] / base['mbps']:.2f}", f"{result['worst']:.1f}", f"{result['p99']:.1f}"]
                samples = result.get("samples")
                if samples:
                    states = []
                    for sample in samples:
                        if not states or states[-1] != sample[0]:
                            states.append(sample[0])
                    exact = sum(1 for sample in samples if sample[3]) / len(samples)
                    row += [rpo_cell(samples, 1, mib), rpo_cell(samples, 2, lambda s: f"{s:.1f}"),
                            f"{exact:.0%}", " → ".join(states), f"{result['catch_up']:.1f}", mib(result["written"]),
                            mib(result["shipped"]), f"{result['shipped'] / result['written']:.2f}"]
                else:
                    row += ["-"] * 5 + [mib(result["written"]), "-", "-"]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
