#!/bin/bash
# Control-machine side: build the .gpukit/ bundle that tests/gpu/kit.sh installs on a GPU machine.
#   bash tests/gpu/make_kit.sh WORKDIR
# WORKDIR gets vllm-0.25.0 (the real wheel from PyPI), the 24 wheels that wheels.txt (beside this
# script: tests/gpu/wheels.txt; the WHEELS_TXT environment variable names another list) marks
# [R]/[RT], and bundle.tar (vllm's files as tar.xz + its FA2 kernel library as .xz) split into
# parts of at most 58 MiB, because a device call carries at most 64 MiB; and debs/: Debian 12's systemd 252
# and what it needs (~6 MB), for the systemd mode (tests/gpu/systemd/sysd.sh runs it on the GPU machine).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WHEELS_TXT=$(realpath "${WHEELS_TXT:-$HERE/wheels.txt}")
W=${1:?workdir}; mkdir -p "$W"/dl "$W"/w "$W"/whl "$W"/bundle
cd "$W"
python3 -m pip download -q vllm==0.25.0 --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d dl
PL="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64"
grep -v '^#' "$WHEELS_TXT" | grep '\[R' | awk '{print $1}' | while read -r r; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PL -d whl "$r"
done
(cd w && unzip -qo ../dl/vllm-0.25.0-*.whl && mv vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so ../bundle/)
# two streams so both compress in parallel; xz -9 (179 MB as one default tar.xz before)
(cd w && tar -cf - vllm vllm-0.25.0.dist-info | xz -9 -T1 > ../bundle/vllm-nofa2.tar.xz) &
xz -9 -T1 bundle/_vllm_fa2_C.abi3.so &
wait
(cd bundle && sha256sum vllm-nofa2.tar.xz _vllm_fa2_C.abi3.so.xz > SHA256SUMS && tar -cf ../bundle.tar vllm-nofa2.tar.xz _vllm_fa2_C.abi3.so.xz SHA256SUMS)
sha256sum bundle.tar | cut -d' ' -f1 > bundle.sha256
split -b 58M -d -a 1 bundle.tar part.
SYSTEMD_DEBS="systemd libsystemd-shared libapparmor1 libkmod2 libip4tc2 libcryptsetup12 libseccomp2 \
  libdevmapper1.02.1 libargon2-1 libjson-c5 dbus dbus-bin dbus-daemon dbus-system-bus-common libdbus-1-3 libexpat1"
mkdir -p debs && (cd debs && apt-get download $SYSTEMD_DEBS)
ls -la part.* whl debs | head -60
