#!/usr/bin/env bash
# Set-up command 1: installs what is missing, builds everything (the guest kernel comes from
# the cache when its inputs have not changed), starts berthd, and runs a container with the
# stock docker CLI. berthd keeps running afterwards on the socket printed at the end.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

tests/install-deps.sh
kernel-config/build.sh
vm-image/build.sh
cargo build --quiet --release --locked -p berth-cli -p berth-daemon
# The qemu backend's vsock device; berthd finds it beside itself.
cargo build --quiet --release --locked -p berth-vmm --bin berth-vsock
tests/images/make-busybox.sh target/berth/images >/dev/null

socket=${BERTH_SOCKET:-${XDG_RUNTIME_DIR:-/run}/berth/docker.sock}
export DOCKER_HOST=unix://$socket
if ! docker version >/dev/null 2>&1; then
  mkdir -p "$(dirname "$socket")"
  log=$(dirname "$socket")/berthd.log
  BERTH_SOCKET=$socket setsid target/release/berthd >"$log" 2>&1 </dev/null &
  for _ in $(seq 1 200); do
    [ -S "$socket" ] && break
    sleep 0.1
  done
fi
docker load -i target/berth/images/busybox.tar
docker run --rm busybox echo "hello from a Berth container"
echo
echo "berthd is serving the Docker API. Try: export DOCKER_HOST=$DOCKER_HOST; docker run -it --rm busybox sh"
