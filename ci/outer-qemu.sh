#!/usr/bin/env bash
# The outer QEMU of the nested pair box (local-pair): QEMU 10.2.2 from the embedded QEMU tree,
# built with TCG, with patches/outer-qemu/ applied. Debian's qemu-system-x86 (7.2) and a plain
# 10.2.2 both carry the TCG nested-SVM bug that patch fixes: an interrupt L1 injects through
# EVENTINJ is delivered twice, the second time inside L2's handler with IF=0, and L2 hangs on
# its own lock after 0-180 MEM toggles. Safe to run again (and twice at once: a lock); prints
# the [box.local-pair.qemu] lines for configs/local.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kseries
out=$cache/outer-qemu
tree=$cache/default-tree-qemu/qemu
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

[ -d "$tree/.git" ] || .venv/bin/invoke prepare --series qemu >&2
patches=(patches/outer-qemu/*.diff)
stamp=$( (git -C "$tree" rev-parse master; cat "${patches[@]}") | sha256sum | cut -c1-16)
if [ "$(cat "$out/src.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$out/src" "$out/src.stamp"
    git -C "$tree" worktree prune
    git -C "$tree" worktree add -q -f --detach "$out/src" master >&2
    for p in "${patches[@]}"; do git -C "$out/src" apply "$root/$p"; done
    echo "$stamp" > "$out/src.stamp"
fi
if [ ! -f "$out/build/build.ninja" ]; then
    rm -rf "$out/build" && mkdir -p "$out/build"
    (cd "$out/build" && "$out/src/configure" --python="$root/.venv/bin/python3" \
        --target-list=x86_64-softmmu --enable-tcg --enable-kvm --enable-slirp --disable-docs \
        --disable-werror --disable-download --disable-debug-info --disable-install-blobs \
        --cc="ccache gcc") > "$out/configure.log" 2>&1 ||
        { tail -n 20 "$out/configure.log" >&2; exit 1; }
fi
nice -n 5 ninja -C "$out/build" qemu-system-x86_64 > "$out/ninja.log" 2>&1 ||
    { grep -m 5 -B 2 -A 5 'error' "$out/ninja.log" >&2; exit 1; }
mkdir -p "$out/firmware"
for f in /usr/share/seabios/bios-256k.bin /usr/lib/ipxe/qemu/efi-virtio.rom \
         /usr/share/qemu/kvmvapic.bin /usr/share/qemu/linuxboot_dma.bin; do
    ln -sf "$f" "$out/firmware/"
done
cat <<TOML
[box.local-pair.qemu]
binary = "$out/build/qemu-system-x86_64"
extra_args = ["-L", "$out/firmware", "-machine", "q35", "-device", "intel-iommu,intremap=on", "-device", "edu"]
TOML
