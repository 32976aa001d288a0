#!/usr/bin/env bash
# berth-vmm end to end against a real KVM: inside the KVM box (L1 under TCG with nested SVM),
# berth-vmm boots our kernel (L2). Every part must pass; each prints CHECK lines or test names.
#
#   1. vmm-exit.sh: a guest reboot exits 0, a dying PID 1 exits 3 with the panic reported,
#      SIGTERM exits 143.
#   2. The qemu-backend VM scenarios (tests/tests/vm_qemu.rs) under BERTH_BACKEND=vmm: the real
#      agent's handshake over our vsock device, system info, a clean poweroff leaving no
#      process, and failed boots named (missing kernel, corrupt initramfs, VMM killed).
#   3. vmm-disk-balloon.sh: virtio-blk reads, writes, flush, discard, read-only refusal and data
#      surviving a reboot of the VM; the balloon's free page reporting.
#   4. vmm-virtiofs.sh: a file crosses virtio-fs (virtiofsd behind our vhost-user frontend)
#      both ways.
#   5. vmm-net.sh: virtio-net behind passt: a download and an upload through passt to a
#      server on L1's loopback, checked by hash, throughput printed, and the link going down
#      (the VM still running) when passt is killed.
#
# L2 runs slowly here (every exit of the nested guest is emulated), so the parts carry long
# timeouts; on a host with hardware KVM the same scenarios run directly and fast.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
step() { printf '\n--> vmm suite: %s\n' "$*"; }

cargo build --quiet --locked -p berth-vmm
binary=$(cargo test --quiet --locked -p berth-tests --test vm_qemu --no-run \
  --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["name"] == "vm_qemu":
        print(message["executable"])
')
[[ -n $binary ]] || { echo "vmm-suite: cannot find the vm_qemu test binary" >&2; exit 1; }

step "exit codes"
tests/kvm-box/vmm-exit.sh

step "agent handshake and boot failures under the vmm backend"
out=$(mktemp -d /tmp/berth-vmm-suite.XXXXXX)
trap 'rm -rf "$out"' EXIT
tests/kvm-box/run.sh --out "$out" -- env CI=true BERTH_BACKEND=vmm BERTH_TEST_BOOT_TIMEOUT=900 \
  BERTH_VMM="$repo/target/debug/berth-vmm" "$binary" --test-threads 1

step "virtio-blk and balloon"
tests/kvm-box/vmm-disk-balloon.sh

if [[ -x tests/kvm-box/vmm-virtiofs.sh ]]; then
  step "virtio-fs"
  tests/kvm-box/vmm-virtiofs.sh
fi

step "virtio-net behind passt"
tests/kvm-box/vmm-net.sh
