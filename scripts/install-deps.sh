#!/bin/sh
# Installs the Debian packages kvmpy needs on a fresh machine: a compiler,
# Python headers and the kernel's uapi headers (linux-libc-dev: <linux/kvm.h>,
# <linux/vhost.h>) for the cffi bindings, binutils for tiny test guests, and
# what the guest kernel build needs (Debian's linux-source, busybox-static,
# flex, bison, bc, libelf, libssl), tmux (the test of `kvmpy stat`'s live view
# drives it in a real terminal), and a virtiofsd for virtio-fs shares (Debian 12
# has QEMU's in qemu-system-common; bookworm's main archive has no Rust
# 'virtiofsd' package). qemu-utils (qemu-img, qemu-io) and strace are the
# independent references of the storage tests (strace also measures the jail's
# allow-list: scripts/jail_syscalls.py); kvmpy does not use them at run time.
# libseccomp2 is the jail's seccomp library (pyseccomp loads it). Skips apt when
# everything is present.
set -eu
pkgs="python3 python3-venv python3-dev gcc linux-libc-dev make binutils linux-source busybox-static \
flex bison bc libelf-dev libssl-dev cpio xz-utils e2fsprogs iproute2 tmux qemu-system-common qemu-utils strace \
libseccomp2"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "kvmpy: installing Debian packages:$missing"
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing
