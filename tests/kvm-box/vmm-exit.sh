#!/usr/bin/env bash
# How berth-vmm ends, checked against a real KVM in the KVM box: a guest reboot (how Berth's
# agent powers off; `reboot=t` makes it a triple fault) exits 0, a guest whose PID 1 dies
# (which is what a killed agent is to the kernel: "Attempted to kill init") exits 3 with the
# panic reported, and SIGTERM to the VMM exits 143.
#
# PID 1 cannot be sent SIGKILL from inside its own PID namespace (the kernel drops signals init
# has no handler for), so the dying-init scenario has init exit instead; the kernel, and so the
# VMM, sees the same thing.
#
# Usage: tests/kvm-box/vmm-exit.sh   (needs target/debug/berth-vmm and target/berth/vmlinux)
# Prints CHECK lines; exits non-zero if any check failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kernel=${BERTH_VMM_KERNEL:-$repo/target/berth/vmlinux}
vmm=$repo/target/debug/berth-vmm
[[ -x $vmm ]] || { echo "vmm-exit: no $vmm (cargo build -p berth-vmm)" >&2; exit 2; }
[[ -f $kernel ]] || { echo "vmm-exit: no guest kernel at $kernel" >&2; exit 2; }
out=$(mktemp -d /tmp/vmm-exit.XXXXXX)
trap 'rm -rf "$out"' EXIT

# One initramfs; the scenario comes from the command line (berth.scenario=...).
root=$out/root
mkdir -p "$root/bin" "$root/proc"
cp "$(command -v busybox)" "$root/bin/busybox"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
case $(/bin/busybox cat /proc/cmdline) in
  *berth.scenario=reboot*) echo "guest: rebooting"; /bin/busybox reboot -f ;;
  *berth.scenario=die*) echo "guest: init exits"; exit 1 ;;
  *) echo "guest: waiting"; exec /bin/busybox sleep 100000 ;;
esac
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$out/initramfs.cpio"

cat >"$out/inside.sh" <<INSIDE
#!/bin/sh
fails=0
boot() {
  timeout 900 $vmm --kernel $kernel --initramfs $out/initramfs.cpio --mem-mib 128 --vcpus 1 \\
    --console-log $out/console-\$1.log --cmdline "console=ttyS0 reboot=t panic=-1 berth.scenario=\$1"
}
check() {
  if [ "\$2" = "\$3" ]; then echo "CHECK ok: \$1 (\$2)"; else echo "CHECK FAIL: \$1: got \$2, want \$3"; fails=1; fi
}
boot reboot 2>$out/reboot.err; check "guest reboot ends the VMM cleanly" \$? 0
boot die 2>$out/die.err; check "dying init is a guest panic" \$? 3
grep -q "Attempted to kill init" $out/console-die.log && check "console shows the panic" yes yes || check "console shows the panic" no yes
boot wait 2>$out/wait.err & pid=\$!
until grep -q "guest: waiting" $out/console-wait.log 2>/dev/null; do sleep 1; done
kill -TERM \$pid; wait \$pid; check "SIGTERM ends the VMM with 128+15" \$? 143
exit \$fails
INSIDE
chmod +x "$out/inside.sh"
"$repo/tests/kvm-box/run.sh" --out "$out" -- "$out/inside.sh"
