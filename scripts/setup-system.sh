#!/bin/bash
# Install the Debian 12 packages the tests, the demo and the benchmarks need (run as root).
# Skips apt entirely when every package is already installed, so reruns stay fast and work offline.
set -euo pipefail

PACKAGES=(
  containerd runc docker-registry skopeo umoci busybox-static   # real services and test images
  erofs-utils fuse3 libfuse3-dev pkg-config                      # EROFS / FUSE backends
  debootstrap iproute2 stargz-snapshotter                        # realistic images, tc, ctr-remote
  apache2-utils                                                  # htpasswd for the auth-registry tests
  gcc python3-dev python3-venv                                   # building pyfuse3, the venv
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup-system: all ${#PACKAGES[@]} packages present, skipping apt"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-system: missing packages (${missing[*]}); run as root or: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "setup-system: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null
