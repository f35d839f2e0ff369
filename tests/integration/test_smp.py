"""Two vCPUs of one VM, each in its own thread with its own exit loop."""

from __future__ import annotations

import threading

from guests import RecordingPort, add_vcpu
from kvmpy.bus import pio_bus
from kvmpy.exits import HltExit
from kvmpy.runloop import VcpuLoop

SUM_TO_100 = """
    xor %eax, %eax
    mov $100, %ecx
1:  add %ecx, %eax
    loop 1b
    out %eax, $0x14
    hlt
"""

FACTORIAL_10 = """
    mov $1, %eax
    mov $10, %ecx
1:  imul %ecx, %eax
    loop 1b
    out %eax, $0x14
    hlt
"""


def test_two_vcpus_in_two_threads_each_compute_their_own_result(guest):
    g = guest("64", SUM_TO_100)
    second, _ = add_vcpu(g, FACTORIAL_10, stack=0x6000, origin=0x20000)
    second_port = RecordingPort()
    second_pio = pio_bus()
    second_pio.register(0x10, 16, second_port)
    loops = [VcpuLoop(g.vcpu, g.pio, g.mmio), VcpuLoop(second, second_pio, g.mmio)]
    exits: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            exits[i] = loops[i].run()
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"vcpu{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert all(isinstance(e, HltExit) for e in exits.values()) and len(exits) == 2
    assert g.port.values(4) == [5050]
    assert second_port.values(4) == [3628800]


def test_each_vcpu_thread_records_its_own_thread_ident(guest):
    g = guest("64", SUM_TO_100)
    second, _ = add_vcpu(g, FACTORIAL_10, stack=0x6000, origin=0x20000)
    idents = {}
    both_ran = threading.Barrier(2, timeout=60)  # both threads alive at once: idents are only reused after one ends

    def run(vcpu) -> None:
        VcpuLoop(vcpu, pio_bus(), g.mmio).run()
        idents[vcpu.id] = threading.get_ident()
        both_ran.wait()

    threads = [threading.Thread(target=run, args=(v,)) for v in (g.vcpu, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # kick() signals the thread that ran the vCPU last; it must be that thread.
    assert g.vcpu.thread_ident == idents[0]
    assert second.thread_ident == idents[1]
    assert idents[0] != idents[1]
