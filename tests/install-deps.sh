#!/usr/bin/env bash
# Installs what Berth needs to build and test on a fresh Debian 12 machine, and nothing twice:
# Debian packages (QEMU, the kernel source and its build deps, busybox-static for test images,
# skopeo/umoci/docker-registry for image tests). The qemu backend's vsock device, berth-vsock,
# is built from the workspace (host/vmm).
set -euo pipefail

packages=(
  # The qemu backend and the boot benchmark's anchor.
  qemu-system-x86
  # The user-mode network stack behind berth-vmm's virtio-net (the vmm backend's uplink).
  passt
  # Guest kernel source and build dependencies.
  linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio
  # Build checks (static agent) and test images.
  file busybox-static
  # Independent OCI tools that cross-check the image store, and a real registry on loopback.
  skopeo umoci docker-registry
  # htpasswd, for the registry basic-auth test.
  apache2-utils
  # Tier-3 tests: raw API requests over the socket, and a pty for `docker exec -it`.
  curl bsdutils
  # The anchor of `berth bench container`.
  crun
  # The guest's data disk is formatted on the host (mkfs.ext4).
  e2fsprogs
  # virtiofsd (bind mounts) builds against these.
  libcap-ng-dev libseccomp-dev
  # The compose client of the networking tests (docker-compose 1.29, on docker-py), and the
  # UDP echo server of the UDP port-publishing test.
  docker-compose socat
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# docker-py, the SDK the tier-3 tests drive berthd with besides the CLI.
# Debian's own python3 refuses pip installs (PEP 668); its python3-docker package serves then.
if ! python3 -c 'import docker' 2>/dev/null; then
  echo "install-deps: pip install docker" >&2
  python3 -m pip install --quiet docker 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages docker 2>/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-docker >/dev/null
fi

# virtiofsd, the virtio-fs device for bind mounts under the qemu backend (crates.io; Debian 12
# does not package it). Built once into cargo's bin directory, where berthd finds it.
if ! command -v virtiofsd >/dev/null 2>&1 && [[ ! -x ${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd ]]; then
  echo "install-deps: cargo install virtiofsd" >&2
  cargo install --quiet --locked virtiofsd
fi
