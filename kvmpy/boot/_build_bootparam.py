"""cffi build script (out-of-line API mode) for the Linux x86 boot protocol structures.

Produces the extension module `kvmpy.boot._bootparam` with `ffi` and `lib`.
The layout of `struct boot_params` (the "zero page"), `struct setup_header`
and `struct boot_e820_entry` comes from the system's <asm/bootparam.h>: every
struct below ends in `...;`, so cffi asks the C compiler for the offsets and
sizes instead of trusting this declaration. Only the fields kvmpy reads or
writes are named.

Registered in setup.py as ``cffi_modules=["kvmpy/boot/_build_bootparam.py:ffibuilder"]``.
Run directly (``python kvmpy/boot/_build_bootparam.py`` from the repository
root) it builds the module in place, next to this file.
"""

from __future__ import annotations


import cffi

ffibuilder = cffi.FFI()

ffibuilder.set_source(
    "kvmpy.boot._bootparam",
    """
    #include <asm/bootparam.h>
    #include <asm/e820.h>
    """,
)

ffibuilder.cdef(
    """
    /* Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header" */
    struct setup_header {
        uint8_t  setup_sects;
        uint16_t root_flags;
        uint32_t syssize;
        uint16_t ram_size;
        uint16_t vid_mode;
        uint16_t root_dev;
        uint16_t boot_flag;
        uint16_t jump;
        uint32_t header;
        uint16_t version;
        uint32_t realmode_swtch;
        uint16_t start_sys_seg;
        uint16_t kernel_version;
        uint8_t  type_of_loader;
        uint8_t  loadflags;
        uint16_t setup_move_size;
        uint32_t code32_start;
        uint32_t ramdisk_image;
        uint32_t ramdisk_size;
        uint32_t bootsect_kludge;
        uint16_t heap_end_ptr;
        uint8_t  ext_loader_ver;
        uint8_t  ext_loader_type;
        uint32_t cmd_line_ptr;
        uint32_t initrd_addr_max;
        uint32_t kernel_alignment;
        uint8_t  relocatable_kernel;
        uint8_t  min_alignment;
        uint16_t xloadflags;
        uint32_t cmdline_size;
        uint32_t hardware_subarch;
        uint64_t hardware_subarch_data;
        uint32_t payload_offset;
        uint32_t payload_length;
        uint64_t setup_data;
        uint64_t pref_address;
        uint32_t init_size;
        uint32_t handover_offset;
        ...;
    };

    struct boot_e820_entry {
        uint64_t addr;
        uint64_t size;
        uint32_t type;
        ...;
    };

    /* Documentation/arch/x86/zero-page.rst */
    struct boot_params {
        uint64_t acpi_rsdp_addr;
        uint32_t ext_ramdisk_image;
        uint32_t ext_ramdisk_size;
        uint32_t ext_cmd_line_ptr;
        uint8_t  e820_entries;
        uint8_t  sentinel;
        struct setup_header hdr;
        struct boot_e820_entry e820_table[...];
        ...;
    };

    #define E820_MAX_ENTRIES_ZEROPAGE ...

    /* loadflags */
    #define LOADED_HIGH ...
    #define KASLR_FLAG ...
    #define QUIET_FLAG ...
    #define KEEP_SEGMENTS ...
    #define CAN_USE_HEAP ...

    /* xloadflags */
    #define XLF_KERNEL_64 ...
    #define XLF_CAN_BE_LOADED_ABOVE_4G ...

    /* e820 entry types */
    #define E820_RAM ...
    #define E820_RESERVED ...
    #define E820_ACPI ...
    #define E820_NVS ...
    #define E820_UNUSABLE ...
    """
)
