#!/usr/bin/env bash
# Fetches and caches what the guest test (tests/guest.rs) needs, by package name from the
# distribution's package registry, without installing anything that conflicts with the host:
#
#   - QEMU's system emulator: downloaded and unpacked into the cache, never installed (the
#     qemu-system-common package would replace the host's newer qemu-storage-daemon); only its
#     shared-library dependencies are installed, and those do not conflict.
#   - A Debian 6.1 guest kernel: unpacked; the ELF vmlinux is cut out of the bzImage (it boots
#     directly through its PVH note, with no decompression under emulation).
#   - busybox-static and fio (fio is installed on the host so its library closure can be
#     copied into the initramfs).
#
# Prints the cache directory on its last line. A second run finds the stamp and reuses it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${BLKPLANE_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blkplane-guest}
# The stamp covers this script and the guest's init: editing either rebuilds the cache.
stamp=$(cat "$0" "$here/guest-init.sh" | sha256sum | cut -c1-16)
if [ -f "$cache/ready-$stamp" ]; then
    echo "$cache"
    exit 0
fi

log() { echo "guest-assets: $*" >&2; }
rm -rf "$cache"
mkdir -p "$cache/debs" "$cache/root"
cd "$cache/debs"

apt_get() {
    if ! DEBIAN_FRONTEND=noninteractive apt-get "$@" >&2; then
        log "apt-get $1 failed; refreshing the package lists once"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get "$@" >&2
    fi
}

kernel_pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -n1)
if [ -z "$kernel_pkg" ]; then
    apt-get update >&2
    kernel_pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -n1)
fi
[ -n "$kernel_pkg" ] || { log "no linux-image-6.1.0-*-amd64 package found"; exit 1; }
log "downloading qemu-system-x86, seabios, busybox-static and $kernel_pkg"
apt_get download qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu busybox-static "$kernel_pkg"

# QEMU's libraries (not QEMU itself), and fio.
qemu_libs=$(apt-cache depends --no-recommends --no-suggests --no-pre-depends qemu-system-x86 qemu-system-common \
    | awk '/Depends:/ {print $2}' | grep -v -E '^(qemu-|seabios|ipxe|<)' | sort -u)
log "installing QEMU's shared libraries, fio, cpio and xz"
# shellcheck disable=SC2086
apt_get install -y --no-install-recommends $qemu_libs fio cpio xz-utils

mkdir -p "$cache/qemu" "$cache/kernel"
for deb in qemu-system-x86_*.deb qemu-system-common_*.deb qemu-system-data_*.deb seabios_*.deb ipxe-qemu_*.deb; do
    dpkg-deb -x "$deb" "$cache/qemu"
done
dpkg-deb -x linux-image-*.deb "$cache/kernel"
dpkg-deb -x busybox-static_*.deb "$cache/busybox"

qemu="$cache/qemu/usr/bin/qemu-system-x86_64"
missing=$(QEMU_MODULE_DIR="$cache/qemu/usr/lib/x86_64-linux-gnu/qemu" ldd "$qemu" | grep 'not found' || true)
[ -z "$missing" ] || { log "QEMU still lacks libraries: $missing"; exit 1; }

# vmlinux: the xz stream inside the bzImage, decompressed once here.
vmlinuz=$(ls "$cache"/kernel/boot/vmlinuz-*)
offset=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(b"\xfd7zXZ\x00"))' "$vmlinuz")
[ "$offset" -ge 0 ] || { log "no xz stream in $vmlinuz"; exit 1; }
tail -c +$((offset + 1)) "$vmlinuz" > "$cache/vmlinux.xz"
xz -dc --single-stream "$cache/vmlinux.xz" > "$cache/vmlinux"
rm -f "$cache/vmlinux.xz"
[ "$(head -c 4 "$cache/vmlinux" | tail -c 3)" = ELF ] || { log "could not extract vmlinux"; exit 1; }

# The initramfs: busybox, the virtio modules, fio with every library it loads, and /init.
root="$cache/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$cache/busybox/bin/busybox" "$root/bin/busybox"
ln -sf busybox "$root/bin/sh"
moddir=$(ls -d "$cache"/kernel/lib/modules/*)
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk; do
    cp "$moddir/kernel/$m.ko" "$root/lib/modules/"
done
cp "$(command -v fio)" "$root/bin/fio"
for lib in $(ldd "$(command -v fio)" | grep -oE '/[^ ]+\.so[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp "$here/guest-init.sh" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$cache/initramfs.cpio"

touch "$cache/ready-$stamp"
log "ready: $(du -sh "$cache/initramfs.cpio" | cut -f1) initramfs"
echo "$cache"
