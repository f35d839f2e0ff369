"""cffi build script for the raw KVM and vhost bindings (out-of-line API mode).

Compiled at install time against the system's <linux/kvm.h> and
<linux/vhost.h> (the kernel's vhost-vsock back end). Every struct is
declared *partial* (``...;``) so its size and field offsets come from the C
compiler reading the real header, and every constant is declared ``...`` so
its value does too: nothing here is a hand-computed offset or ioctl number.

Anonymous nested structs of the header (``kvm_run``'s exit union,
``kvm_vcpu_events``' sub-structs) are given names with ``__typeof__`` in the
C source so that cffi can address them.

`pip install -e .` (setup.py's cffi_modules) builds it; `make venv` does that.
"""

from __future__ import annotations

import re
from pathlib import Path

import cffi

HEADER = Path("/usr/include/linux/kvm.h")
ARCH_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/kvm.h")
VHOST_HEADER = Path("/usr/include/linux/vhost.h")  # with vhost_types.h; Debian's linux-libc-dev

# Integer constants whose names are taken from the header by prefix, so a
# capability or exit reason that a newer kernel header adds appears without
# a code change. Values still come from the compiler.
CONSTANT_PREFIXES = (
    "KVM_CAP_", "KVM_EXIT_", "KVM_INTERNAL_ERROR_", "KVM_SYSTEM_EVENT_",
    "KVM_GUESTDBG_", "KVM_MP_STATE_", "KVM_MEM_", "KVM_STATS_", "KVM_IRQ_ROUTING_",
    "KVM_IRQFD_FLAG_", "KVM_IOEVENTFD_FLAG_", "KVM_MSR_FILTER_", "KVM_VCPUEVENT_",
    "KVM_SYNC_X86_", "KVM_MSR_EXIT_REASON_", "KVM_X86_QUIRK_", "KVM_IRQCHIP_",
    "KVM_PIT_", "KVM_CLOCK_", "KVM_MSI_", "KVM_X2APIC_API_", "KVM_X86_DISABLE_EXITS_",
    "KVM_STATE_", "KVM_DIRTY_LOG_", "KVM_BUS_LOCK_DETECTION_", "KVM_NOTIFY_",
)

# The ioctls kvmpy wraps, by the header's names. The numbers come from the
# header's _IO/_IOR/_IOW/_IOWR macros through the compiler.
IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_GET_EMULATED_CPUID
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_GET_DIRTY_LOG KVM_CLEAR_DIRTY_LOG
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQ_LINE_STATUS KVM_SIGNAL_MSI
KVM_SET_GSI_ROUTING KVM_IRQFD KVM_IOEVENTFD KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2
KVM_ENABLE_CAP KVM_GET_STATS_FD KVM_X86_SET_MSR_FILTER KVM_SET_BOOT_CPU_ID
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_MP_STATE KVM_SET_MP_STATE
KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_XCRS KVM_SET_XCRS KVM_GET_XSAVE KVM_SET_XSAVE
KVM_GET_XSAVE2 KVM_SET_GUEST_DEBUG KVM_NMI KVM_TRANSLATE KVM_INTERRUPT KVM_KVMCLOCK_CTRL
KVM_SET_SIGNAL_MASK KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_RESET_DIRTY_RINGS
VHOST_GET_FEATURES VHOST_SET_FEATURES VHOST_SET_OWNER VHOST_RESET_OWNER VHOST_SET_MEM_TABLE
VHOST_SET_VRING_NUM VHOST_SET_VRING_ADDR VHOST_SET_VRING_BASE VHOST_GET_VRING_BASE
VHOST_SET_VRING_KICK VHOST_SET_VRING_CALL VHOST_SET_VRING_ERR
VHOST_VSOCK_SET_GUEST_CID VHOST_VSOCK_SET_RUNNING
""".split()

CDEF = r"""
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef unsigned long long __u64; typedef short __s16; typedef int __s32; typedef long long __s64;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr;
    ...;
};
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_cpuid_entry2 {
    __u32 function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_lapic_state { char regs[...]; };

typedef struct { __u8 injected, nr, has_error_code, pending; __u32 error_code; ...; } kvm_events_exception_t;
typedef struct { __u8 injected, nr, soft, shadow; ...; } kvm_events_interrupt_t;
typedef struct { __u8 injected, pending, masked; ...; } kvm_events_nmi_t;
typedef struct { __u8 smm, pending, smm_inside_nmi, latched_init; ...; } kvm_events_smi_t;
struct kvm_vcpu_events {
    kvm_events_exception_t exception;
    kvm_events_interrupt_t interrupt;
    kvm_events_nmi_t nmi;
    __u32 sipi_vector;
    __u32 flags;
    kvm_events_smi_t smi;
    __u8 exception_has_payload;
    __u64 exception_payload;
    ...;
};
struct kvm_mp_state { __u32 mp_state; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; };
struct kvm_guest_debug { __u32 control; struct kvm_guest_debug_arch arch; ...; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address;
    __u8 valid, writeable, usermode;
    ...;
};
struct kvm_interrupt { __u32 irq; };
struct kvm_sync_regs { struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_vcpu_events events; };

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr;
};
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log { __u32 slot; __u32 num_pages; __u64 first_page; void *dirty_bitmap; ...; };
struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; };
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
struct kvm_pic_state { __u8 irr, imr, isr, irq_base, elcr; ...; };
typedef struct { __u64 bits; ...; } kvm_ioapic_redir_t;
struct kvm_ioapic_state {
    __u64 base_address; __u32 ioregsel; __u32 id; __u32 irr;
    kvm_ioapic_redir_t redirtbl[...];
    ...;
};
typedef struct { struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; char dummy[512]; ...; } kvm_irqchip_chip_t;
struct kvm_irqchip { __u32 chip_id; kvm_irqchip_chip_t chip; ...; };
struct kvm_pit_channel_state {
    __u32 count; __u16 latched_count; __u8 count_latched, status_latched, status;
    __u8 read_state, write_state, write_latch, rw_mode, mode, bcd, gate;
    __s64 count_load_time;
    ...;
};
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; __u32 flags; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_irq_level { __u32 irq; __s32 status; __u32 level; ...; };
struct kvm_msi { __u32 address_lo, address_hi, data, flags, devid; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; ...; };
typedef struct { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; ...; } kvm_irq_routing_u_t;
struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; kvm_irq_routing_u_t u; ...; };
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_msr_filter_range { __u32 flags; __u32 nmsrs; __u32 base; __u8 *bitmap; };
struct kvm_msr_filter { __u32 flags; struct kvm_msr_filter_range ranges[...]; };

/* <linux/vhost_types.h>: what VHOST_* ioctls on /dev/vhost-vsock take. */
struct vhost_vring_state { unsigned int index; unsigned int num; ...; };
struct vhost_vring_file { unsigned int index; int fd; ...; };
struct vhost_vring_addr {
    unsigned int index; unsigned int flags;
    __u64 desc_user_addr; __u64 used_user_addr; __u64 avail_user_addr; __u64 log_guest_addr;
    ...;
};
struct vhost_memory_region {
    __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; __u64 flags_padding;
    ...;
};
struct vhost_memory { __u32 nregions; __u32 padding; struct vhost_memory_region regions[]; ...; };

struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc;
    __u32 id_offset; __u32 desc_offset; __u32 data_offset;
};
struct kvm_stats_desc {
    __u32 flags; __s16 exponent; __u16 size; __u32 offset; __u32 bucket_size;
    char name[];
    ...;
};

typedef struct { __u64 hardware_exit_reason; } kvm_run_hw_t;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; } kvm_run_fail_entry_t;
typedef struct { __u32 exception; __u32 error_code; } kvm_run_ex_t;
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } kvm_run_io_t;
typedef struct { __u32 exception; __u64 pc; __u64 dr6; __u64 dr7; ...; } kvm_debug_exit_arch_t;
typedef struct { kvm_debug_exit_arch_t arch; } kvm_run_debug_t;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; ...; } kvm_run_mmio_t;
typedef struct { __u64 nr; __u64 args[6]; __u64 ret; __u32 longmode; ...; } kvm_run_hypercall_t;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; } kvm_run_internal_t;
typedef struct { __u32 suberror; __u32 ndata; __u64 flags; __u8 insn_size; __u8 insn_bytes[15];
                 ...; } kvm_run_emulation_failure_t;
typedef struct { __u32 type; __u32 ndata; __u64 data[16]; ...; } kvm_run_system_event_t;
typedef struct { __u8 error; __u32 reason; __u32 index; __u64 data; ...; } kvm_run_msr_t;
typedef struct { __u32 flags; } kvm_run_notify_t;
/* The union members of exit reasons kvmpy's x86 VMM never asks for (other architectures, Hyper-V, Xen):
   declared so that exits.py decodes every reason the header names into a typed record. */
typedef struct { __u64 rip; __u32 is_write; ...; } kvm_run_tpr_access_t;
typedef struct { __u8 icptcode; __u16 ipa; __u32 ipb; } kvm_run_s390_sieic_t;
typedef struct { __u64 trans_exc_code; __u32 pgm_code; ...; } kvm_run_s390_ucontrol_t;
typedef struct { __u32 dcrn; __u32 data; __u8 is_write; ...; } kvm_run_dcr_t;
typedef struct { __u64 gprs[32]; } kvm_run_osi_t;
typedef struct { __u64 nr; __u64 ret; __u64 args[9]; } kvm_run_papr_hcall_t;
typedef struct { __u16 subchannel_id; __u16 subchannel_nr; __u32 io_int_parm; __u32 io_int_word; __u32 ipb;
                 __u8 dequeued; ...; } kvm_run_s390_tsch_t;
typedef struct { __u32 epr; } kvm_run_epr_t;
typedef struct { __u64 addr; __u8 ar; __u8 fc; __u8 sel1; __u16 sel2; ...; } kvm_run_s390_stsi_t;
typedef struct { __u8 vector; } kvm_run_eoi_t;
typedef struct { __u32 msr; __u64 control; __u64 evt_page; __u64 msg_page; ...; } kvm_hyperv_synic_t;
typedef struct { __u64 input; __u64 result; __u64 params[2]; } kvm_hyperv_hcall_t;
typedef struct { __u32 msr; __u64 control; __u64 status; __u64 send_page; __u64 recv_page; __u64 pending_page;
                 ...; } kvm_hyperv_syndbg_t;
typedef union { kvm_hyperv_synic_t synic; kvm_hyperv_hcall_t hcall; kvm_hyperv_syndbg_t syndbg; } kvm_hyperv_u_t;
typedef struct { __u32 type; kvm_hyperv_u_t u; ...; } kvm_run_hyperv_t;
typedef struct { __u64 esr_iss; __u64 fault_ipa; } kvm_run_arm_nisv_t;
typedef struct { __u32 longmode; __u32 cpl; __u64 input; __u64 result; __u64 params[6]; } kvm_xen_hcall_t;
typedef union { kvm_xen_hcall_t hcall; } kvm_xen_u_t;
typedef struct { __u32 type; kvm_xen_u_t u; ...; } kvm_run_xen_t;
typedef struct { unsigned long extension_id; unsigned long function_id; unsigned long args[6];
                 unsigned long ret[2]; } kvm_run_riscv_sbi_t;
typedef struct { unsigned long csr_num; unsigned long new_value; unsigned long write_mask;
                 unsigned long ret_value; } kvm_run_riscv_csr_t;
typedef struct { struct kvm_sync_regs regs; ...; } kvm_run_s_t;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    kvm_run_hw_t hw;
    kvm_run_fail_entry_t fail_entry;
    kvm_run_ex_t ex;
    kvm_run_io_t io;
    kvm_run_debug_t debug;
    kvm_run_mmio_t mmio;
    kvm_run_hypercall_t hypercall;
    kvm_run_internal_t internal;
    kvm_run_emulation_failure_t emulation_failure;
    kvm_run_system_event_t system_event;
    kvm_run_msr_t msr;
    kvm_run_notify_t notify;
    kvm_run_tpr_access_t tpr_access;
    kvm_run_s390_sieic_t s390_sieic;
    __u64 s390_reset_flags;
    kvm_run_s390_ucontrol_t s390_ucontrol;
    kvm_run_dcr_t dcr;
    kvm_run_osi_t osi;
    kvm_run_papr_hcall_t papr_hcall;
    kvm_run_s390_tsch_t s390_tsch;
    kvm_run_epr_t epr;
    kvm_run_s390_stsi_t s390_stsi;
    kvm_run_eoi_t eoi;
    kvm_run_hyperv_t hyperv;
    kvm_run_arm_nisv_t arm_nisv;
    kvm_run_xen_t xen;
    kvm_run_riscv_sbi_t riscv_sbi;
    kvm_run_riscv_csr_t riscv_csr;
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    kvm_run_s_t s;
    ...;
};

#define KVM_API_VERSION ...
#define KVM_NR_INTERRUPTS ...
#define KVM_IOAPIC_NUM_PINS ...
#define KVM_APIC_REG_SIZE ...
#define KVM_MAX_XCRS ...
#define KVM_MSR_FILTER_MAX_RANGES ...
#define KVM_MSR_FILTER_MAX_BITMAP_SIZE ...
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX ...
#define KVM_CPUID_FLAG_STATEFUL_FUNC ...
#define KVM_CPUID_FLAG_STATE_READ_NEXT ...
#define KVM_NR_IRQCHIPS ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define VHOST_FILE_UNBIND ...
#define VHOST_VRING_F_LOG ...
#define VHOST_F_LOG_ALL ...
#define VHOST_PAGE_SIZE ...

/* C helpers: thin wrappers so an ioctl costs one cffi call and no Python-side
   errno juggling. cffi releases the GIL around them. */
int kvmpy_ioctl(int fd, unsigned long request, void *arg);
long kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg);
int kvmpy_run(int fd);

/* Exit accounting done next to KVM_RUN: time in the guest (inside KVM_RUN)
   and in the VMM (between two KVM_RUNs) as log2 histograms per exit reason. */
#define KVMPY_ACCT_REASONS ...
#define KVMPY_ACCT_BUCKETS ...
#define KVMPY_ACCT_PORT_SLOTS ...
struct kvmpy_acct {
    int fd;
    struct kvm_run *run;
    uint64_t t_first, t_enter, t_leave, last_vmm_ns;
    int64_t last;
    uint64_t guest[...];
    uint64_t vmm[...];
    uint64_t vmm_total[...];
    uint32_t io_key[...];   /* (direction << 16 | port) + 1; 0 = free slot */
    uint64_t io_count[...];
    uint64_t io_other;      /* port exits once every slot is taken */
};
int kvmpy_run_acct(struct kvmpy_acct *a);
void kvmpy_acct_count_port(struct kvmpy_acct *a, uint32_t key);
int kvmpy_install_kick_handler(int signo);
int kvmpy_sigrtmin(void);
uint32_t kvmpy_harvest_dirty_ring(struct kvm_dirty_gfn *ring, uint32_t entries, uint32_t *fetch,
                                  uint64_t *out, uint32_t max_out);
"""

C_SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <linux/vhost.h>

typedef __typeof__(((struct kvm_vcpu_events *)0)->exception) kvm_events_exception_t;
typedef __typeof__(((struct kvm_vcpu_events *)0)->interrupt) kvm_events_interrupt_t;
typedef __typeof__(((struct kvm_vcpu_events *)0)->nmi) kvm_events_nmi_t;
typedef __typeof__(((struct kvm_vcpu_events *)0)->smi) kvm_events_smi_t;
typedef __typeof__(((struct kvm_ioapic_state *)0)->redirtbl[0]) kvm_ioapic_redir_t;
typedef __typeof__(((struct kvm_irqchip *)0)->chip) kvm_irqchip_chip_t;
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) kvm_irq_routing_u_t;
typedef struct kvm_debug_exit_arch kvm_debug_exit_arch_t;
#define KVM_RUN_MEMBER(name) typedef __typeof__(((struct kvm_run *)0)->name) kvm_run_##name##_t;
KVM_RUN_MEMBER(hw)
KVM_RUN_MEMBER(fail_entry)
KVM_RUN_MEMBER(ex)
KVM_RUN_MEMBER(io)
KVM_RUN_MEMBER(debug)
KVM_RUN_MEMBER(mmio)
KVM_RUN_MEMBER(hypercall)
KVM_RUN_MEMBER(internal)
KVM_RUN_MEMBER(emulation_failure)
KVM_RUN_MEMBER(system_event)
KVM_RUN_MEMBER(msr)
KVM_RUN_MEMBER(notify)
KVM_RUN_MEMBER(tpr_access)
KVM_RUN_MEMBER(s390_sieic)
KVM_RUN_MEMBER(s390_ucontrol)
KVM_RUN_MEMBER(dcr)
KVM_RUN_MEMBER(osi)
KVM_RUN_MEMBER(papr_hcall)
KVM_RUN_MEMBER(s390_tsch)
KVM_RUN_MEMBER(epr)
KVM_RUN_MEMBER(s390_stsi)
KVM_RUN_MEMBER(eoi)
KVM_RUN_MEMBER(hyperv)
KVM_RUN_MEMBER(arm_nisv)
KVM_RUN_MEMBER(xen)
KVM_RUN_MEMBER(riscv_sbi)
KVM_RUN_MEMBER(riscv_csr)
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.synic) kvm_hyperv_synic_t;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.hcall) kvm_hyperv_hcall_t;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.syndbg) kvm_hyperv_syndbg_t;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u) kvm_hyperv_u_t;
typedef __typeof__(((struct kvm_xen_exit *)0)->u.hcall) kvm_xen_hcall_t;
typedef __typeof__(((struct kvm_xen_exit *)0)->u) kvm_xen_u_t;
KVM_RUN_MEMBER(s)

static int kvmpy_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static long kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmpy_run(int fd)
{
    return ioctl(fd, KVM_RUN, 0) < 0 ? -errno : 0;
}

#include <time.h>
#include <stdint.h>

#define KVMPY_ACCT_REASONS 64
#define KVMPY_ACCT_BUCKETS 64
#define KVMPY_ACCT_PORT_SLOTS 512  /* a power of two; a guest uses a handful of ports */
struct kvmpy_acct {
    int fd;
    struct kvm_run *run;
    uint64_t t_first, t_enter, t_leave, last_vmm_ns;
    int64_t last;
    uint64_t guest[KVMPY_ACCT_REASONS * KVMPY_ACCT_BUCKETS];
    uint64_t vmm[KVMPY_ACCT_REASONS * KVMPY_ACCT_BUCKETS];
    uint64_t vmm_total[KVMPY_ACCT_REASONS];
    uint32_t io_key[KVMPY_ACCT_PORT_SLOTS];
    uint64_t io_count[KVMPY_ACCT_PORT_SLOTS];
    uint64_t io_other;
};

/* Count one port exit in the open-addressing table (linear probing). */
static void kvmpy_acct_count_port(struct kvmpy_acct *a, uint32_t key)
{
    unsigned h = (key * 2654435761u) >> 23, i;  /* Knuth's multiplicative hash, 9 bits */
    for (i = 0; i < KVMPY_ACCT_PORT_SLOTS; i++) {
        unsigned s = (h + i) & (KVMPY_ACCT_PORT_SLOTS - 1);
        if (a->io_key[s] == key) {
            a->io_count[s]++;
            return;
        }
        if (a->io_key[s] == 0) {
            a->io_key[s] = key;
            a->io_count[s] = 1;
            return;
        }
    }
    a->io_other++;
}

static inline uint64_t kvmpy_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* the clock of Python's perf_counter_ns */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Python's int.bit_length(), clamped to the last bucket. */
static inline unsigned kvmpy_bucket(uint64_t ns)
{
    unsigned b = ns ? 64 - (unsigned)__builtin_clzll(ns) : 0;
    return b < KVMPY_ACCT_BUCKETS ? b : KVMPY_ACCT_BUCKETS - 1;
}

/* KVM_RUN on a->fd, accounted: returns 0 or -errno like kvmpy_run. An
   interrupted run counts as KVM_EXIT_INTR; reasons past the table share its
   last row. Port I/O exits are also counted by port and direction. One
   pointer argument: each cffi argument costs a conversion on every exit. */
static int kvmpy_run_acct(struct kvmpy_acct *a)
{
    struct kvm_run *run = a->run;
    uint64_t t0 = kvmpy_now();
    int r = ioctl(a->fd, KVM_RUN, 0) < 0 ? -errno : 0;
    uint64_t t1 = kvmpy_now();
    unsigned reason;
    if (r == -EINTR || r == -EAGAIN)
        reason = KVM_EXIT_INTR;
    else if (r < 0)
        return r;
    else
        reason = run->exit_reason < KVMPY_ACCT_REASONS ? run->exit_reason : KVMPY_ACCT_REASONS - 1;
    a->guest[reason * KVMPY_ACCT_BUCKETS + kvmpy_bucket(t1 - t0)]++;
    if (a->last >= 0) {
        uint64_t d = t0 - a->t_leave;  /* the VMM's time on the previous exit */
        a->vmm[a->last * KVMPY_ACCT_BUCKETS + kvmpy_bucket(d)]++;
        a->vmm_total[a->last] += d;
        a->last_vmm_ns = d;
    } else {
        a->t_first = t0;
        a->last_vmm_ns = 0;
    }
    a->last = reason;
    a->t_enter = t0;
    a->t_leave = t1;
    if (reason == KVM_EXIT_IO)
        kvmpy_acct_count_port(a, ((uint32_t)run->io.direction << 16 | run->io.port) + 1);
    return r;
}

static void kvmpy_kick(int signo) { (void)signo; }

/* A handler that does nothing, installed without SA_RESTART: a signal sent
   to a vCPU thread makes its KVM_RUN return EINTR (the "kick"). */
static int kvmpy_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmpy_kick;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

static int kvmpy_sigrtmin(void) { return SIGRTMIN; }

/* Harvest a vCPU's dirty ring (KVM API doc, KVM_CAP_DIRTY_LOG_RING): from
   *fetch on, every entry KVM published (DIRTY, read with acquire) becomes
   out[i] = slot << 32 | page offset and is handed back (RESET, stored with
   release) for KVM_RESET_DIRTY_RINGS. Stops at the first unpublished entry
   or when out is full; returns the number harvested. */
static uint32_t kvmpy_harvest_dirty_ring(struct kvm_dirty_gfn *ring, uint32_t entries, uint32_t *fetch,
                                         uint64_t *out, uint32_t max_out)
{
    uint32_t n = 0;
    while (n < max_out) {
        struct kvm_dirty_gfn *e = &ring[*fetch & (entries - 1)];
        if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
            break;
        out[n++] = (uint64_t)e->slot << 32 | (e->offset & 0xffffffffu);
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        (*fetch)++;
    }
    return n;
}
"""


def _require_headers() -> None:
    missing = [str(h) for h in (HEADER, ARCH_HEADER, VHOST_HEADER) if not h.is_file()]
    if missing:
        raise RuntimeError(f"kvmpy's bindings compile against {', '.join(missing)}, which is missing; "
                           "install Debian's linux-libc-dev (scripts/install-deps.sh does)")


def _header_constants() -> list[str]:
    names: list[str] = []
    pattern = re.compile(r"^\s*#define\s+(KVM_[A-Z0-9_]+)\s+(\(?\s*-?(0x[0-9a-fA-F]+|\d+)|\(1\s*<<\s*\d+\))")
    for header in (HEADER, ARCH_HEADER):
        for line in header.read_text().splitlines():
            m = pattern.match(line)
            if m and m.group(1).startswith(CONSTANT_PREFIXES) and m.group(1) not in names:
                names.append(m.group(1))
    return names


def _cdef() -> str:
    declared = set(re.findall(r"#define (\w+) \.\.\.", CDEF))
    extra = [n for n in _header_constants() + IOCTLS if n not in declared]
    return CDEF + "".join(f"#define {n} ...\n" for n in dict.fromkeys(extra))


_require_headers()
ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source("kvmpy._kvm", C_SOURCE)
