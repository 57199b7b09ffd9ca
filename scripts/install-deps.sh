#!/usr/bin/env bash
# Installs every outside tool the tests use, on a fresh Debian 12 machine.
# Idempotent and quiet when everything is present already.
set -euo pipefail

pkgs=(
  # userspace NBD clients and peers (tests/nbd, bench/)
  fio nbdkit qemu-utils libnbd-bin python3-libnbd fuse3 nbd-server nbd-client
  e2fsprogs util-linux
  # kernel VM harness (tests/vm)
  qemu-system-x86 busybox-static kmod xz-utils cpio
  # tests/metrics: a real Prometheus scraping a cluster (prometheus, promtool)
  prometheus
  # vagrant/ syntax check
  ruby
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# tests/vm boots Debian's 6.12 kernel (linux-image-6.12-amd64, from
# bookworm-security): make sure apt can find it.
if ! apt-cache show linux-image-6.12-amd64 >/dev/null 2>&1; then
  apt-get update -qq || true
  if ! apt-cache show linux-image-6.12-amd64 >/dev/null 2>&1; then
    echo "install-deps: adding bookworm-security to the apt sources for the 6.12 kernel"
    echo "deb http://deb.debian.org/debian-security bookworm-security main" \
      >/etc/apt/sources.list.d/blockd-security.list
    apt-get update -qq
  fi
fi
# /dev/fuse for nbdfuse
[ -e /dev/fuse ] || { mknod /dev/fuse c 10 229 2>/dev/null || true; }
go mod download
