#!/usr/bin/env bash
# Builds the busybox test image offline from Debian's busybox-static, byte-for-byte the same
# on every run (sorted entries, mtime 0, owner 0:0, GNU format without PAX timestamps):
#
#   OUT_DIR/busybox.tar      docker-archive (legacy layout: <hex>.json, <hex>/layer.tar,
#                            manifest.json with RepoTags ["busybox:latest"], repositories)
#   OUT_DIR/busybox-oci.tar  OCI image layout (oci-layout, index.json naming
#                            docker.io/library/busybox:latest, blobs/sha256/..., gzip layer)
#   OUT_DIR/busybox.id       the image ID (sha256 of the config)
#
# Usage: tests/images/make-busybox.sh OUT_DIR
# BUSYBOX overrides the binary (default /bin/busybox; `apt-get install busybox-static`).
set -euo pipefail

if (($# != 1)); then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out_dir=$1
busybox=${BUSYBOX:-/bin/busybox}

if [[ ! -x $busybox ]]; then
  echo "make-busybox: $busybox is missing; install it with: apt-get install -y busybox-static" >&2
  exit 1
fi
ldd_output=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
if [[ $ldd_output != *"not a dynamic executable"* ]]; then
  echo "make-busybox: $busybox is dynamically linked; the image needs busybox-static" >&2
  exit 1
fi
for tool in tar jq sha256sum gzip; do
  command -v "$tool" >/dev/null || {
    echo "make-busybox: $tool is required" >&2
    exit 1
  }
done

mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

readonly created=1970-01-01T00:00:00Z
readonly path_env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Every tar this script writes: the same bytes for the same tree.
reproducible_tar() {
  local archive=$1 dir=$2
  shift 2
  tar --create --file="$archive" --directory="$dir" \
    --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
    -- "$@"
}

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

# --- rootfs ---------------------------------------------------------------------------
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,dev,etc,proc,root,sys,tmp,var/www}
cp "$busybox" "$rootfs/bin/busybox"
while read -r applet; do
  [[ -n $applet && $applet != busybox ]] || continue
  ln -s busybox "$rootfs/bin/$applet"
done < <("$busybox" --list | LC_ALL=C sort -u)

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
www-data:x:33:
staff:x:50:root
nogroup:x:65534:
EOF

# Modes do not depend on the caller's umask.
find "$rootfs" -type d -exec chmod 0755 {} +
find "$rootfs" -type f -exec chmod 0644 {} +
chmod 0755 "$rootfs/bin/busybox"
chmod 0700 "$rootfs/root"
chmod 1777 "$rootfs/tmp"

layer=$work/layer.tar
reproducible_tar "$layer" "$rootfs" bin dev etc proc root sys tmp var
diff_id=$(sha256_of "$layer")

# --- config ---------------------------------------------------------------------------
config=$work/config.json
jq -cjn --arg created "$created" --arg path "$path_env" --arg diff "sha256:$diff_id" '{
  architecture: "amd64",
  config: {Cmd: ["sh"], Env: [$path]},
  created: $created,
  history: [{created: $created, created_by: "tests/images/make-busybox.sh"}],
  os: "linux",
  rootfs: {type: "layers", diff_ids: [$diff]}
}' >"$config"
config_id=$(sha256_of "$config")
config_size=$(stat -c %s "$config")

# --- docker-archive (legacy layout) -------------------------------------------------------
docker=$work/docker
mkdir -p "$docker/$diff_id"
cp "$config" "$docker/$config_id.json"
cp "$layer" "$docker/$diff_id/layer.tar"
jq -cn --arg config "$config_id.json" --arg layer "$diff_id/layer.tar" \
  '[{Config: $config, RepoTags: ["busybox:latest"], Layers: [$layer]}]' >"$docker/manifest.json"
jq -cn --arg id "$diff_id" '{busybox: {latest: $id}}' >"$docker/repositories"
find "$docker" -type d -exec chmod 0755 {} +
find "$docker" -type f -exec chmod 0644 {} +
reproducible_tar "$out_dir/busybox.tar" "$docker" \
  "$config_id.json" "$diff_id" manifest.json repositories

# --- OCI image layout (gzip layer) --------------------------------------------------------
oci=$work/oci
blobs=$oci/blobs/sha256
mkdir -p "$blobs"
gzip -9 -n -c "$layer" >"$work/layer.tar.gz"
layer_digest=$(sha256_of "$work/layer.tar.gz")
layer_size=$(stat -c %s "$work/layer.tar.gz")
cp "$work/layer.tar.gz" "$blobs/$layer_digest"
cp "$config" "$blobs/$config_id"
manifest=$work/manifest.json
jq -cjn \
  --arg config "sha256:$config_id" --argjson config_size "$config_size" \
  --arg layer "sha256:$layer_digest" --argjson layer_size "$layer_size" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $config, size: $config_size},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $layer, size: $layer_size}]
}' >"$manifest"
manifest_digest=$(sha256_of "$manifest")
manifest_size=$(stat -c %s "$manifest")
cp "$manifest" "$blobs/$manifest_digest"
printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
jq -cjn --arg digest "sha256:$manifest_digest" --argjson size "$manifest_size" '{
  schemaVersion: 2,
  mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    digest: $digest,
    size: $size,
    platform: {architecture: "amd64", os: "linux"},
    annotations: {
      "io.containerd.image.name": "docker.io/library/busybox:latest",
      "org.opencontainers.image.ref.name": "latest"
    }
  }]
}' >"$oci/index.json"
find "$oci" -type d -exec chmod 0755 {} +
find "$oci" -type f -exec chmod 0644 {} +
reproducible_tar "$out_dir/busybox-oci.tar" "$oci" blobs index.json oci-layout

printf 'sha256:%s\n' "$config_id" >"$out_dir/busybox.id"
echo "make-busybox: busybox:latest sha256:$config_id in $out_dir" >&2
