"""Split virtqueue parsing (virtio 1.2 section 2.7) against a real GuestMemory, with hostile chains."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.devices.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                        VIRTQ_DESC_F_WRITE, ChainError, QueueError, Virtqueue)
from kvmpy.devices.virtio.rng import EntropyDevice
from kvmpy.memory import GuestMemory

RAM = 1 << 20
SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(RAM) as m:
        yield m


def make_queue(mem: GuestMemory, *, indirect: bool = True, event_idx: bool = False) -> Virtqueue:
    mem.fill(0, 0x10000, 0)
    q = Virtqueue(mem, SIZE)
    q.size, q.desc_table, q.avail_ring, q.used_ring = SIZE, DESC, AVAIL, USED
    q.indirect, q.event_idx = indirect, event_idx
    q.check()
    q.ready = True
    return q


def desc(mem: GuestMemory, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def offer(mem: GuestMemory, *heads: int, start: int = 0) -> None:
    for k, h in enumerate(heads):
        mem.write_u16(AVAIL + 4 + 2 * ((start + k) % SIZE), h)
    mem.write_u16(AVAIL + 2, (start + len(heads)) & 0xFFFF)


def test_readable_then_writable_chain_is_split_by_direction(mem):
    q = make_queue(mem)
    mem.write(0x8000, b"request!")
    desc(mem, 0, 0x8000, 8, VIRTQ_DESC_F_NEXT, 3)
    desc(mem, 3, 0x9000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 5)
    desc(mem, 5, 0x9100, 2, VIRTQ_DESC_F_WRITE)
    offer(mem, 0)
    chain = q.pop()
    assert chain.head == 0 and chain.read_all() == b"request!"
    assert [len(v) for v in chain.writable] == [4, 2]
    assert chain.write(b"abcdef") == 6 and mem.read(0x9000, 4) == b"abcd" and mem.read(0x9100, 2) == b"ef"
    assert q.pop() is None


def test_indirect_table_is_followed(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 3, VIRTQ_DESC_F_NEXT, 1, table=0x7000)
    desc(mem, 1, 0x9000, 5, VIRTQ_DESC_F_WRITE, 0, table=0x7000)
    desc(mem, 2, 0x7000, 32, VIRTQ_DESC_F_INDIRECT)
    offer(mem, 2)
    chain = q.pop()
    assert chain.head == 2 and chain.readable_len == 3 and chain.writable_len == 5


def test_indirect_without_the_feature_fails_the_chain(mem):
    q = make_queue(mem, indirect=False)
    desc(mem, 0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT)
    offer(mem, 0)
    with pytest.raises(ChainError, match="not negotiated"):
        q.pop()


def test_nested_indirect_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT, table=0x7000)
    desc(mem, 1, 0x7000, 16, VIRTQ_DESC_F_INDIRECT)
    offer(mem, 1)
    with pytest.raises(ChainError, match="inside an indirect"):
        q.pop()


def test_indirect_with_next_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    offer(mem, 0)
    with pytest.raises(ChainError, match="NEXT"):
        q.pop()


def test_indirect_table_of_odd_length_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x7000, 17, VIRTQ_DESC_F_INDIRECT)
    offer(mem, 0)
    with pytest.raises(ChainError, match="indirect table length"):
        q.pop()


def test_loop_is_detected(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1)
    desc(mem, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0)
    offer(mem, 0)
    with pytest.raises(ChainError, match="loop") as e:
        q.pop()
    assert e.value.head == 0


def test_loop_inside_an_indirect_table_is_detected(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0, table=0x7000)
    desc(mem, 0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT)
    offer(mem, 0)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_buffer_outside_ram_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, RAM - 8, 16)
    offer(mem, 0)
    with pytest.raises(ChainError, match="not guest RAM"):
        q.pop()


def test_absurd_length_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 0xFFFF_FFFF)
    offer(mem, 0)
    with pytest.raises(ChainError):
        q.pop()


def test_chain_bytes_are_bounded(mem):
    q = make_queue(mem)
    q.max_chain_bytes = 100
    desc(mem, 0, 0x8000, 64, VIRTQ_DESC_F_NEXT, 1)
    desc(mem, 1, 0x9000, 64)
    offer(mem, 0)
    with pytest.raises(ChainError, match="more than 100 bytes"):
        q.pop()


def test_readable_after_writable_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    desc(mem, 1, 0x9000, 4)
    offer(mem, 0)
    with pytest.raises(ChainError, match="device-readable after"):
        q.pop()


def test_next_index_past_the_table_fails_the_chain(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, SIZE + 3)
    offer(mem, 0)
    with pytest.raises(ChainError, match="past the table"):
        q.pop()


def test_head_past_the_table_breaks_the_queue(mem):
    q = make_queue(mem)
    offer(mem, SIZE)
    with pytest.raises(QueueError, match="head index"):
        q.pop()


def test_avail_index_running_ahead_breaks_the_queue(mem):
    q = make_queue(mem)
    mem.write_u16(AVAIL + 2, SIZE + 1)
    with pytest.raises(QueueError, match="more than the queue size"):
        q.pop()


def test_rings_outside_ram_are_refused():
    with GuestMemory(1 << 16) as small:
        q = Virtqueue(small, SIZE)
        q.desc_table, q.avail_ring, q.used_ring = 0x1000, 0x2000, (1 << 16) - 8
        with pytest.raises(QueueError, match="used ring"):
            q.check()


def test_size_must_be_a_power_of_two(mem):
    q = make_queue(mem)
    q.size = 6
    with pytest.raises(QueueError, match="power of 2"):
        q.check()


def test_add_used_writes_the_element_then_the_index(mem):
    q = make_queue(mem)
    q.add_used(5, 1234)
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (5, 1234)
    assert mem.read_u16(USED + 2) == 1


def test_avail_index_wraps_around(mem):
    q = make_queue(mem)
    q.last_avail_idx = 0xFFFF
    desc(mem, 0, 0x8000, 4)
    mem.write_u16(AVAIL + 4 + 2 * (0xFFFF % SIZE), 0)
    mem.write_u16(AVAIL + 2, 0)
    assert q.pop().head == 0 and q.last_avail_idx == 0


def test_no_interrupt_flag_suppresses_interrupts(mem):
    q = make_queue(mem)
    mem.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(0, 0)
    assert not q.needs_interrupt()
    mem.write_u16(AVAIL, 0)
    q.add_used(1, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()  # nothing new since


def test_event_idx_interrupts_only_past_used_event(mem):
    q = make_queue(mem, event_idx=True)
    used_event = AVAIL + 4 + 2 * SIZE
    mem.write_u16(used_event, 2)  # "interrupt me when entry 2 is used"
    q.add_used(0, 0)
    assert not q.needs_interrupt()
    q.add_used(1, 0)
    assert not q.needs_interrupt()
    q.add_used(2, 0)
    assert q.needs_interrupt()


def test_event_idx_publishes_avail_event(mem):
    q = make_queue(mem, event_idx=True)
    desc(mem, 0, 0x8000, 4)
    offer(mem, 0)
    q.pop()
    assert mem.read_u16(USED + 4 + 8 * SIZE) == 1


# -- property-based: random descriptor tables ---------------------------------

ADDRS = st.one_of(
    st.integers(0x8000, 0xF000),                     # plausible buffers
    st.integers(RAM - 64, RAM + 64),                 # straddling the end of RAM
    st.sampled_from([0, DESC, AVAIL, USED, 0x7000]),  # the rings themselves, an indirect table
    st.integers(0, 2**64 - 1),                        # anything
)
LENS = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 0x1000, RAM, 0xFFFF_FFFF]),
                 st.integers(0, 2**32 - 1))
FLAGS = st.integers(0, 7)
NEXTS = st.one_of(st.integers(0, SIZE + 1), st.integers(0, 0xFFFF))
DESCS = st.tuples(ADDRS, LENS, FLAGS, NEXTS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(DESCS, min_size=SIZE, max_size=SIZE),
       indirect_table=st.lists(DESCS, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE),
       avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)),
       max_bytes=st.sampled_from([64, 4096, 64 << 20]))
def test_random_chains_fail_cleanly_and_stay_in_ram(mem, table, indirect_table, heads, avail_idx, max_bytes):
    q = make_queue(mem)
    q.max_chain_bytes = max_bytes
    for i, d in enumerate(table):
        desc(mem, i, *d)
    for i, d in enumerate(indirect_table):
        desc(mem, i, *d, table=0x7000)
    offer(mem, *heads)
    if avail_idx is not None:
        mem.write_u16(AVAIL + 2, avail_idx)
    for _ in range(2 * SIZE):
        try:
            chain = q.pop()
        except ChainError as e:
            assert 0 <= e.head < SIZE
            continue
        except QueueError:
            break
        if chain is None:
            break
        assert 0 <= chain.head < SIZE
        assert chain.readable_len + chain.writable_len <= max_bytes
        assert len(chain.readable) + len(chain.writable) <= SIZE * 2
        for v in chain.readable + chain.writable:
            # every view is a slice of guest RAM, nothing else
            assert v.obj is mem.regions[0].mapping


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(DESCS, min_size=SIZE, max_size=SIZE),
       heads=st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE))
def test_device_on_random_chains_never_raises_and_writes_only_guest_buffers(mem, table, heads):
    """An entropy device fed garbage: requests fail or the device needs a reset; nothing escapes."""
    mem.fill(0, 0x10000, 0)
    t = MmioTransport(EntropyDevice(source=lambda n: b"\xAB" * n), mem)
    t.status = 0xF  # ACK|DRIVER|FEATURES_OK|DRIVER_OK without the register dance
    q = t.queues[0]
    q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready = SIZE, DESC, AVAIL, USED, True
    q.indirect = True
    for i, d in enumerate(table):
        desc(mem, i, *d)
    offer(mem, *heads)
    before = mem.read(0, 0x8000)
    t.notify(0)  # must not raise
    after = mem.read(0, 0x8000)
    # Below 0x8000 only the used ring may change, unless the guest handed the device a writable
    # buffer there (over its own rings: legal, and the device then writes where it was told).
    pointed = [(a, n) for a, n, f, _ in table if f & VIRTQ_DESC_F_WRITE and a < 0x8000]
    if not pointed:
        changed = [i for i in range(0x8000) if before[i] != after[i]]
        assert all(USED <= i < USED + 6 + 8 * SIZE + 2 for i in changed), changed[:8]
        # and with the rings intact, every used entry names a real head
        used = mem.read_u16(USED + 2)
        for k in range(min(used, SIZE)):
            head, _ = struct.unpack("<II", mem.read(USED + 4 + 8 * k, 8))
            assert head < SIZE
