#!/bin/sh
# Installs the Debian packages kvmpy needs on a fresh machine: a compiler,
# Python headers and the kernel's uapi headers (linux-libc-dev: <linux/kvm.h>,
# <linux/vhost.h>) for the cffi bindings, binutils for tiny test guests, and
# what the guest kernel build needs (Debian's linux-source, busybox-static,
# flex, bison, bc, libelf, libssl), libseccomp2 for the jail (pyseccomp loads it) and strace
# (scripts/jail_syscalls.py measures the jail's allow-list with it). Skips apt when everything is present.
set -eu
pkgs="python3 python3-venv python3-dev gcc linux-libc-dev make binutils linux-source busybox-static \
flex bison bc libelf-dev libssl-dev cpio xz-utils e2fsprogs iproute2 libseccomp2 strace"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "kvmpy: installing Debian packages:$missing"
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing
