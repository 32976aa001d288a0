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
#   6. The VM container suite (tests/tests/vm_containers.rs) and the docker CLI suite
#      (host/daemon/tests/docker_cli.rs) under BERTH_BACKEND=vmm: what a user sees, on berth-vmm.
#   7. A container reaches a server on the host's loopback through the guest's uplink
#      (berth-vmm's virtio-net, passt started by the engine).
#
# L2 runs slowly here (every exit of the nested guest is emulated), so the parts carry long
# timeouts; on a host with hardware KVM the same scenarios run directly and fast.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
step() { printf '\n--> vmm suite: %s\n' "$*"; }

cargo build --quiet --locked -p berth-vmm -p berth-daemon
# The executable of integration test TEST of PACKAGE, built if needed.
test_binary() {
  cargo test --quiet --locked -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["name"] == sys.argv[1]:
        print(message["executable"])
' "$2"
}
vm_qemu=$(test_binary berth-tests vm_qemu)
vm_containers=$(test_binary berth-tests vm_containers)
docker_cli=$(test_binary berth-daemon docker_cli)
docker_network=$(test_binary berth-daemon docker_network)
for binary in "$vm_qemu" "$vm_containers" "$docker_cli" "$docker_network"; do
  [[ -n $binary ]] || { echo "vmm-suite: cannot find a test binary" >&2; exit 1; }
done
# What every test run under the vmm backend inside the box gets.
vmm_env=(env CI=true BERTH_BACKEND=vmm BERTH_TEST_BOOT_TIMEOUT=900
  BERTH_VMM="$repo/target/debug/berth-vmm")

step "exit codes"
tests/kvm-box/vmm-exit.sh

step "agent handshake and boot failures under the vmm backend"
out=$(mktemp -d /tmp/berth-vmm-suite.XXXXXX)
trap 'rm -rf "$out"' EXIT
tests/kvm-box/run.sh --out "$out" -- "${vmm_env[@]}" "$vm_qemu" --test-threads 1

step "virtio-blk and balloon"
tests/kvm-box/vmm-disk-balloon.sh

if [[ -x tests/kvm-box/vmm-virtiofs.sh ]]; then
  step "virtio-fs"
  tests/kvm-box/vmm-virtiofs.sh
fi

step "virtio-net behind passt"
tests/kvm-box/vmm-net.sh

step "the VM container suite under the vmm backend"
tests/kvm-box/run.sh --out "$out" -- "${vmm_env[@]}" "$vm_containers" --test-threads 1

step "the docker CLI suite under the vmm backend"
tests/kvm-box/run.sh --mem 3G --out "$out" -- "${vmm_env[@]}" "$docker_cli" --test-threads 1

step "outbound traffic under the vmm backend (virtio-net behind passt)"
tests/kvm-box/run.sh --mem 3G --out "$out" -- "${vmm_env[@]}" "$docker_network" --test-threads 1 \
  --exact a_container_reaches_a_server_on_the_hosts_loopback_by_the_host_alias
