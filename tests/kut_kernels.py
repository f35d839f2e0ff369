"""Tiny kvm-unit-tests-like kernels: multiboot ELF32, 32-bit code, COM1 output, debug-exit.

`build_kernel(dir, name, lines, exit_code)` assembles a kernel that prints
`lines` on COM1 (polling LSR.THRE like lib/x86/io.c) and writes `exit_code`
to isa-debug-exit (port 0xf4, outl, as exit() does). `mode="hang"` spins
instead of exiting, `mode="fwcfg"` prints fw_cfg's CPU count and signature
first, `mode="args"` prints the command line the loader gave (EBX->cmdline),
`mode="s3"` copies a real-mode stub below 1 MiB, puts its address in the
FACS waking vector, asks for ACPI S3 and, woken there, prints "woke" from
real mode and exits with `exit_code`.
A `build_tree()` lays several out like a built kvm-unit-tests tree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvmpy.x86.acpi import FACS_WAKING_VECTOR, PM1A_CNT_BLK

WAKE_ADDR = 0x8000

_LD = """
OUTPUT_FORMAT("elf32-i386")
ENTRY(start)
SECTIONS { . = 0x400000; .text : { *(.text) } .data : { *(.data) } .bss : { *(.bss) } }
"""

_PUTS = """
puts:                       # esi = NUL-terminated string
    mov $0x3fd, %dx
1:  in (%dx), %al
    test $0x20, %al
    jz 1b
    lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, (%dx)
    jmp puts
2:  ret
putc:                       # al = byte
    mov %al, %ah
    mov $0x3fd, %dx
3:  in (%dx), %al
    test $0x20, %al
    jz 3b
    mov %ah, %al
    mov $0x3f8, %dx
    out %al, (%dx)
    ret
"""


# Real mode, position-independent (relative jumps only): run at WAKE_ADDR.
_WAKE = """
    .code16
wake:
    mov $0x3f8, %dx
    mov $'w', %al
    out %al, (%dx)
    mov $'o', %al
    out %al, (%dx)
    mov $'k', %al
    out %al, (%dx)
    mov $'e', %al
    out %al, (%dx)
    mov $'\\n', %al
    out %al, (%dx)
    mov $0xf4, %dx
    mov ${code}, %al
    out %al, (%dx)
8:  hlt
    jmp 8b
wake_end:
    .code32
"""


def _string(label: str, text: str) -> str:
    return f'{label}: .asciz "{text}\\n"\n'


def build_kernel(directory: Path, name: str, lines: list[str], exit_code: int = 0, *,
                 mode: str = "exit") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    body = ["mov $stack_top, %esp", "mov %ebx, mbi"]
    if mode == "fwcfg":
        body += ["mov $0x05, %ax", "mov $0x510, %dx", "out %ax, (%dx)", "mov $0x511, %dx",
                 "in (%dx), %al", "add $'0', %al", "call putc", "mov $0x00, %ax", "mov $0x510, %dx",
                 "out %ax, (%dx)", "mov $4, %ecx",
                 "4: mov $0x511, %dx", "in (%dx), %al", "push %ecx", "call putc", "pop %ecx",
                 "loop 4b", "mov $'\\n', %al", "call putc"]
    if mode == "args":
        body += ["mov mbi, %ebx", "mov 16(%ebx), %esi", "call puts", "mov $'\\n', %al", "call putc"]
    data = ""
    for i, text in enumerate(lines):
        body += [f"mov $s{i}, %esi", "call puts"]
        data += _string(f"s{i}", text)
    if mode == "hang":
        body += ["5: jmp 5b"]
    elif mode == "s3":
        body += ["mov $wake, %esi", f"mov ${WAKE_ADDR:#x}, %edi", "mov $(wake_end - wake), %ecx", "rep movsb",
                 f"movl ${WAKE_ADDR:#x}, {FACS_WAKING_VECTOR:#x}",
                 f"mov ${PM1A_CNT_BLK:#x}, %dx", "mov $0x2400, %ax", "out %ax, (%dx)",  # SLP_TYP 1, SLP_EN
                 "7: jmp 7b"]  # not reached: the machine resumes at the waking vector
    else:
        body += [f"mov ${exit_code}, %eax", "mov $0xf4, %dx", "out %eax, (%dx)", "6: hlt", "jmp 6b"]
    src = f"""
    .code32
    .text
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002
    .globl start
start:
    {chr(10).join('    ' + b for b in body)}
{_PUTS}
{_WAKE.format(code=exit_code) if mode == "s3" else ""}
    .data
mbi: .long 0
{data}
    .bss
    .space 4096
stack_top:
"""
    s, o, lds, out = (directory / f"{name}.{ext}" for ext in ("s", "o", "ld", "flat"))
    s.write_text(src)
    lds.write_text(_LD)
    subprocess.run(["as", "--32", "-o", str(o), str(s)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(lds), "-o", str(out), str(o)], check=True,
                   capture_output=True)
    return out


CFG = """
[passing]
file = pass.flat
timeout = 20

[failing]
file = fail.flat
smp = 2
test_args = 'one two'
timeout = 20

[skipping]
file = skip.flat
timeout = 20

[hanging]
file = hang.flat
timeout = 3

[only_i386]
file = pass.flat
arch = i386

[manual]
file = pass.flat
groups = nodefault

[missing]
file = notbuilt.flat
"""


def build_tree(root: Path) -> Path:
    x86 = root / "x86"
    build_kernel(x86, "pass", ["PASS: thing: works", "SUMMARY: 1 tests"], 0)
    build_kernel(x86, "fail", ["PASS: a", "FAIL: b: went wrong", "FAIL: c",
                               "SUMMARY: 3 tests, 2 unexpected failures"], 1)
    build_kernel(x86, "skip", ["SKIP: no such feature", "SUMMARY: 1 tests, 1 skipped"], 77 >> 1)
    build_kernel(x86, "hang", ["started"], mode="hang")
    (x86 / "unittests.cfg").write_text(CFG)
    return root
