#!/usr/bin/env bash
# Builds the Berth guest kernel from Debian's linux-source-6.12 and the fragments beside this
# script: `make allnoconfig`, merge fragments/*.cfg, `make olddefconfig`, then check that every
# requested option survived (a typo or an unmet dependency fails the build instead of silently
# dropping the option), then build vmlinux and bzImage.
#
# Results are cached outside the repo, keyed by the source package version, the fragments and
# this script: ${BERTH_CACHE_DIR:-~/.cache/berth}/kernel/<key>/. A cached key skips the build.
# Output: ${BERTH_ASSETS_DIR:-<repo>/target/berth}/{vmlinux,bzImage,kernel.release,kernel.config}
#
# Usage: build.sh [--check-only]
#   --check-only  merge and check the configuration only (about a minute), no build, no assets.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
assets=${BERTH_ASSETS_DIR:-$repo/target/berth}
cache_root=${BERTH_CACHE_DIR:-$HOME/.cache/berth}/kernel
source_pkg=linux-source-6.12
source_tar=/usr/src/$source_pkg.tar.xz
build_pkgs=("$source_pkg" flex bison bc libelf-dev libssl-dev cpio make gcc)
artefacts=(vmlinux bzImage kernel.release config)

log() { echo "kernel-config: $*" >&2; }
die() {
  log "$*"
  exit 1
}

check_only=false
case "${1:-}" in
  "") ;;
  --check-only) check_only=true ;;
  -h | --help)
    sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
  *) die "unknown argument: $1 (usage: build.sh [--check-only])" ;;
esac

# --- Prerequisites -------------------------------------------------------------------------

missing=()
for pkg in "${build_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if [[ ! -f $source_tar || ${#missing[@]} -gt 0 ]]; then
  [[ -f $source_tar ]] || log "$source_tar is missing"
  die "missing packages; install them with: apt-get install -y ${missing[*]:-$source_pkg}"
fi

shopt -s nullglob
fragments=("$here"/fragments/*.cfg)
shopt -u nullglob
((${#fragments[@]} > 0)) || die "no fragments in $here/fragments"
# Sorted by name, independent of the locale, so the key and the merge order are stable.
mapfile -t fragments < <(printf '%s\n' "${fragments[@]}" | LC_ALL=C sort)

# --- Cache key -----------------------------------------------------------------------------

source_version=$(dpkg-query -W -f='${Version}' "$source_pkg")
key=$(
  {
    printf 'source %s %s\n' "$source_pkg" "$source_version"
    for f in "${fragments[@]}"; do
      printf 'fragment %s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
    done
    printf 'build.sh %s\n' "$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)"
  } | sha256sum | cut -d' ' -f1
)
out=$cache_root/$key

is_cached() {
  local a
  for a in "${artefacts[@]}"; do
    [[ -f $out/$a ]] || return 1
  done
  [[ -f $out/done ]]
}

install_assets() {
  mkdir -p "$assets"
  local pair dst
  for pair in vmlinux:vmlinux bzImage:bzImage kernel.release:kernel.release config:kernel.config; do
    dst=$assets/${pair#*:}
    # Copies, not hard links: a later write to an asset must not change the cache. Through a
    # temporary name so that a reader never sees a half-written file.
    install -m 0644 "$out/${pair%%:*}" "$dst.tmp.$$"
    mv -f "$dst.tmp.$$" "$dst"
  done
  log "kernel $(cat "$out/kernel.release") (cache key ${key:0:12})"
  echo "$assets"
}

if ! $check_only && is_cached; then
  install_assets
  exit 0
fi

# --- Configure -----------------------------------------------------------------------------

mkdir -p "$cache_root"
# One build at a time on this machine (each wants all cores and ~2 GB of disk); a second
# caller waits here and then usually finds the first one's result in the cache.
exec 9>"$cache_root/.lock"
flock 9
if ! $check_only && is_cached; then
  install_assets
  exit 0
fi
# Scratch trees of earlier, interrupted or superseded builds (we hold the lock).
rm -rf "$cache_root"/build-* "$cache_root"/tmp-*

build=$cache_root/build-$key
build_log=$cache_root/build-$key.log
cleanup() { rm -rf "$build"; }
trap cleanup EXIT

log "unpacking $source_pkg $source_version"
mkdir -p "$build"
tar -xf "$source_tar" -C "$build" --strip-components=1

kmake() {
  make -C "$build" ARCH=x86_64 \
    KBUILD_BUILD_USER=berth KBUILD_BUILD_HOST=berth \
    KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 1970' \
    "$@" </dev/null
}

log "configuring (allnoconfig + ${#fragments[@]} fragments + olddefconfig)"
: >"$build_log"
kmake allnoconfig >>"$build_log" 2>&1 || die "make allnoconfig failed, see $build_log"
(cd "$build" && scripts/kconfig/merge_config.sh -m .config "${fragments[@]}") >>"$build_log" 2>&1 ||
  die "merge_config.sh failed, see $build_log"
kmake olddefconfig >>"$build_log" 2>&1 || die "make olddefconfig failed, see $build_log"

# --- Check ---------------------------------------------------------------------------------

# Every `CONFIG_X=v` and `# CONFIG_X is not set` line of every fragment must appear verbatim in
# the final .config. Any other non-comment line in a fragment is an error too.
declare -A want=() origin=()
bad=0
for f in "${fragments[@]}"; do
  name=$(basename "$f")
  n=0
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    if [[ $line =~ ^CONFIG_([A-Za-z0-9_]+)=(.+)$ ]]; then
      sym=${BASH_REMATCH[1]}
    elif [[ $line =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      sym=${BASH_REMATCH[1]}
    elif [[ $line =~ ^[[:space:]]*(#.*)?$ ]]; then
      continue
    else
      log "$name:$n: not a Kconfig line: $line"
      bad=1
      continue
    fi
    if [[ -n ${want[$sym]:-} && ${want[$sym]} != "$line" ]]; then
      log "CONFIG_$sym: ${origin[$sym]} asks for '${want[$sym]}', $name:$n for '$line'"
      bad=1
    fi
    want[$sym]=$line
    origin[$sym]=$name:$n
  done <"$f"
done

declare -A have=()
while IFS= read -r line; do
  if [[ $line =~ ^CONFIG_([A-Za-z0-9_]+)= || $line =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    have[${BASH_REMATCH[1]}]=$line
  fi
done <"$build/.config"

for sym in $(printf '%s\n' "${!want[@]}" | LC_ALL=C sort); do
  if [[ ${have[$sym]:-} != "${want[$sym]}" ]]; then
    log "CONFIG_$sym (${origin[$sym]}): wanted '${want[$sym]}', got '${have[$sym]:-absent (unknown symbol or unmet dependency)}'"
    bad=1
  fi
done
((bad == 0)) || die "configuration check failed; fix the fragments above"
log "configuration check passed: ${#want[@]} options"

if $check_only; then
  rm -f "$build_log"
  exit 0
fi

# --- Build ---------------------------------------------------------------------------------

jobs=$(nproc)
log "building vmlinux bzImage with -j$jobs (log: $build_log)"
start=$SECONDS
if ! kmake -j"$jobs" vmlinux bzImage >>"$build_log" 2>&1; then
  tail -n 40 "$build_log" >&2
  die "kernel build failed, full log: $build_log"
fi
log "built in $((SECONDS - start)) s"

staging=$(mktemp -d "$cache_root/tmp-$key.XXXXXX")
chmod 0755 "$staging"
cp "$build/vmlinux" "$staging/vmlinux"
cp "$build/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$build/.config" "$staging/config"
kmake -s kernelrelease >"$staging/kernel.release"
cp "$build_log" "$staging/build.log"
chmod a-w "$staging"/*
touch "$staging/done"
rm -rf "$out"
mv -T "$staging" "$out"
rm -f "$build_log"

install_assets
