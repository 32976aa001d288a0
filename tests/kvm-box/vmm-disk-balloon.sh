#!/usr/bin/env bash
# End-to-end check of berth-vmm's virtio-blk and virtio-balloon in the KVM box.
#
# Boots a busybox initramfs under target/debug/berth-vmm twice with three disks (vda: raw
# read-write, vdb: read-only, vdc: ext2) and the balloon. Run 1 checks the disks' sysfs view
# (size, ro, serial, discard and cache limits), writes patterns with O_DIRECT and fsync, reads
# them back after dropping caches, discards a range (which must read back as zeroes and free the
# host file's blocks), refuses writes to vdb, makes and trims a file system on vdc, checks the
# balloon driver acked free page reporting, then fills and frees 96 MiB of guest memory while the
# box samples the VMM's RSS. Run 2 checks that everything written in run 1 persisted.
#
# Usage: tests/kvm-box/vmm-disk-balloon.sh [--out DIR]
#   Needs target/debug/berth-vmm (cargo build -p berth-vmm) and a guest kernel
#   (BERTH_VMM_KERNEL, default target/berth/vmlinux; it also serves as the box's L1 kernel
#   unless BERTH_KVM_BOX_KERNEL says otherwise).
# Prints CHECK lines; exits non-zero if any check failed or a run did not finish.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kernel=${BERTH_VMM_KERNEL:-$repo/target/berth/vmlinux}
export BERTH_KVM_BOX_KERNEL=${BERTH_KVM_BOX_KERNEL:-$kernel}
vmm=$repo/target/debug/berth-vmm
out=""
# Seconds each VM run may take: L2 runs under nested SVM emulated by TCG, and slowly.
vm_timeout=${BERTH_VM_TIMEOUT:-900}
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
  esac
done
out=${out:-$(mktemp -d /tmp/vmm-disk-balloon.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[[ -x $vmm ]] || { echo "no $vmm (cargo build -p berth-vmm)" >&2; exit 2; }
[[ -f $kernel ]] || { echo "no guest kernel at $kernel" >&2; exit 2; }

# The guest: busybox and an init script, as a newc initramfs.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/mnt" "$root/shm"
cp "$(command -v busybox)" "$root/bin/busybox"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
phase=$(sed -n 's/.*berth\.phase=\([0-9]\).*/\1/p' /proc/cmdline)
check() {
  desc=$1; shift
  if "$@"; then echo "CHECK ok: $desc"; else echo "CHECK FAIL: $desc"; fi
}
MIB=1048576
md5() { md5sum | cut -d' ' -f1; }
region_md5() { dd if=/dev/vda bs=$MIB skip=$1 count=$2 iflag=direct 2>/dev/null | md5; }
zeroes_md5() { dd if=/dev/zero bs=$MIB count=$1 2>/dev/null | md5; }
balloon_dev() {
  for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device")" = 0x0005 ] && echo "$d"
  done
}

if [ "$phase" = 1 ]; then
  check "vda is 64 MiB" [ "$(cat /sys/block/vda/size)" = 131072 ]
  check "vda is writable" [ "$(cat /sys/block/vda/ro)" = 0 ]
  check "vdb is read-only" [ "$(cat /sys/block/vdb/ro)" = 1 ]
  check "vda has a serial ($(cat /sys/block/vda/serial))" [ -n "$(cat /sys/block/vda/serial)" ]
  check "vda discards up to 1 GiB" [ "$(cat /sys/block/vda/queue/discard_max_bytes)" = 1073741824 ]
  check "vda zeroes up to 1 GiB" [ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" = 1073741824 ]
  check "vdb does not discard" [ "$(cat /sys/block/vdb/queue/discard_max_bytes)" = 0 ]
  check "vda has a write-back cache (FLUSH)" [ "$(cat /sys/block/vda/queue/write_cache)" = "write back" ]
  check "vdb reads its content" [ "$(dd if=/dev/vdb bs=16 count=1 2>/dev/null)" = readonly-content ]
  check "vdb refuses writes" sh -c '! dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null'

  dd if=/dev/urandom of=/pattern bs=$MIB count=4 2>/dev/null
  sum=$(md5 </pattern)
  dd if=/pattern of=/dev/vda bs=$MIB seek=8 oflag=direct conv=fsync 2>/dev/null
  echo "$sum" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
  dd if=/pattern of=/dev/vda bs=$MIB seek=16 conv=fsync 2>/dev/null
  sync
  echo 3 >/proc/sys/vm/drop_caches
  check "vda reads back the pattern" [ "$(region_md5 8 4)" = "$sum" ]
  check "vda discards 16-20 MiB" blkdiscard -o $((16 * MIB)) -l $((4 * MIB)) /dev/vda
  check "the discarded range reads zeroes" [ "$(region_md5 16 4)" = "$(zeroes_md5 4)" ]

  check "mke2fs on vdc" mke2fs -q /dev/vdc
  check "mount vdc" mount -t ext4 -o discard /dev/vdc /mnt
  echo persisted-file >/mnt/hello
  dd if=/dev/urandom of=/mnt/junk bs=$MIB count=4 2>/dev/null
  sync
  rm /mnt/junk
  check "fstrim vdc" fstrim /mnt
  check "umount vdc" umount /mnt

  b=$(balloon_dev)
  check "balloon driver bound" [ -e "$b/driver" ]
  # The features file has one character per bit; bit 5 is VIRTIO_BALLOON_F_REPORTING.
  check "balloon acked free page reporting" [ "$(cut -c6 "$b/features")" = 1 ]
  mount -t tmpfs -o size=200m shm /shm
  echo BALLOON-FILL
  dd if=/dev/zero of=/shm/fill bs=$MIB count=96 2>/dev/null
  echo BALLOON-FILLED
  sleep 5
  rm /shm/fill
  echo BALLOON-FREED
  sleep 20
  echo BALLOON-DONE
else
  stored=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000\n')
  check "vda kept the pattern across runs" [ "$(region_md5 8 4)" = "$stored" ]
  check "vda kept the discarded range zero" [ "$(region_md5 16 4)" = "$(zeroes_md5 4)" ]
  check "mount vdc again" mount -t ext4 /dev/vdc /mnt
  check "vdc kept its file" [ "$(cat /mnt/hello)" = persisted-file ]
  umount /mnt
fi
echo "PHASE-$phase-END"
reboot -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$out/initramfs.cpio"

# Runs inside the box (L1): two VM runs on disks in the box's tmpfs.
cat >"$out/inner.sh" <<INNER
#!/bin/bash
set -u
d=\$TMPDIR
truncate -s 64M \$d/a.raw
printf readonly-content >\$d/b.raw
truncate -s 1M \$d/b.raw
truncate -s 32M \$d/c.raw
# exec: the caller samples the VMM's own RSS through \$!.
vm() {
  BERTH_VMM_LOG=info exec timeout $vm_timeout $vmm --kernel $kernel \\
    --initramfs $out/initramfs.cpio --mem-mib 256 \\
    --cmdline "console=ttyS0 reboot=t panic=-1 berth.phase=\$1" \\
    --disk \$d/a.raw --disk \$d/b.raw,ro --disk \$d/c.raw --balloon \\
    --console-log $out/phase\$1.log 2>$out/vmm\$1.err
}
vm 1 &
job=\$!
sleep 1
pid=\$(pgrep -P \$job -f berth-vmm || echo \$job)
while kill -0 \$pid 2>/dev/null; do
  marker=\$(grep -o 'BALLOON-[A-Z]*' $out/phase1.log 2>/dev/null | tail -1)
  echo "\$(date +%s) \$(grep VmRSS /proc/\$pid/status 2>/dev/null | tr -s ' ') \$marker" >>$out/rss.txt
  sleep 1
done
wait \$job; echo "run 1 exit \$?" >>$out/exits.txt
echo "a.raw allocated 512-byte blocks after run 1: \$(stat -c %b \$d/a.raw)" >>$out/exits.txt
(vm 2); echo "run 2 exit \$?" >>$out/exits.txt
INNER
chmod +x "$out/inner.sh"

"$repo/tests/kvm-box/run.sh" --out "$out" -- "$out/inner.sh" >"$out/box.log" 2>&1 || true

cat "$out/exits.txt" 2>/dev/null || true
grep -h CHECK "$out/phase1.log" "$out/phase2.log" 2>/dev/null || true
echo "RSS samples (time, VmRSS, last guest marker):"
cat "$out/rss.txt" 2>/dev/null || true
grep -q PHASE-1-END "$out/phase1.log" 2>/dev/null || { echo "run 1 did not finish" >&2; exit 1; }
grep -q PHASE-2-END "$out/phase2.log" 2>/dev/null || { echo "run 2 did not finish" >&2; exit 1; }
! grep -qh "CHECK FAIL" "$out/phase1.log" "$out/phase2.log"
