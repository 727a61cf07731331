#!/usr/bin/env bash
# Install what the toolkit needs on a fresh Debian machine: system packages and a venv.
# Safe to run again: apt and pip skip what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv  # the venv below (minbase Debian has neither; venv needs ensurepip)
    git perl xz-utils dpkg ca-certificates debian-archive-keyring  # tree import, checkpatch
    gcc make flex bison bc libelf-dev libssl-dev cpio rsync ccache distcc  # kernel builds
    git-email libmailtools-perl  # send-series (git send-email needs Mail::Address, a Recommends)
    python3-ply python3-git  # checkpatch.pl's SPDX check
    qemu-system-x86 busybox-static dropbear-bin kexec-tools  # the local QEMU test box
    openssh-client openssh-server  # SSH to boxes; sshd for the SSH-layer tests
    mmdebstrap  # tests/test_fresh_root.py: a fresh Debian root for ci/install.sh
    qemu-utils fdisk socat  # the Debian grub-reboot box: its image, overlays and power button
    public-inbox  # tests/test_review.py: the list archive a maintainer's b4 reads
    dpkg-dev  # the QEMU series' default tree: apt-get source and dpkg-source -x
    ninja-build pkgconf seabios qemu-system-data  # the QEMU series' build and its firmware
    libglib2.0-dev libpcre2-dev zlib1g-dev libmount-dev libblkid-dev libselinux1-dev libsepol-dev  # ... its static libraries
    libslirp-dev ipxe-qemu  # configs/outer-qemu: the pair box's outer QEMU (user networking, its NIC ROM)
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "ci/install.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A venv made without ensurepip has a python but no pip: make it again.
if [[ ! -x .venv/bin/python || ! -x .venv/bin/pip ]]; then
    python3 -m venv --clear .venv
fi
# pip's stderr is noisy here (local index warnings); show it only when pip fails.
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
# editable_mode=compat: a plain path entry in a .pth; the default import-hook finder costs every
# invoke start-up ~12 ms (more where bytecode is not written).
if ! .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat \
    2>"$pip_log"; then
    cat "$pip_log" >&2
    exit 1
fi
# An editable install leaves the toolkit's own modules uncompiled, and with PYTHONDONTWRITEBYTECODE
# set (as on these machines) every run would compile them again: compile them once, as pip does
# for the packages it installs.
.venv/bin/python -m compileall -q kseries tasks.py >/dev/null
