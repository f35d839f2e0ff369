"""The cffi bindings against <linux/kvm.h> and <linux/vhost.h>, checked by an independent C compiler run.

A small C program, compiled with gcc against the same headers, prints
sizeof/offsetof for the structures kvmpy uses and the values of the ioctl
numbers and KVM_CAP_/KVM_EXIT_ constants; every number must match what
`kvmpy._kvm.ffi`/`lib` say.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kvmpy._kvm import ffi, lib
from kvmpy.exits import ExitReason
from kvmpy.kvm import Capability

# (struct, member path or None for sizeof)
LAYOUT = [
    ("kvm_run", None), ("kvm_run", "exit_reason"), ("kvm_run", "immediate_exit"),
    ("kvm_run", "io"), ("kvm_run", "io.data_offset"), ("kvm_run", "io.count"),
    ("kvm_run", "mmio.phys_addr"), ("kvm_run", "mmio.data"), ("kvm_run", "mmio.len"),
    ("kvm_run", "mmio.is_write"), ("kvm_run", "internal.suberror"), ("kvm_run", "internal.data"),
    ("kvm_run", "emulation_failure.flags"), ("kvm_run", "emulation_failure.insn_size"),
    ("kvm_run", "emulation_failure.insn_bytes"), ("kvm_run", "system_event.type"),
    ("kvm_run", "system_event.data"), ("kvm_run", "msr.index"), ("kvm_run", "msr.data"),
    ("kvm_run", "kvm_valid_regs"), ("kvm_run", "kvm_dirty_regs"), ("kvm_run", "s"),
    ("kvm_regs", None), ("kvm_regs", "rip"), ("kvm_regs", "rflags"), ("kvm_regs", "r15"),
    ("kvm_segment", None), ("kvm_segment", "selector"), ("kvm_segment", "unusable"),
    ("kvm_sregs", None), ("kvm_sregs", "cs"), ("kvm_sregs", "tr"), ("kvm_sregs", "gdt"),
    ("kvm_sregs", "idt"), ("kvm_sregs", "cr0"), ("kvm_sregs", "cr3"), ("kvm_sregs", "efer"),
    ("kvm_sregs", "apic_base"), ("kvm_sregs", "interrupt_bitmap"),
    ("kvm_vcpu_events", None), ("kvm_vcpu_events", "exception.nr"),
    ("kvm_vcpu_events", "exception.error_code"), ("kvm_vcpu_events", "interrupt"),
    ("kvm_vcpu_events", "nmi.masked"), ("kvm_vcpu_events", "sipi_vector"),
    ("kvm_vcpu_events", "flags"), ("kvm_vcpu_events", "smi"),
    ("kvm_vcpu_events", "exception_has_payload"), ("kvm_vcpu_events", "exception_payload"),
    ("kvm_userspace_memory_region", None), ("kvm_userspace_memory_region", "slot"),
    ("kvm_userspace_memory_region", "flags"), ("kvm_userspace_memory_region", "guest_phys_addr"),
    ("kvm_userspace_memory_region", "memory_size"), ("kvm_userspace_memory_region", "userspace_addr"),
    ("kvm_irq_routing_entry", None), ("kvm_irq_routing_entry", "type"),
    ("kvm_irq_routing_entry", "u"), ("kvm_irq_routing_entry", "u.msi.data"),
    ("kvm_irq_routing", "entries"),
    ("kvm_stats_header", None), ("kvm_stats_header", "data_offset"),
    ("kvm_stats_desc", None), ("kvm_stats_desc", "exponent"), ("kvm_stats_desc", "size"),
    ("kvm_stats_desc", "offset"), ("kvm_stats_desc", "bucket_size"), ("kvm_stats_desc", "name"),
    ("kvm_cpuid_entry2", None), ("kvm_cpuid2", "entries"), ("kvm_msr_entry", None),
    ("kvm_msr_entry", "data"), ("kvm_msrs", "entries"), ("kvm_fpu", None), ("kvm_fpu", "mxcsr"),
    ("kvm_lapic_state", None), ("kvm_xsave", None), ("kvm_debugregs", None),
    ("kvm_irqfd", None), ("kvm_ioeventfd", None), ("kvm_ioeventfd", "flags"), ("kvm_msi", None),
    ("kvm_irq_level", None), ("kvm_dirty_log", "dirty_bitmap"),
    ("kvm_clear_dirty_log", None), ("kvm_clear_dirty_log", "num_pages"), ("kvm_clear_dirty_log", "first_page"),
    ("kvm_clear_dirty_log", "dirty_bitmap"), ("kvm_dirty_gfn", None), ("kvm_dirty_gfn", "slot"),
    ("kvm_dirty_gfn", "offset"), ("kvm_translation", None),
    ("kvm_translation", "valid"), ("kvm_guest_debug", "arch"), ("kvm_enable_cap", "args"),
    ("kvm_clock_data", None), ("kvm_pit_state2", None), ("kvm_irqchip", None),
    # <linux/vhost_types.h>, for /dev/vhost-vsock
    ("vhost_vring_state", None), ("vhost_vring_state", "index"), ("vhost_vring_state", "num"),
    ("vhost_vring_file", None), ("vhost_vring_file", "index"), ("vhost_vring_file", "fd"),
    ("vhost_vring_addr", None), ("vhost_vring_addr", "index"), ("vhost_vring_addr", "flags"),
    ("vhost_vring_addr", "desc_user_addr"), ("vhost_vring_addr", "used_user_addr"),
    ("vhost_vring_addr", "avail_user_addr"), ("vhost_vring_addr", "log_guest_addr"),
    ("vhost_memory_region", None), ("vhost_memory_region", "guest_phys_addr"),
    ("vhost_memory_region", "memory_size"), ("vhost_memory_region", "userspace_addr"),
    ("vhost_memory_region", "flags_padding"),
    ("vhost_memory", None), ("vhost_memory", "nregions"), ("vhost_memory", "padding"),
    ("vhost_memory", "regions"),
]

IOCTLS = ["KVM_RUN", "KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_VCPU",
          "KVM_GET_REGS", "KVM_SET_SREGS", "KVM_GET_VCPU_EVENTS", "KVM_IRQFD", "KVM_SIGNAL_MSI",
          "KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_RESET_DIRTY_RINGS", "KVM_GET_STATS_FD",
          "KVM_SET_GSI_ROUTING", "KVM_TRANSLATE"]
# The dirty ring's ABI: where each vCPU's ring is mapped and its entry flags.
DIRTY_CONSTANTS = ["KVM_DIRTY_LOG_PAGE_OFFSET", "KVM_DIRTY_GFN_F_DIRTY", "KVM_DIRTY_GFN_F_RESET",
                   "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET"]
VHOST_IOCTLS = ["VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_RESET_OWNER",
                "VHOST_SET_MEM_TABLE", "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE",
                "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR",
                "VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING"]
VHOST_CONSTANTS = ["VHOST_FILE_UNBIND", "VHOST_VRING_F_LOG", "VHOST_F_LOG_ALL", "VHOST_PAGE_SIZE"]


def _key(struct: str, member: str | None) -> str:
    return f"{struct}:{member or 'sizeof'}"


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    """{name: value} printed by a C program compiled against <linux/kvm.h>."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed: cannot check the bindings against the header")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "#include <linux/vhost.h>",
             "#define P(name, v) printf(\"%s %lld\\n\", name, (long long)(v))",
             "int main(void) {"]
    for struct, member in LAYOUT:
        expr = f"sizeof(struct {struct})" if member is None else f"offsetof(struct {struct}, {member})"
        lines.append(f'P("{_key(struct, member)}", {expr});')
    names = (IOCTLS + VHOST_IOCTLS + VHOST_CONSTANTS + DIRTY_CONSTANTS + [f"KVM_CAP_{c.name}" for c in Capability]
             + [f"KVM_EXIT_{e.name}" for e in ExitReason])
    lines += [f'P("{n}", {n});' for n in names]
    lines += ["return 0; }"]
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text("\n".join(lines) + "\n")
    subprocess.run([gcc, "-o", str(d / "layout"), str(d / "layout.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct,member", LAYOUT, ids=[_key(s, m) for s, m in LAYOUT])
def test_struct_layout_matches_the_header(header_values, struct, member):
    if member is None:
        ours = ffi.sizeof(f"struct {struct}")
    else:
        ours = ffi.offsetof(f"struct {struct}", *member.split("."))
    assert ours == header_values[_key(struct, member)]


@pytest.mark.parametrize("name", IOCTLS + VHOST_IOCTLS)
def test_ioctl_number_matches_the_header(header_values, name):
    assert getattr(lib, name) == header_values[name]


@pytest.mark.parametrize("name", DIRTY_CONSTANTS)
def test_dirty_log_constant_matches_the_header(header_values, name):
    assert getattr(lib, name) == header_values[name]


@pytest.mark.parametrize("name", VHOST_CONSTANTS)
def test_vhost_constant_matches_the_header(header_values, name):
    assert getattr(lib, name) == header_values[name]  # VHOST_FILE_UNBIND is -1: printed signed


def test_ioctl_numbers_match_their_ioc_encoding():
    # _IO(KVMIO=0xAE, nr) and _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region[32 bytes]).
    assert lib.KVM_CREATE_VM == 0xAE01
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_SET_USER_MEMORY_REGION == (1 << 30) | (32 << 16) | (0xAE << 8) | 0x46
    # _IO(VHOST_VIRTIO=0xAF, 0x01) and _IOW(VHOST_VIRTIO, 0x60, __u64).
    assert lib.VHOST_SET_OWNER == 0xAF01
    assert lib.VHOST_VSOCK_SET_GUEST_CID == (1 << 30) | (8 << 16) | (0xAF << 8) | 0x60


def test_every_capability_has_its_header_value(header_values):
    wrong = {c.name: (c.value, header_values[f"KVM_CAP_{c.name}"])
             for c in Capability if c.value != header_values[f"KVM_CAP_{c.name}"]}
    assert wrong == {}


def test_every_exit_reason_has_its_header_value(header_values):
    wrong = {e.name: (e.value, header_values[f"KVM_EXIT_{e.name}"])
             for e in ExitReason if e.value != header_values[f"KVM_EXIT_{e.name}"]}
    assert wrong == {}


@pytest.mark.parametrize("name", ["IRQCHIP", "USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "IRQFD",
                                  "IOEVENTFD", "SIGNAL_MSI", "READONLY_MEM", "IRQ_ROUTING", "PIT2",
                                  "SYNC_REGS", "IMMEDIATE_EXIT", "BINARY_STATS_FD", "DIRTY_LOG_RING",
                                  "X86_USER_SPACE_MSR", "NR_MEMSLOTS", "MAX_VCPUS"])
def test_capability_enum_has_the_member(name):
    assert Capability[name].value == getattr(lib, f"KVM_CAP_{name}")


# Exit reasons are ABI: their numbers never change.
@pytest.mark.parametrize("name,value", [("UNKNOWN", 0), ("IO", 2), ("HLT", 5), ("MMIO", 6),
                                        ("SHUTDOWN", 8), ("FAIL_ENTRY", 9), ("INTR", 10),
                                        ("INTERNAL_ERROR", 17), ("SYSTEM_EVENT", 24),
                                        ("X86_RDMSR", 29), ("X86_WRMSR", 30)])
def test_exit_reason_enum_has_the_member_with_its_abi_value(name, value):
    assert ExitReason[name] == value


def test_exit_reason_enum_leaves_out_io_direction_constants():
    assert "IO_IN" not in ExitReason.__members__ and "IO_OUT" not in ExitReason.__members__
