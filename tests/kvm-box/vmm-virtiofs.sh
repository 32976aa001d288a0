#!/usr/bin/env bash
# berth-vmm's virtio-fs device against a real virtiofsd, end to end in the KVM box (run.sh).
#
# In the box, virtiofsd serves DIR/share; berth-vmm boots our kernel with a busybox initramfs
# and `--share host=SOCKET`; the guest's /init mounts tag `host`, prints the file the host
# wrote, writes one back, and reboots (reboot=t: the VMM exits 0 on the reset). Back on the
# host, the guest's file must be in DIR/share with the expected content. A second share whose
# backend is not there must leave only that device broken: the VM boots and a mount of its tag
# fails at once instead of hanging.
#
# Usage: tests/kvm-box/vmm-virtiofs.sh
#   BERTH_KVM_BOX_KERNEL  the kernel for both L1 and the guest (default target/berth/vmlinux)
#   BERTH_VIRTIOFSD       virtiofsd to run (default: PATH, then ~/.cargo/bin)
# Exit status: 0 when the round trip worked; non-zero otherwise, with the reason on stderr
# (the logs are kept then).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
kernel=${BERTH_KVM_BOX_KERNEL:-$repo/target/berth/vmlinux}
export BERTH_KVM_BOX_KERNEL=$kernel
[[ -f $kernel ]] || { echo "vmm-virtiofs: no kernel at $kernel (run kernel-config/build.sh)" >&2; exit 2; }
virtiofsd=${BERTH_VIRTIOFSD:-$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")}
[[ -x $virtiofsd ]] || {
  echo "vmm-virtiofs: no virtiofsd (cargo install --locked virtiofsd, or set BERTH_VIRTIOFSD)" >&2
  exit 2
}
busybox=$(command -v busybox || true)
[[ -n $busybox ]] || { echo "vmm-virtiofs: needs busybox-static" >&2; exit 2; }

cargo build --quiet --locked -p berth-vmm --bin berth-vmm
vmm=$repo/target/debug/berth-vmm

out=$(mktemp -d /tmp/berth-vmm-virtiofs.XXXXXX)
trap 'if [[ ${passed:-} == 1 ]]; then rm -rf "$out"; else echo "vmm-virtiofs: logs in $out" >&2; fi' EXIT
mkdir -p "$out/share"
host_text="written by the host $$"
guest_text="written by the guest"
printf '%s\n' "$host_text" >"$out/share/from-host.txt"

# The guest: busybox and an /init that exercises both shares.
root=$out/initramfs
mkdir -p "$root/bin" "$root/proc" "$root/mnt" "$root/missing"
cp "$busybox" "$root/bin/busybox"
cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
echo "guest: init started"
if mount -t virtiofs host /mnt; then
  echo "guest: read from the share: \$(cat /mnt/from-host.txt)"
  echo "$guest_text" >/mnt/from-guest.txt
  sync
  ls -ln /mnt
  umount /mnt && echo "VIRTIOFS_GUEST_OK"
else
  echo "VIRTIOFS_GUEST_MOUNT_FAILED"
fi
mount -t virtiofs missing /missing || echo "VIRTIOFS_MISSING_REFUSED"
reboot -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio --quiet -H newc -o) >"$out/initramfs.cpio"

# Inside the box: virtiofsd on a socket in tmpfs, then the VM; virtiofsd exits by itself when
# its frontend (the VMM) disconnects. `quiet` matters: every console byte is an exit to the VMM,
# and nested under TCG a full boot log alone takes minutes.
cat >"$out/inside.sh" <<INSIDE
#!/bin/sh
socket=/run/tmp/fs.sock
"$virtiofsd" --socket-path \$socket --shared-dir "$out/share" --sandbox none --cache auto \
  --log-level warn 2>"$out/virtiofsd.log" &
virtiofsd_pid=\$!
for _ in \$(seq 100); do [ -S \$socket ] && break; sleep 0.1; done
[ -S \$socket ] || { echo "vmm-virtiofs: virtiofsd did not listen"; cat "$out/virtiofsd.log"; exit 1; }
BERTH_VMM_LOG=berth_vmm=debug timeout 300 "$vmm" --kernel "$kernel" \
  --initramfs "$out/initramfs.cpio" --mem-mib 256 \
  --share host=\$socket --share missing=/run/tmp/missing.sock \
  --cmdline "console=ttyS0 quiet reboot=t panic=-1 rdinit=/init" \
  --console-log "$out/console.log" 2>"$out/vmm.log"
code=\$?
# virtiofsd leaves when its frontend goes; a stuck one is stopped after 10 s.
(sleep 10; kill \$virtiofsd_pid 2>/dev/null) &
watchdog=\$!
wait \$virtiofsd_pid
virtiofsd_code=\$?
kill \$watchdog 2>/dev/null
echo "vmm-virtiofs: berth-vmm exited \$code, virtiofsd \$virtiofsd_code"
cat "$out/console.log"
cat "$out/vmm.log"
exit \$code
INSIDE

status=0
tests/kvm-box/run.sh --out "$out" -- sh "$out/inside.sh" || status=$?

fail() {
  echo "vmm-virtiofs: FAIL: $*" >&2
  exit 1
}
[[ $status -eq 0 ]] || fail "the box run exited $status"
grep -q "guest: read from the share: $host_text" "$out/console.log" ||
  fail "the guest did not read the host's file"
grep -q VIRTIOFS_GUEST_OK "$out/console.log" || fail "the guest did not finish"
grep -q VIRTIOFS_MISSING_REFUSED "$out/console.log" ||
  fail "the guest mounted a share whose backend is missing"
[[ -f $out/share/from-guest.txt ]] || fail "the guest's file is not on the host"
[[ $(cat "$out/share/from-guest.txt") == "$guest_text" ]] ||
  fail "the guest's file has the wrong content: $(cat "$out/share/from-guest.txt")"
passed=1
echo "vmm-virtiofs: PASS: the guest read the host's file and the host sees the guest's"
