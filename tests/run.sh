#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need on a fresh
# Debian machine, then builds and runs every test of the workspace.
set -euo pipefail
set -o pipefail
cd "$(dirname "$0")/.."

# etcd-server: the etcd quorum backend's tests run a real etcd; protobuf-compiler
# and libprotobuf-dev: building that backend (etcd-client) needs protoc.
# iproute2 (ip, tc, ss) and iperf3: the WAN rig of tests/src/wan.rs and its check.
# strace: the order of a copy host's system calls (tests/tests/copy_host.rs).
packages=(fio libnbd-bin python3-libnbd nbdkit qemu-utils e2fsprogs util-linux fuse3 iptables iproute2 iperf3 etcd-server protobuf-compiler libprotobuf-dev strace)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo fmt --all -- --check
# Every feature is built and tested: the etcd quorum backend too.
features=(--features crossmirror-cluster-glue/etcd)
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
cargo build --workspace "${features[@]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --no-fail-fast "${features[@]}" 2>&1 | tee "$log"
# One closing line for the whole run: the sum over every test binary. A test
# that lacked a tool or root printed `SKIPPED: <test>: <reason>` (outside CI
# only; under CI=true it fails instead) and passed: it counts as skipped, not
# passed, and the skipped tests are listed above the summary.
# (The line may follow a "test … " that the harness has not ended yet.)
if grep -q 'SKIPPED: ' "$log"; then
  echo "skipped tests:"
  grep -o 'SKIPPED: .*' "$log" | sort -u | sed 's/^/  /'
fi
awk 'match($0, /SKIPPED: [^:]*:/) { name = substr($0, RSTART + 9, RLENGTH - 10); if (!(name in seen)) { seen[name] = 1; skipped += 1 } }
     /^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed - skipped, failed, ignored + skipped }' "$log"
