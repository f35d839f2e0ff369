"""vsock helpers for the tests: a static client/server for Linux guests, the host's side of a guest's connection,
the host's AF_VSOCK connect timeout, and a vhost-vsock device on a free CID.

`vsockt connect CID PORT MSG` sends MSG and prints `VSOCK-REPLY:<reply>`;
`vsockt listen PORT` prints `VSOCK-LISTENING`, accepts one connection,
answers "pong:" and what it read, and prints `VSOCK-SERVED:<what it read>`.
It is built on the host with gcc (`build_vsock_client`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

SO_VM_SOCKETS_CONNECT_TIMEOUT = 6  # <linux/vm_sockets.h> (named _OLD since 5.14): a struct timeval


def set_connect_timeout(sock: socket.socket, seconds: int) -> None:
    """How long connect() waits for the peer's answer (the kernel's default is 2 s).

    Through libc: Python's setsockopt passes a u64 for every AF_VSOCK
    option, and this one takes a 16-byte struct timeval.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    tv = struct.pack("qq", seconds, 0)
    if libc.setsockopt(sock.fileno(), socket.AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, tv, len(tv)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"SO_VM_SOCKETS_CONNECT_TIMEOUT: {os.strerror(err)}")

VSOCK_CLIENT_C = r"""
#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* vsockt connect CID PORT MSG: send MSG, print the reply.
   vsockt listen PORT: accept one connection, answer "pong:" + what it read. */
int main(int argc, char **argv) {
    char buf[256];
    struct sockaddr_vm a = {0};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0), n;
    if (s < 0) { perror("socket"); return 1; }
    a.svm_family = AF_VSOCK;
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        a.svm_cid = atoi(argv[2]); a.svm_port = atoi(argv[3]);
        if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        write(s, argv[4], strlen(argv[4]));
        n = read(s, buf, sizeof buf - 1);
        if (n < 0) { perror("read"); return 1; }
        buf[n] = 0; printf("VSOCK-REPLY:%s\n", buf);
    } else if (argc == 3 && !strcmp(argv[1], "listen")) {
        int c;
        a.svm_cid = VMADDR_CID_ANY; a.svm_port = atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) { perror("bind"); return 1; }
        printf("VSOCK-LISTENING\n"); fflush(stdout);
        c = accept(s, 0, 0);
        if (c < 0) { perror("accept"); return 1; }
        n = read(c, buf, sizeof buf - 1);
        if (n < 0) { perror("read"); return 1; }
        buf[n] = 0; write(c, "pong:", 5); write(c, buf, n);
        printf("VSOCK-SERVED:%s\n", buf);
        close(c);
    } else { fprintf(stderr, "usage\n"); return 2; }
    close(s);
    return 0;
}
"""


def build_vsock_client(workdir: Path) -> Path | None:
    """The static binary, or None without gcc or a static libc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    src = workdir / "vsockt.c"
    src.write_text(VSOCK_CLIENT_C)
    out = workdir / "vsockt"
    proc = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(out), str(src)], capture_output=True)
    return out if proc.returncode == 0 else None


def serve_one(listener: socket.socket, timeout: float, got: list[bytes]) -> threading.Thread:
    """In a thread: accept one connection on `listener` within `timeout` s, append what the guest
    sent to `got` and answer "host-says:" and it."""
    def serve() -> None:
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(60)
            data = conn.recv(256)
            got.append(data)
            conn.sendall(b"host-says:" + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def vhost_device_on_a_free_cid(base: int):
    """A `VhostVsockDevice` on a CID no other VM on this host holds: one of 16 derived from `base` and our pid."""
    from kvmpy.devices.virtio.vsock import VhostVsockDevice
    from kvmpy.errors import VsockCidInUseError

    first = base + (os.getpid() & 0xFFFF) * 16
    for cid in range(first, first + 16):
        try:
            return VhostVsockDevice(cid)
        except VsockCidInUseError:
            continue
    pytest.skip(f"guest CIDs {first:#x}..{first + 15:#x} are all taken on this host")
