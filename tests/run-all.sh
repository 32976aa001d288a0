#!/usr/bin/env bash
# Set-up command 2: runs every check and test of the project, as CI does (.ci/run calls this).
# Installs and builds what the tests need first (the guest kernel from the cache when its
# inputs have not changed). With CI=true, a test tier that cannot run fails instead of skipping.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
tests/install-deps.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --locked --workspace --all-targets -- -D warnings

step "guest kernel (cached by input hash)"
kernel-config/build.sh

step "guest image, and that it is reproducible"
vm-image/build.sh
first=$(sha256sum target/berth/initramfs.cpio | cut -d' ' -f1)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
BERTH_ASSETS_DIR=$scratch vm-image/build.sh >/dev/null
second=$(sha256sum "$scratch/initramfs.cpio" | cut -d' ' -f1)
if [[ $first != "$second" ]]; then
  echo "initramfs is not reproducible: $first != $second" >&2
  exit 1
fi
echo "initramfs reproducible: sha256 $first"

# The two scenarios that need cgroup v2's memory and pids controllers cannot run on hosts whose
# controllers are bound to cgroup v1 (these machines); they run with the whole container suite
# in a VM below.
step "tests (unit, agent-native, VM under the host's backend, CLI)"
cargo test --locked --workspace -- \
  --skip container_memory_limit_oom_killed --skip container_pids_limit_stops_fork_bomb

step "container suite inside a VM booted from our kernel"
tests/kvm-box/container-suite.sh

step "berth-vmm against a real KVM, inside the KVM box"
tests/kvm-box/vmm-suite.sh
