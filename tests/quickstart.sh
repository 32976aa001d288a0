#!/usr/bin/env bash
# Set-up command 1: installs what is missing, builds everything (the guest kernel comes from
# the cache when its inputs have not changed), boots the Berth VM and prints what the guest
# reports. The VM keeps running afterwards: `target/release/berth vm status|logs|stop`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

tests/install-deps.sh
kernel-config/build.sh
vm-image/build.sh
cargo build --quiet --release --locked -p berth-cli

berth=target/release/berth
"$berth" vm stop >/dev/null
"$berth" vm start
echo
echo "Berth VM is running. Try: $berth vm status | $berth vm logs | $berth vm stop"
