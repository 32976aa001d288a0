#!/usr/bin/env bash
# The KVM box: runs a command inside an L1 guest that has a real /dev/kvm.
#
# This machine's /dev/kvm is PVM and cannot boot a stock kernel (shared/ENVIRONMENT.md), so L1 is
# our own guest kernel (it has CONFIG_KVM_AMD) under QEMU TCG with `-cpu max`, which exposes
# nested SVM. L1's root filesystem is the host's root, read-only over virtio-9p, plus one
# read-write share for results, so host binaries (dynamically linked against glibc) run
# unchanged against L1's /dev/kvm and L1's own cgroup v2 (which owns every controller).
#
# Usage: tests/kvm-box/run.sh [--out DIR] [--mem 2G] [--smp 2] -- COMMAND [ARGS...]
#   DIR (default: a fresh temp dir) is writable inside the box at the same path.
# Exit status: the command's, or 125 if the box itself failed to report one.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kernel=${BERTH_KVM_BOX_KERNEL:-$repo/target/berth/vmlinux}
out=""
mem=2G
smp=2
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "kvm-box: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--out DIR] -- COMMAND [ARGS...]" >&2; exit 2; }
[[ -f $kernel ]] || { echo "kvm-box: no kernel at $kernel (run kernel-config/build.sh)" >&2; exit 2; }
busybox=$(command -v busybox || true)
if [[ -z $busybox ]] || ! file -L "$busybox" | grep -q 'statically linked'; then
  echo "kvm-box: needs a static busybox (apt-get install busybox-static)" >&2
  exit 2
fi

# One box at a time: two TCG boxes side by side starve each other's nested guests (L2 timers
# stall under load), so a second caller waits here for the first to finish.
exec 9>"${TMPDIR:-/tmp}/berth-kvm-box.lock"
flock 9

work=$(mktemp -d /tmp/kvm-box.XXXXXX)
trap 'rm -rf "$work"' EXIT
out=${out:-$work/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The command, quoted, as a script inside the results share.
{
  printf '#!/bin/sh\ncd %q\n' "$PWD"
  printf '%q ' "$@"
  printf '\n'
} >"$out/.kvm-box-cmd"

# L1's init: a script on the host filesystem, which is L1's real root (so mount namespaces and
# pivot_root behave as on a normal machine; a chroot would not). Read-only root: writable places
# are tmpfs (/run, /dev/shm; TMPDIR=/run/tmp) and the results share.
cat >"$out/.kvm-box-init" <<INIT
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
# What udev would add to devtmpfs; tools write to /dev/stderr (curl -o /dev/stderr).
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
# The host's /tmp stays visible (a checkout may live there); scratch space goes to tmpfs.
mkdir -p /run/tmp
export TMPDIR=/run/tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out $out
hostname kvm-box
ip link set lo up 2>/dev/null
# An uplink through QEMU's user-mode stack, with slirp's fixed addresses: a user-mode network
# stack in L1 (passt, behind berth-vmm's virtio-net) needs an interface with a default route.
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
echo "kvm-box: L1 up, /dev/kvm: \$(ls -l /dev/kvm 2>&1)"
/bin/sh $out/.kvm-box-cmd
echo "KVM_BOX_EXIT=\$?"
sync
$busybox reboot -f
INIT
chmod +x "$out/.kvm-box-init"

# L1 calibrates its TSC against QEMU's emulated PIT, which fails now and then when the host is
# busy ("tsc: Unable to calibrate against PIT"). L1 then runs on jiffies without a TSC frequency,
# and its KVM cannot run a guest that uses kvm-clock: the vCPU loops on clock updates inside L1's
# kernel and the guest never prints a line. Under TCG, L1's TSC is the host's, so tell L1 the
# host's frequency instead of letting it measure.
tsc_khz=${BERTH_KVM_BOX_TSC_KHZ:-$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)}

log=$work/console.log
qemu-system-x86_64 \
  -M microvm,acpi=off -accel tcg -cpu max -m "$mem" -smp "$smp" ${BERTH_KVM_BOX_QEMU_ARGS:-} \
  -nodefaults -no-user-config -nographic -no-reboot \
  -serial stdio \
  -kernel "$kernel" \
  -append "console=ttyS0 reboot=t panic=-1 quiet root=host rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144 ro init=$out/.kvm-box-init${tsc_khz:+ tsc_early_khz=$tsc_khz}" \
  -netdev user,id=uplink -device virtio-net-device,netdev=uplink \
  -fsdev local,id=h,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-device,fsdev=h,mount_tag=host \
  -fsdev local,id=o,path="$out",security_model=none,multidevs=remap \
  -device virtio-9p-device,fsdev=o,mount_tag=out \
  </dev/null | tee "$log"

code=$(sed -n 's/^KVM_BOX_EXIT=\([0-9]*\).*/\1/p' "$log" | tail -1)
[[ -n $code ]] || { echo "kvm-box: the box did not report an exit code" >&2; exit 125; }
exit "$code"
