#!/usr/bin/env bash
# benches/nbd-peers.sh: fio (ioengine=nbd) against crossmirror, nbdkit file and
# qemu-nbd, all serving the same 1 GiB backing file on loopback, one server at
# a time, interleaved over ROUNDS rounds. Prints Markdown (medians of rounds).
#
# Usage:
#   bash benches/nbd-peers.sh                       # full run (~20 min)
#   ROUNDS=1 RUNTIME=3 bash benches/nbd-peers.sh    # quick check (~3 min)
#   OUT=/var/tmp/peers.md bash benches/nbd-peers.sh # also write the Markdown
#
# Environment (defaults in brackets):
#   ROUNDS [3]        rounds; every round runs every mode x workload x server
#   RUNTIME [10]      seconds per fio run (time_based)
#   RAMP [1]          fio ramp_time seconds (not counted in the results)
#   OUT []            also write the Markdown report to this file
#   SKIP_BUILD [0]    1: do not run `cargo build --release -p crossmirror`
#   CM_BIN [/work/main/target/release/crossmirror]  crossmirror binary
#                     (setting CM_BIN also skips the build)
#   MODES ["buffered direct"]
#   SERVERS ["crossmirror nbdkit qemu-nbd"]; also crossmirror-base, a second
#                     crossmirror build (CM_BASE_BIN) for an A/B in one run
#   CM_BASE_BIN []    the crossmirror-base binary
#   WORKLOADS ["4k-randwrite-qd32 4k-randread-qd32 1M-seqwrite-qd8 1M-seqread-qd8"]
#   SCRATCH_PARENT [/var/tmp]  scratch dir parent (must not be tmpfs)
#   PORT_BASE [20809] first TCP port tried on 127.0.0.1 (a fresh port per start)
#   KEEP_SCRATCH [0]  1: keep the scratch dir (server/fio logs; the volume is
#                     always removed)
#
# Method: the volume is created once and filled from /dev/urandom (no holes).
# fio: numjobs=2 (two NBD connections), group_reporting, each job covers its
# own 512 MiB half (size=512M offset_increment=512M), JSON output parsed with
# /usr/bin/python3. Before every run the file is synced and then, in buffered
# mode, read once into the page cache (warm) or, in direct mode, dropped from
# it (cold), so every server starts from the same cache state. The server
# order is rotated each round. Peak RSS is VmHWM from /proc/PID/status, read
# after fio finishes and before the server is stopped.

set -u -o pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
OUT=${OUT:-}
SKIP_BUILD=${SKIP_BUILD:-0}
REPO=/work/main
CM_BIN_SET=0
if [[ -n ${CM_BIN:-} ]]; then SKIP_BUILD=1 CM_BIN_SET=1; fi
CM_BIN=${CM_BIN:-$REPO/target/release/crossmirror}
MODES=${MODES:-buffered direct}
SERVERS=${SERVERS:-crossmirror nbdkit qemu-nbd}
WORKLOADS=${WORKLOADS:-4k-randwrite-qd32 4k-randread-qd32 1M-seqwrite-qd8 1M-seqread-qd8}
SCRATCH_PARENT=${SCRATCH_PARENT:-/var/tmp}
PORT_BASE=${PORT_BASE:-20809}
KEEP_SCRATCH=${KEEP_SCRATCH:-0}
PY=/usr/bin/python3
VOL_SIZE=$((1024 * 1024 * 1024))

CMDLINE="ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP SKIP_BUILD=$SKIP_BUILD"
CMDLINE+=" MODES='$MODES' SERVERS='$SERVERS'"
CMDLINE+=" WORKLOADS='$WORKLOADS'"
[[ -n $OUT ]] && CMDLINE+=" OUT=$(printf %q "$OUT")"
[[ $CM_BIN_SET == 1 ]] && CMDLINE+=" CM_BIN=$(printf %q "$CM_BIN")"
CMDLINE+=" $(printf %q "$0")"
for a in "$@"; do CMDLINE+=" $(printf %q "$a")"; done
START_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

log() { printf '[nbd-peers %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- workloads
# name -> "rw bs iodepth"
wl_params() {
    case $1 in
        4k-randwrite-qd32) echo "randwrite 4k 32" ;;
        4k-randread-qd32) echo "randread 4k 32" ;;
        1M-seqwrite-qd8) echo "write 1M 8" ;;
        1M-seqread-qd8) echo "read 1M 8" ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------- checks
for t in fio nbdkit qemu-nbd nbdinfo dd sync timeout; do
    command -v "$t" >/dev/null || die "$t not found in PATH"
done
[[ -x $PY ]] || die "$PY not found"
fio --enghelp=nbd 2>&1 | grep -q uri || die "this fio has no nbd ioengine (fio --enghelp=nbd)"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit file plugin missing"
for w in $WORKLOADS; do wl_params "$w" >/dev/null || die "unknown workload $w"; done
for m in $MODES; do [[ $m == buffered || $m == direct ]] || die "unknown mode $m"; done
for s in $SERVERS; do
    case $s in crossmirror | nbdkit | qemu-nbd) ;; crossmirror-base) [[ -x ${CM_BASE_BIN:-} ]] || die "crossmirror-base needs CM_BASE_BIN" ;; *) die "unknown server $s" ;; esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer"
[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer"

# nbdkit's file plugin has no O_DIRECT option; the closest is cache=none
# (if `nbdkit file --help` lists it), which evicts what it touched from the
# page cache but still does buffered I/O.
NBDKIT_VER=$(nbdkit --version 2>/dev/null | awk '{print $2}')
NBDKIT_HELP=$(nbdkit file --help 2>&1)
NBDKIT_DIRECT_ARGS=()
NBDKIT_DIRECT_NOTE=""
if grep -q 'cache=' <<<"$NBDKIT_HELP"; then
    NBDKIT_DIRECT_ARGS=(cache=none)
    NBDKIT_DIRECT_NOTE="nbdkit $NBDKIT_VER file plugin cannot do O_DIRECT; in direct mode it runs with \`cache=none\`, which only evicts the pages it touched from the page cache (its I/O is still buffered), so its direct-mode numbers are not O_DIRECT numbers."
else
    NBDKIT_DIRECT_NOTE="nbdkit $NBDKIT_VER file plugin has neither O_DIRECT nor cache=none; in direct mode it runs with its defaults (buffered)."
fi

# ---------------------------------------------------------------- build
if [[ $SKIP_BUILD != 1 ]]; then
    log "building: cargo build --release -p crossmirror (in $REPO)"
    (cd "$REPO" && cargo build --release -p crossmirror) >&2 || die "cargo build failed"
fi
[[ -x $CM_BIN ]] || die "crossmirror binary not found: $CM_BIN"

# ---------------------------------------------------------------- scratch + cleanup
[[ $(stat -f -c %T "$SCRATCH_PARENT") != tmpfs ]] || die "$SCRATCH_PARENT is tmpfs; set SCRATCH_PARENT"
SCRATCH=$(mktemp -d "$SCRATCH_PARENT/nbd-peers.XXXXXX") || die "mktemp failed"
VOL=$SCRATCH/vol.img
RESULTS=$SCRATCH/results.tsv
PROBLEMS=$SCRATCH/problems.md
: >"$RESULTS"
: >"$PROBLEMS"
SERVER_PID=""
FIO_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $FIO_PID ]]; then
        kill -TERM "$FIO_PID" 2>/dev/null # timeout(1) passes it on to fio
        wait "$FIO_PID" 2>/dev/null
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            [[ $(awk '{print $3}' "/proc/$SERVER_PID/stat" 2>/dev/null) == Z ]] && break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -f "$VOL"
    if [[ $KEEP_SCRATCH == 1 ]]; then
        log "scratch kept: $SCRATCH"
    else
        rm -rf "$SCRATCH"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

avail_kb=$(df -Pk "$SCRATCH" | awk 'NR==2{print $4}')
((avail_kb > 1100 * 1024)) || die "need ~1.1 GiB free in $SCRATCH_PARENT"

# ---------------------------------------------------------------- helpers
NEXT_PORT=$PORT_BASE
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
    local tries=0
    while port_in_use "$NEXT_PORT"; do
        NEXT_PORT=$((NEXT_PORT + 1))
        tries=$((tries + 1))
        ((tries < 200)) || die "no free port near $PORT_BASE"
    done
    PORT=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
    ((NEXT_PORT < PORT_BASE + 500)) || NEXT_PORT=$PORT_BASE
}

proc_state() { awk '{print $3}' "/proc/$1/stat" 2>/dev/null; }
alive() {
    local s
    s=$(proc_state "$1")
    [[ -n $s && $s != Z ]]
}

LOG_BAD_RE=' (WARN|ERROR) |errors=[1-9]|panick|[Ee]rror:|[Ww]arning:|[Aa]ssertion|[Ss]egmentation'

problem_log() { # title file [lines]: the file's last lines (ANSI stripped)
    {
        printf -- '- %s\n\n  ```\n' "$1"
        tail -n "${3:-20}" "$2" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g; s/^/  /'
        printf '  ```\n'
    } >>"$PROBLEMS"
}
problem_log_ends() { # title file: first 5 and last 10 lines, with the count
    local n
    n=$(wc -l <"$2" 2>/dev/null || echo 0)
    if ((n <= 15)); then
        problem_log "$1" "$2" 15
        return
    fi
    {
        printf -- '- %s\n\n  ```\n' "$1"
        head -n 5 "$2" | sed 's/^/  /'
        printf '  ... (%d lines in all) ...\n' "$n"
        tail -n 10 "$2" | sed 's/^/  /'
        printf '  ```\n'
    } >>"$PROBLEMS"
}

# start_server SERVER MODE LOGFILE -> sets SERVER_PID, PORT
start_server() {
    local srv=$1 mode=$2 logf=$3
    pick_port
    case $srv in
        crossmirror | crossmirror-base)
            local extra=() binary=$CM_BIN
            [[ $mode == direct ]] && extra=(--direct)
            [[ $srv == crossmirror-base ]] && binary=$CM_BASE_BIN
            "$binary" serve --volume "$VOL" --listen "127.0.0.1:$PORT" "${extra[@]}" >"$logf" 2>&1 &
            ;;
        nbdkit)
            local extra=()
            [[ $mode == direct ]] && extra=("${NBDKIT_DIRECT_ARGS[@]}")
            nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$PORT" file "file=$VOL" "${extra[@]}" >"$logf" 2>&1 &
            ;;
        qemu-nbd)
            local extra=()
            [[ $mode == direct ]] && extra=(--cache=none --aio=io_uring)
            qemu-nbd -f raw -x '' -b 127.0.0.1 -p "$PORT" --persistent --shared=8 "${extra[@]}" "$VOL" >"$logf" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    # Wait until the port answers a full NBD handshake.
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if ! alive "$SERVER_PID"; then
            wait "$SERVER_PID" 2>/dev/null
            problem_log "$srv ($mode) exited during startup (exit $?)" "$logf"
            SERVER_PID=""
            return 1
        fi
        if timeout 5 nbdinfo --size "nbd://127.0.0.1:$PORT/" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    problem_log "$srv ($mode) did not answer an NBD handshake on 127.0.0.1:$PORT within 30 s" "$logf"
    stop_server "$srv" "$mode" "$logf"
    return 1
}

# stop_server SERVER MODE LOGFILE: SIGTERM, wait up to 60 s, then SIGKILL.
# Sets STOP_RC to the exit status (143 = killed by SIGTERM).
stop_server() {
    local srv=$1 mode=$2 logf=$3 pid=$SERVER_PID
    STOP_RC=0
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    local i
    for i in $(seq 600); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        problem_log "$srv ($mode) still running 60 s after SIGTERM; sent SIGKILL" "$logf"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    STOP_RC=$?
    SERVER_PID=""
}

prepare_cache() { # mode
    sync "$VOL"
    if [[ $1 == buffered ]]; then
        cat "$VOL" >/dev/null # warm: whole file in the page cache
    else
        dd if="$VOL" iflag=nocache count=0 status=none # cold: drop it
    fi
}

# parse_fio JSONFILE -> "iops bw_bytes p99_ns error"
parse_fio() {
    "$PY" - "$1" <<'EOF'
import json, sys
txt = open(sys.argv[1], errors="replace").read()
i = txt.find("{")
if i < 0:
    print("0 0 0 no-json"); sys.exit(0)
try:
    d = json.loads(txt[i:])
except Exception as e:
    print("0 0 0 bad-json"); sys.exit(0)
j = d["jobs"][0]
iops = bw = 0.0
p99 = 0
for k in ("read", "write", "trim"):
    s = j.get(k)
    if not s or not s.get("total_ios"):
        continue
    iops += s["iops"]
    bw += s["bw_bytes"]
    pct = s.get("clat_ns", {}).get("percentile", {})
    p99 = max(p99, int(pct.get("99.000000", 0)))
print("%.1f %.0f %d %s" % (iops, bw, p99, j.get("error", 0)))
EOF
}

# ---------------------------------------------------------------- volume
log "scratch: $SCRATCH"
log "creating and filling the 1 GiB volume from /dev/urandom"
dd if=/dev/urandom of="$VOL" bs=1M count=1024 oflag=direct conv=fsync status=none ||
    die "filling $VOL failed"
[[ $(stat -c %s "$VOL") == "$VOL_SIZE" ]] || die "volume has the wrong size"
alloc=$(($(stat -c %b "$VOL") * $(stat -c %B "$VOL")))
((alloc >= VOL_SIZE)) || die "volume is sparse after filling ($alloc bytes allocated)"

# ---------------------------------------------------------------- runs
read -r -a SRV_ARR <<<"$SERVERS"
nsrv=${#SRV_ARR[@]}
nmodes=$(wc -w <<<"$MODES")
nwl=$(wc -w <<<"$WORKLOADS")
total=$((ROUNDS * nmodes * nwl * nsrv))
est=$((total * (RUNTIME + RAMP + 4) / 60 + 1))
log "$total fio runs of ${RUNTIME}s (+${RAMP}s ramp), estimated ~${est} min"

n=0
for round in $(seq "$ROUNDS"); do
    # rotate the server order by round
    order=()
    for k in $(seq 0 $((nsrv - 1))); do
        order+=("${SRV_ARR[$(((k + round - 1) % nsrv))]}")
    done
    for mode in $MODES; do
        for wl in $WORKLOADS; do
            read -r rw bs qd <<<"$(wl_params "$wl")"
            for srv in "${order[@]}"; do
                n=$((n + 1))
                tag="r${round}-${mode}-${wl}-${srv}"
                slog=$SCRATCH/$tag.server.log
                fjson=$SCRATCH/$tag.fio.json
                ferr=$SCRATCH/$tag.fio.err
                log "[$n/$total] round $round: $mode $wl $srv"
                prepare_cache "$mode"
                if ! start_server "$srv" "$mode" "$slog"; then
                    printf '%s\t%s\t%s\t%s\t0\t0\t0\t0\tstart-failed\n' "$round" "$mode" "$wl" "$srv" >>"$RESULTS"
                    continue
                fi
                pid=$SERVER_PID
                # fio in the background + wait, so a signal to this script
                # is handled at once (the trap kills fio and the server).
                timeout -k 10 $((RUNTIME + RAMP + 60)) \
                    fio --name="$wl" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/" \
                    --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=2 \
                    --size=512M --offset_increment=512M \
                    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
                    --group_reporting --output-format=json --output="$fjson" \
                    >"$ferr" 2>&1 &
                FIO_PID=$!
                fio_rc=0
                wait "$FIO_PID" || fio_rc=$?
                FIO_PID=""
                rss_kb=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status" 2>/dev/null)
                rss_kb=${rss_kb:-0}
                was_alive=1
                alive "$pid" || was_alive=0
                read -r iops bw p99 ferror <<<"$(parse_fio "$fjson")"
                stop_server "$srv" "$mode" "$slog"
                src=$STOP_RC
                status=ok
                if ((fio_rc != 0)) || [[ $ferror != 0 ]]; then
                    status="fio-failed(rc=$fio_rc,error=$ferror)"
                    ((fio_rc == 124 || fio_rc == 137)) && status="fio-timeout"
                    problem_log_ends "$tag: fio exit $fio_rc, job error $ferror (fio output:)" "$ferr"
                    ((was_alive == 0)) || problem_log "$tag: $srv log tail" "$slog" 30
                fi
                if ((was_alive == 0)); then
                    status="server-died"
                    problem_log "$tag: $srv died during the fio run (exit $src)" "$slog" 30
                elif [[ $srv == crossmirror && $src != 0 ]] ||
                    [[ $srv != crossmirror && $src != 0 && $src != 143 ]]; then
                    problem_log "$tag: $srv exited with status $src after SIGTERM" "$slog" 30
                fi
                # Warnings/errors in the server log: crossmirror's tracing
                # WARN/ERROR lines or a connection that ended with errors=N>0,
                # a panic, nbdkit/qemu-nbd "error:"/"warning:" lines.
                if sed 's/\x1b\[[0-9;]*m//g' "$slog" | grep -qE "$LOG_BAD_RE"; then
                    {
                        printf -- '- %s: server log has warnings/errors:\n\n  ```\n' "$tag"
                        sed 's/\x1b\[[0-9;]*m//g' "$slog" | grep -E "$LOG_BAD_RE" | head -n 15 | sed 's/^/  /'
                        printf '  ```\n'
                    } >>"$PROBLEMS"
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                    "$round" "$mode" "$wl" "$srv" "$iops" "$bw" "$p99" "$rss_kb" "$status" >>"$RESULTS"
                log "    $srv: IOPS=$iops MB/s=$(awk -v b="$bw" 'BEGIN{printf "%.1f", b/1e6}') p99=$((p99 / 1000))us VmHWM=${rss_kb}kB $status"
            done
        done
    done
done

# ---------------------------------------------------------------- report
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    GIT_REV+=" (working tree has uncommitted changes)"
fi
REPORT=$SCRATCH/report.md
{
    echo "# NBD peers benchmark"
    echo
    echo "- command: \`$CMDLINE\`"
    echo "- date: $START_DATE (finished $(date -u '+%H:%M:%S UTC'))"
    echo "- crossmirror: \`git -C $REPO rev-parse --short HEAD\` = $GIT_REV; binary $CM_BIN ($("$CM_BIN" --version 2>&1 | head -n1))"
    if [[ $CM_BIN_SET == 1 ]]; then
        echo "- note: CM_BIN was given, so the binary was not built from $REPO and may not match that revision"
    elif [[ $SKIP_BUILD == 1 ]]; then
        echo "- note: SKIP_BUILD=1, the binary may be older than the working tree"
    fi
    echo "- host: $(uname -r), $(nproc) CPUs, load avg at end $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- tools: $(fio --version), nbdkit $NBDKIT_VER, $(qemu-nbd --version | head -n1)"
    echo "- fio: ioengine=nbd numjobs=2 size=512M offset_increment=512M time_based runtime=${RUNTIME}s ramp_time=${RAMP}s group_reporting; volume: 1 GiB file on $(stat -f -c %T "$SCRATCH_PARENT") ($SCRATCH_PARENT), filled from /dev/urandom"
    echo "- buffered: \`crossmirror serve\`, \`nbdkit file\` (defaults), \`qemu-nbd\` (cache=writeback); page cache warm before each run"
    echo "- direct: \`crossmirror serve --direct\`, \`nbdkit file ${NBDKIT_DIRECT_ARGS[*]}\`, \`qemu-nbd --cache=none --aio=io_uring\`; page cache dropped before each run"
    echo "- note: $NBDKIT_DIRECT_NOTE"
    echo "- rounds: $ROUNDS (server order rotated per round); values are medians over rounds; p99 = fio completion latency (clat) 99th percentile, max of read/write"
    echo
    "$PY" - "$RESULTS" "$MODES" "$WORKLOADS" "$SERVERS" <<'EOF'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
modes, wls, srvs = (a.split() for a in sys.argv[2:5])
data = {}
for r in rows:
    rnd, mode, wl, srv, iops, bw, p99, rss, status = r
    data.setdefault((mode, wl, srv), []).append(
        dict(iops=float(iops), bw=float(bw), p99=int(p99), rss=int(rss), ok=(status == "ok"), status=status))
def med(xs):
    return statistics.median(xs) if xs else None
def fmt_lat(ns):
    if ns is None: return "-"
    return "%.2f ms" % (ns / 1e6) if ns >= 1e6 else "%.0f µs" % (ns / 1e3)
print("## Results (median of rounds)\n")
print("| mode | workload | server | IOPS | MB/s | p99 clat | ok rounds |")
print("|---|---|---|---:|---:|---:|---:|")
medians = {}
for mode in modes:
    for wl in wls:
        for srv in srvs:
            runs = data.get((mode, wl, srv), [])
            ok = [x for x in runs if x["ok"]]
            mi = med([x["iops"] for x in ok]); mb = med([x["bw"] for x in ok]); mp = med([x["p99"] for x in ok])
            medians[(mode, wl, srv)] = mi
            bad = sorted(set(x["status"] for x in runs if not x["ok"]))
            note = "%d/%d" % (len(ok), len(runs)) + ((" (" + ", ".join(bad) + ")") if bad else "")
            print("| %s | %s | %s | %s | %s | %s | %s |" % (
                mode, wl, srv,
                "-" if mi is None else "%.0f" % mi,
                "-" if mb is None else "%.1f" % (mb / 1e6),
                fmt_lat(mp), note))
if "crossmirror" in srvs and len(srvs) > 1:
    print("\n## crossmirror / best peer (median IOPS)\n")
    print("| mode | workload | crossmirror/best-peer | best peer |")
    print("|---|---|---:|---|")
    for mode in modes:
        for wl in wls:
            cm = medians.get((mode, wl, "crossmirror"))
            peers = [(medians.get((mode, wl, s)), s) for s in srvs if s != "crossmirror"]
            peers = [p for p in peers if p[0]]
            if cm is None or not peers:
                print("| %s | %s | - | - |" % (mode, wl)); continue
            best = max(peers)
            print("| %s | %s | %.2f | %s (%.0f IOPS) |" % (mode, wl, cm / best[0], best[1], best[0]))
print("\n## Peak RSS (VmHWM, max over rounds)\n")
print("| mode | server | 4k QD32 | 1M QD8 |")
print("|---|---|---:|---:|")
def peak(mode, srv, prefix):
    v = [x["rss"] for (m, w, s), xs in data.items() if m == mode and s == srv and w.startswith(prefix) for x in xs]
    v = [x for x in v if x > 0]
    return max(v) if v else None
def mib(kb): return "-" if kb is None else "%.1f MiB" % (kb / 1024)
for mode in modes:
    for srv in srvs:
        print("| %s | %s | %s | %s |" % (mode, srv, mib(peak(mode, srv, "4k")), mib(peak(mode, srv, "1M"))))
if "crossmirror" in srvs:
    v = [peak(m, "crossmirror", "4k") for m in modes]
    v = [x for x in v if x]
    print("\n**crossmirror peak RSS during the 4k QD32 runs: %s**" % mib(max(v) if v else None))
EOF
    echo
    echo "## Problems"
    echo
    if [[ -s $PROBLEMS ]]; then cat "$PROBLEMS"; else echo "none (no fio errors, no server crash, hang, non-zero exit, or error/warning log line)"; fi
} >"$REPORT"

cat "$REPORT"
if [[ -n $OUT ]]; then
    cp "$REPORT" "$OUT" && log "report written to $OUT"
fi
