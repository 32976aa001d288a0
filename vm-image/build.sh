#!/usr/bin/env bash
# Builds the guest image: the statically linked berth-agent as /init in a reproducible,
# uncompressed newc initramfs. Output: ${BERTH_ASSETS_DIR:-<repo>/target/berth}/initramfs.cpio
#
# Reproducible: the agent is built with paths remapped (no checkout or home directory in the
# binary) and stripped; the archive has fixed owners, inode numbers and mtimes
# (SOURCE_DATE_EPOCH, default 0). The same sources give the same bytes.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
assets=${BERTH_ASSETS_DIR:-$repo/target/berth}
target=x86_64-unknown-linux-gnu
cargo_home=${CARGO_HOME:-$HOME/.cargo}
mkdir -p "$assets"

cd "$repo"
# --target keeps RUSTFLAGS off build scripts and proc-macros, which must stay dynamic.
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$repo=/berth --remap-path-prefix=$cargo_home=/cargo" \
  cargo build --quiet --release --locked -p berth-agent --target "$target"
agent=$repo/target/$target/release/berth-agent
if ! file "$agent" | grep -Eq 'statically linked|static-pie linked'; then
  echo "vm-image: $agent is not statically linked" >&2
  exit 1
fi

cargo run --quiet --release --locked -p berth-vm-image --bin berth-mkinitramfs -- \
  --init "$agent" --output "$assets/initramfs.cpio" --mtime "${SOURCE_DATE_EPOCH:-0}" >/dev/null
echo "$assets/initramfs.cpio"
