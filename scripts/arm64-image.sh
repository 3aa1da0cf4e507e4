#!/usr/bin/env bash
# Build the Raspberry Pi (linux/arm64) image from Dockerfile.arm64 on this x86 machine with podman
# under qemu-user-static, then run the bundle's own `run.py verify` and `run.py bench` inside it.
#
#   scripts/arm64-image.sh [BUNDLE]     (default edgec-out/rpi/bundle; built with the quick start if absent)
#
# Environment: REQUIREMENTS (default targets/rpi-device-requirements.txt), TAG (default edgec-rpi),
# WORK (debootstrap folder, default /var/tmp/edgec-arm64), BASE (an arm64 Debian bookworm image to
# build on; default: pull debian:bookworm-slim, else make one offline from Debian's packages).
#
# The offline route: where no container registry is reachable, debootstrap makes a minimal arm64
# bookworm root from deb.debian.org (its second stage runs under qemu), `podman import` tags it
# locally, and the Dockerfile builds on it (`--build-arg BASE=`). Needs root (binfmt_misc, chroot).
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=${1:-edgec-out/rpi/bundle}
REQUIREMENTS=${REQUIREMENTS:-targets/rpi-device-requirements.txt}
TAG=${TAG:-edgec-rpi}
WORK=${WORK:-/var/tmp/edgec-arm64}
LOCAL_BASE=localhost/edgec-debian-arm64:bookworm

# Sandboxed hosts (cgroup v1 with a v2 "unified" mount; a hard cap on setrlimit) trip podman's
# defaults: crun refuses hybrid cgroups, and the container's default ulimits exceed what the host lets
# it set. runc with cgroupfs and modest limits run on those hosts and on ordinary ones alike.
PODMAN=(podman --cgroup-manager=cgroupfs)
if command -v runc >/dev/null; then PODMAN+=(--runtime runc); fi
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

die() { echo "arm64-image: $*" >&2; exit 2; }
step() { echo "==> $*"; }

check_arguments() {
  case "$BUNDLE" in /*|../*|*/../*|..) die "BUNDLE must be a folder inside the repository (the build context): $BUNDLE";; esac
  [ -f "$REQUIREMENTS" ] || die "no requirements file $REQUIREMENTS: use one of targets/rpi-device-requirements*.txt"
}

check_tools() {
  command -v podman >/dev/null || die "podman is missing: apt-get install podman runc"
  command -v qemu-aarch64-static >/dev/null || die "qemu-user-static is missing: apt-get install qemu-user-static"
  [ "$(id -u)" = 0 ] || die "run as root: the arm64 binfmt handler and debootstrap's chroot need it"
}

# qemu-user runs arm64 binaries only once the kernel's binfmt_misc knows the handler.
enable_binfmt() {
  [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "could not register qemu-aarch64 with binfmt_misc (update-binfmts --enable qemu-aarch64)"
}

make_offline_base() {
  command -v debootstrap >/dev/null || die "no registry reachable and debootstrap is missing: apt-get install debootstrap"
  local root=$WORK/rootfs
  if [ ! -x "$root/usr/bin/apt-get" ]; then
    step "debootstrap: minimal Debian bookworm arm64 in $root (second stage under qemu, minutes)"
    rm -rf "$root.tmp" && mkdir -p "$WORK"
    debootstrap --arch=arm64 --variant=minbase --foreign bookworm "$root.tmp" http://deb.debian.org/debian >/dev/null
    chroot "$root.tmp" /debootstrap/debootstrap --second-stage >/dev/null
    rm -rf "$root.tmp"/var/cache/apt/archives/*.deb "$root.tmp"/var/lib/apt/lists/*
    mv "$root.tmp" "$root"   # only a finished root is ever reused
  fi
  step "podman import $LOCAL_BASE"
  tar -C "$root" -c . | "${PODMAN[@]}" import --arch arm64 --os linux - "$LOCAL_BASE" >/dev/null
}

choose_base() {
  if [ -n "${BASE:-}" ]; then return; fi
  if "${PODMAN[@]}" image exists "$LOCAL_BASE"; then BASE=$LOCAL_BASE; return; fi
  step "pulling debian:bookworm-slim for linux/arm64"
  if timeout 120 "${PODMAN[@]}" pull -q --platform linux/arm64 docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
    BASE=docker.io/library/debian:bookworm-slim
  else
    echo "no container registry reachable: making the base image from Debian's packages (offline route)"
    make_offline_base
    BASE=$LOCAL_BASE
  fi
}

ensure_bundle() {
  [ -f "$BUNDLE/manifest.json" ] && return
  [ "$BUNDLE" = edgec-out/rpi/bundle ] || die "no bundle at $BUNDLE (no manifest.json there)"
  step "no bundle yet: building the quick start (edgec build --target rpi)"
  local edgec=edgec; [ -x .venv/bin/edgec ] && edgec=.venv/bin/edgec
  "$edgec" build --target rpi
}

# The runtimes' cpuinfo library crashes on the host's (x86) /proc/cpuinfo that qemu-user passes
# through, so the container sees a Raspberry Pi 4's, as edgec/base/emulation.py's userland does.
pi4_cpuinfo() {
  local file=$WORK/pi4-cpuinfo
  mkdir -p "$WORK"
  python3 -c 'import sys; sys.path.insert(0, "."); from edgec.base.emulation import PI4_CPUINFO; print(PI4_CPUINFO, end="")' \
    > "$file" 2>/dev/null || .venv/bin/python -c 'from edgec.base.emulation import PI4_CPUINFO; print(PI4_CPUINFO, end="")' > "$file"
  echo "$file"
}

# The CA bundle this host's pip trusts (a TLS-intercepting proxy's, say), lent to the build's pip.
pip_ca_flags() {
  local ca=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
  [ -n "$ca" ] && [ -f "$ca" ] && echo "-v $ca:/etc/ssl/build-ca.crt:ro --build-arg PIP_CERT=/etc/ssl/build-ca.crt"
  return 0
}

main() {
  check_arguments
  check_tools
  enable_binfmt
  ensure_bundle
  choose_base
  step "podman build $TAG on $BASE (arm64 steps under qemu, minutes)"
  "${PODMAN[@]}" build -q "${LIMITS[@]}" $(pip_ca_flags) --platform linux/arm64 --pull=never -f Dockerfile.arm64 --build-arg "BASE=$BASE" \
    --build-arg "BUNDLE=$BUNDLE" --build-arg "REQUIREMENTS=$REQUIREMENTS" -t "$TAG" . >/dev/null
  local size cpuinfo
  size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
  echo "image $TAG: $((size / 1000000)) MB (linux/arm64, base $BASE)"
  cpuinfo=$(pi4_cpuinfo)
  local run=("${PODMAN[@]}" run --rm "${LIMITS[@]}" --platform linux/arm64 -e QEMU_CPU=cortex-a72 -v "$cpuinfo:/proc/cpuinfo:ro" "$TAG")
  step "run.py verify in the image"
  "${run[@]}" verify
  step "run.py bench in the image (an emulated Cortex-A72: latency is qemu's, not a Pi's)"
  "${run[@]}" bench --runs 20 --min-seconds 1 --no-sweep --batch-sizes 1 --no-write-recommended
}

main
