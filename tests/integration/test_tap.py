"""Real TAP interfaces through /dev/net/tun and pyroute2: created, addressed, up, bridged, removed, cleaned up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import IPRoute

from kvmpy.net.tap import VNET_HDR_SIZE, Tap, cleanup_stale_taps, link_exists

pytestmark = pytest.mark.skipif(not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
                                reason="needs /dev/net/tun and CAP_NET_ADMIN (root)")


def link(name: str):
    with IPRoute() as ipr:
        (msg,) = ipr.get_links(ifname=name)
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=msg["index"])
                 if a["family"] == socket.AF_INET]
        return msg, addrs


def test_tap_is_created_addressed_and_up():
    with Tap(host_address="172.31.250.1/24") as tap:
        assert tap.name.startswith(f"kvmpy{os.getpid()}-")
        msg, addrs = link(tap.name)
        assert msg.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN") and msg["flags"] & 1  # IFF_UP
        assert ("172.31.250.1", 24) in addrs
        assert msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "tun"


def test_tap_is_removed_on_close():
    tap = Tap()
    name = tap.name
    assert link_exists(name)
    tap.close()
    assert not link_exists(name)


def test_named_tap_and_bridge_master():
    br = f"kvmbr{os.getpid() % 100000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=br, kind="bridge")
    try:
        with Tap(f"kvmpyt{os.getpid() % 100000}", bridge=br) as tap:
            msg, _ = link(tap.name)
            with IPRoute() as ipr:
                assert msg.get_attr("IFLA_MASTER") == ipr.link_lookup(ifname=br)[0]
    finally:
        with IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=br)[0])


def test_missing_bridge_is_a_clear_error():
    with pytest.raises(OSError, match="no such interface"):
        Tap(bridge="kvmpy-nobridge")


def test_frames_carry_a_12_byte_vnet_header():
    """What the guest sends (header + frame) leaves the host side as a frame the kernel accepts."""
    assert VNET_HDR_SIZE == 12
    with Tap(host_address="172.31.251.1/24") as tap:
        # A broadcast ARP request from the "guest" MAC; the host answers with an ARP reply.
        mac = bytes.fromhex("525400aabbcc")
        arp = (b"\xff" * 6 + mac + b"\x08\x06" + bytes.fromhex("0001080006040001") + mac
               + socket.inet_aton("172.31.251.2") + bytes(6) + socket.inet_aton("172.31.251.1"))
        os.write(tap.fd, bytes(12) + arp)
        import select
        import time
        deadline = time.monotonic() + 5
        reply = b""
        while time.monotonic() < deadline:
            if select.select([tap.fd], [], [], 0.5)[0]:
                pkt = os.read(tap.fd, 2048)
                if pkt[12 + 12:12 + 14] == b"\x08\x06" and pkt[12 + 20:12 + 22] == b"\x00\x02":
                    reply = pkt
                    break
        assert reply, "no ARP reply from the host through the TAP"
        assert reply[12:18] == mac  # addressed to the guest, after the 12-byte header


def test_stale_tap_of_a_crashed_process_is_removed_on_next_start():
    """A child creates a persistent kvmpy<pid>-0 and dies without cleaning up; cleanup finds it."""
    script = textwrap.dedent("""
        import os
        from kvmpy.net.tap import Tap
        t = Tap(persist=True)
        print(t.name, flush=True)
        os._exit(1)   # a crash: no close(), no atexit
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    name = proc.stdout.strip()
    assert name.startswith("kvmpy"), proc.stderr
    assert link_exists(name)  # persistent: it outlived its process
    removed = cleanup_stale_taps()
    assert name in removed and not link_exists(name)


def test_cleanup_leaves_live_processes_taps_alone():
    with Tap() as tap:
        assert tap.name not in cleanup_stale_taps()
        assert link_exists(tap.name)


def test_make_devices_creates_and_removes_the_tap():
    from kvmpy.machine import MachineConfig, NetConfig, make_devices

    (net,) = make_devices(MachineConfig(kernel=None, nets=[NetConfig(None, "52:54:00:00:00:09", "172.31.252.1/24")]))
    name = net.owner.name
    assert link_exists(name) and net.mac == bytes.fromhex("525400000009")
    net.close()
    assert not link_exists(name)


def test_generated_names_wrap_instead_of_outgrowing_ifnamsiz(monkeypatch):
    """scripts/soak.py found it: after 10,000 TAPs a 5-digit pid's next name was 16 bytes and every Tap() failed."""
    import itertools

    from kvmpy.net import tap as tap_module

    prefix = f"kvmpy{os.getpid()}-"
    limit = 10 ** (15 - len(prefix))
    monkeypatch.setattr(tap_module, "_counter", itertools.count(limit - 1))
    names = [tap_module.generated_name() for _ in range(2)]
    assert names == [f"{prefix}{limit - 1}", f"{prefix}0"]
    with Tap() as t:  # and a TAP is made with the wrapped name
        assert len(t.name) <= 15 and t.name == f"{prefix}1"
