"""Sandboxed guest functions: freestanding code run in a fresh VM, no Linux.

    import kvmpy.sandbox as sandbox
    sandbox.run("long guest_main(long a, long b) { return a * b; }", args=(6, 7))   # 42

A guest function is C (compiled with ``gcc -ffreestanding -nostdlib -fno-pic
-static -O2`` and linked by ``sandbox_guest/link.ld``), assembly, or flat
machine code. Each call gets a VM of its own: memory, one vCPU, nothing
else, all closed in a ``finally`` whatever the guest did.

The payload runs at guest CPL3 (user mode), where guest code runs natively
on every backend, including this project's software one. KVM_RUN enters it
at CPL3 directly (through a prologue that loads null data selectors); the
only CPL0 code is the exception handlers, which just report the vector to
the host. RFLAGS.IOPL is 0, so the payload cannot do port I/O itself: an
``out`` to 0xE0 (the old host-call form) raises #GP, the CPL0 #GP handler
reports that, and the host answers it after checking the faulting
instruction is exactly that ``out``.

The host believes a report only when it comes from the stub (the sandbox
ABI cannot be forged from the payload): the exit must be at CPL0, at the
stub's own address for that vector, with RSP exactly where the CPU pushes
an exception frame coming from CPL3 (TSS.RSP0 minus the frame). The frame
is then the CPU's, not the payload's; anything else raises `SandboxError`.

Guest-physical (= virtual, identity-mapped with 2 MiB pages) layout:

    0x000000-0x1fffff  supervisor only: GDT 0x500, IDT 0x1000, TSS 0x2000,
                       stubs 0x3000, page tables 0x9000, kernel stack to 0x80000
    0x200000           the ABI block (kvmpy_guest.h), return trampoline at +0x800,
                       entry prologue at +0x840
    0x201000           the image (.text .rodata .data .bss), then the heap
                       (byte arguments first), then the stack down from the top
    memory limit       nothing mapped: any access is a page fault
    0xc0000000         the doorbell: a user 2 MiB page backed by no memory slot

Host-call ABI: the guest writes arguments to the ABI block and stores the
call's number to the doorbell, a user page at DOORBELL_ADDR (3 GiB) that
no memory slot backs, so the store is an MMIO exit straight from CPL3 with
no privilege switch (``outb nr, 0xE0`` works too, through the #GP gate
below, at the price of a switch to CPL0 and back). Numbers: 0 return (result in ``ret``), 1 write
bytes to the host, 2 abort, 16+ the caller's ``hostcalls``. A fault inside
the guest enters a CPL0 handler that does ``out`` to port 0xC0 + vector; the
host reads the exception frame and raises `GuestFault` (vector, RIP, CR2,
error code). A time budget is a deadline on one watchdog thread that kicks the vCPU
(`VcpuLoop.stop`); it raises `BudgetExceeded`.

Warm VMs (``GuestFunction(..., warm=True)``): the first call in a thread
builds the VM and takes a `kvmpy.warm.Checkpoint` of it before any argument
is loaded; every call then is the argument writes, KVM_RUN, and a reset to
that checkpoint (dirtied pages copied back, registers through kvm_run's
synced registers, XSAVE state), so nothing of one call is visible to the
next. A call that ends in a way the sandbox did not foresee closes its VM
instead; the next call in that thread builds a new one.
"""

from __future__ import annotations

import hashlib
import heapq
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ._kvm import lib
from .bus import mmio_bus, pio_bus
from .cache import cache_root, store
from .dirty import DEFAULT_RING_ENTRIES, DirtyLogMode, ring_capability
from .errors import GuestMemoryError, KvmError
from .exits import Exit, IntrExit, ShutdownExit
from .kvm import Kvm
from .memory import GuestMemory, parse_size
from .runloop import VcpuLoop
from .warm import SYNC_REGS, Checkpoint
from .x86 import modes
from .x86.asm import assemble

RUNTIME_DIR = Path(__file__).resolve().parent / "sandbox_guest"

# -- layout (must match sandbox_guest/kvmpy_guest.h and link.ld) ---------------
SUPERVISOR_END = 0x200000
ABI_ADDR = 0x200000
TRAMPOLINE_ADDR = ABI_ADDR + 0x800
IMAGE_BASE = 0x201000
STUB_ADDR = 0x3000  # fault handlers: 16 bytes per vector
KSTACK_TOP = 0x80000
HOSTCALL_PORT = 0xE0
DOORBELL_ADDR = 0xC000_0000  # GVA = GPA; in the page tables (user, 2 MiB), in no memory slot
FAULT_PORT_BASE = 0xC0  # + vector, 0..31
ABI_MAGIC = int.from_bytes(b"KVMPYABI", "little")

HC_RETURN, HC_WRITE, HC_ABORT, HC_USER = 0, 1, 2, 16

DEFAULT_MEMORY = 16 << 20
MIN_MEMORY = 4 << 20
MAX_MEMORY = 3 << 30  # below the 32-bit MMIO hole: one RAM region
DEFAULT_STACK = 256 << 10
MAX_OUTPUT = 1 << 20

_ABI = struct.Struct("<Q6QqQQ")  # magic, args[6], ret, heap_start, heap_end
_ABI_ARGS, _ABI_RET, _ABI_HEAP_START = ABI_ADDR + 8, ABI_ADDR + 56, ABI_ADDR + 64

GP_VECTOR = 13
_FRAME = 40  # RIP, CS, RFLAGS, RSP, SS: what the CPU pushes on TSS.RSP0 for an exception from CPL3
_OUT_HOSTCALL = bytes([0xE6, HOSTCALL_PORT])  # out %al, $0xE0
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
    10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault",
    13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check",
    18: "#MC machine check", 19: "#XM SIMD floating point", 20: "#VE virtualization", 21: "#CP control protection",
}

CFLAGS = ("-ffreestanding", "-nostdlib", "-fno-pic", "-static", "-O2", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-mno-red-zone", "-fno-builtin")


# -- errors ----------------------------------------------------------------------

class SandboxError(KvmError):
    """A guest function could not be built or did not return normally."""


class CompileError(SandboxError):
    """gcc (or as/ld) rejected the guest source; the message has its diagnostics."""


class GuestFault(SandboxError):
    """The guest took a CPU exception: `vector`, `rip`, `cr2` (for #PF) and `error_code`."""

    def __init__(self, vector: int, rip: int, cr2: int, error_code: int | None, cpl: int,
                 message: str | None = None) -> None:
        self.vector, self.rip, self.cr2, self.error_code, self.cpl = vector, rip, cr2, error_code, cpl
        name = EXCEPTION_NAMES.get(vector, f"vector {vector}")
        text = f"guest fault {name} (vector {vector}) at rip {rip:#x}, cr2 {cr2:#x}"
        if error_code is not None:
            text += f", error code {error_code:#x}"
        text += f", cpl {cpl}"
        super().__init__(text + (f": {message}" if message else ""))


class MemoryLimitExceeded(GuestFault):
    """A page fault on an address outside the guest's memory (or its supervisor area)."""


class BudgetExceeded(SandboxError):
    """The guest ran past its time or host-call budget and was stopped."""

    def __init__(self, message: str, *, rip: int | None = None, elapsed: float = 0.0) -> None:
        self.rip, self.elapsed = rip, elapsed
        super().__init__(message + (f" (stopped at rip {rip:#x})" if rip is not None else ""))


class GuestAbort(SandboxError):
    """The guest called kvmpy_abort(code, message)."""

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"guest aborted with code {code}: {message}")


# -- building images ---------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    vaddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class Image:
    """A loadable guest function: segments at their addresses and the entry point."""

    segments: tuple[Segment, ...]
    entry: int

    @property
    def end(self) -> int:
        return max((s.vaddr + s.memsz for s in self.segments), default=IMAGE_BASE)

    @classmethod
    def flat(cls, code: bytes, entry_offset: int = 0) -> Image:
        return cls((Segment(IMAGE_BASE, bytes(code), len(code)),), IMAGE_BASE + entry_offset)


def _elf_image(elf: bytes, what: str) -> Image:
    """PT_LOAD segments and e_entry of a static ELF64 (System V gABI, "Program Header")."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise CompileError(f"{what}: not an ELF64 file")
    entry, phoff = struct.unpack_from("<QQ", elf, 24)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 1 and p_memsz:
            segments.append(Segment(p_vaddr, elf[p_offset:p_offset + p_filesz], p_memsz))
    for s in segments:
        if s.vaddr < IMAGE_BASE:
            raise CompileError(f"{what}: segment at {s.vaddr:#x} is below the image base {IMAGE_BASE:#x}")
    if not any(s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        raise CompileError(f"{what}: entry {entry:#x} is in no loaded segment")
    return Image(tuple(segments), entry)


def compile_c(source: str, *, entry: str = "guest_main", extra_flags: Sequence[str] = ()) -> Image:
    """Compile freestanding C into an `Image` (cached by content under ~/.cache/kvmpy/sandbox)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise CompileError("gcc not found: install it (apt-get install gcc)")
    runtime = [RUNTIME_DIR / "runtime.c", RUNTIME_DIR / "kvmpy_guest.h", RUNTIME_DIR / "link.ld"]
    h = hashlib.sha256()
    for part in (source, entry, " ".join(CFLAGS), " ".join(extra_flags), *(p.read_text() for p in runtime)):
        h.update(part.encode() + b"\0")
    cached = cache_root() / "sandbox" / f"{h.hexdigest()[:24]}.elf"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="kvmpy-sandbox-") as tmp:
            src, out = Path(tmp) / "guest.c", Path(tmp) / "guest.elf"
            src.write_text(source)
            cmd = [gcc, *CFLAGS, *extra_flags, "-I", str(RUNTIME_DIR), "-T", str(RUNTIME_DIR / "link.ld"),
                   f"-Wl,-e,{entry}", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096",
                   "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments",
                   "-o", str(out), str(src), str(RUNTIME_DIR / "runtime.c")]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                numbered = "\n".join(f"{i + 1:4} {line}" for i, line in enumerate(source.splitlines()))
                raise CompileError(f"gcc failed:\n{p.stderr.strip()}\n--- source ---\n{numbered}")
            nm = subprocess.run(["nm", "--defined-only", str(out)], capture_output=True, text=True)
            if f" {entry}\n" not in nm.stdout:
                raise CompileError(f"the guest source defines no function {entry!r} (the entry point)")
            elf = out.read_bytes()
        store(cached, elf)
    else:
        elf = cached.read_bytes()
    return _elf_image(elf, f"guest C source (entry {entry})")


def assemble_image(source: str) -> Image:
    """Assembly (GNU as, AT&T syntax) whose first instruction is the entry point."""
    try:
        return Image.flat(assemble(source, "64", IMAGE_BASE))
    except KvmError as e:
        raise CompileError(str(e)) from e


def build_image(code: str | bytes | Image, lang: str | None = None, *, entry: str = "guest_main") -> Image:
    """C source (a str, the default), assembly (lang="asm") or flat machine code (bytes)."""
    if isinstance(code, Image):
        return code
    if isinstance(code, (bytes, bytearray, memoryview)):
        if lang not in (None, "bin"):
            raise ValueError(f"bytes are machine code; lang={lang!r} makes no sense for them")
        return Image.flat(bytes(code))
    if lang in (None, "c"):
        return compile_c(code, entry=entry)
    if lang == "asm":
        return assemble_image(code)
    raise ValueError(f"lang must be 'c', 'asm' or None (C), not {lang!r}")


# -- the low-memory image (tables and stubs), built once per memory size ----------

def _stub_code() -> bytes:
    lines = []
    for v in range(32):
        # out %al, $imm8 is two bytes; pad every handler to 16 bytes. The #GP
        # handler can resume: the host answers an `out` the CPU refused at
        # CPL3 (a backend without IOPL at CPL3), moves the frame's RIP past
        # it, and the handler returns to the payload.
        tail = "add $8, %rsp\n iretq" if v == GP_VECTOR else "hlt\n jmp ."
        lines.append(f".org {v * 16}\n out %al, ${FAULT_PORT_BASE + v}\n {tail}")
    return assemble("\n".join(lines), "64", STUB_ADDR)


_TRAMPOLINE = f"""
    mov ${DOORBELL_ADDR:#x}, %ecx   # above 2 GiB: no sign-extended disp32 reaches it
    movb $0, (%rcx)              # HC_RETURN: the host reads the result from rax
    jmp .
"""

PROLOGUE_ADDR = TRAMPOLINE_ADDR + 0x40

# Where a call starts, at CPL3: null data selectors, then the payload. KVM_SET_SREGS
# should be enough; on this project's PVM backend native CPL3 code keeps the selectors
# the previous call loaded (measured by tests/integration/test_warm_sandbox.py).
_PROLOGUE = """
    xor %eax, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    jmp {entry:#x}
"""
_prologues: dict[int, bytes] = {}


def _prologue(entry: int) -> bytes:
    code = _prologues.get(entry)
    if code is None:
        code = _prologues[entry] = assemble(_PROLOGUE.format(entry=entry), "64", PROLOGUE_ADDR)
    return code


_low_images: dict[int, bytes] = {}
_low_lock = threading.Lock()


def _low_image(memory: int) -> bytes:
    """Bytes [0, 0x10000) for a sandbox of `memory` bytes: GDT, IDT, TSS, stubs, page tables."""
    with _low_lock:
        cached = _low_images.get(memory)
        if cached is not None:
            return cached
        with GuestMemory(0x10000) as scratch:
            modes.write_tss(scratch, rsp0=KSTACK_TOP)
            modes.write_gdt(scratch, tss_base=modes.TSS_ADDR, long_mode=True)
            modes.write_idt(scratch, {v: STUB_ADDR + v * 16 for v in range(32)}, long_mode=True)
            scratch.write(STUB_ADDR, _stub_code())
            # Page tables: 2 MiB pages over [0, memory) only; the first one
            # supervisor-only, the rest user. Nothing else is mapped.
            p, rw, us, ps = modes.PTE_P, modes.PTE_RW, modes.PTE_US, modes.PTE_PS
            scratch.write_u64(modes.PML4_ADDR, modes.PDPT_ADDR | p | rw | us)
            pages = memory >> 21
            for g in range((pages + 511) // 512):
                scratch.write_u64(modes.PDPT_ADDR + g * 8, (modes.PD_ADDR + g * 4096) | p | rw | us)
            # The doorbell: PDPT slot 3 -> the fourth page directory, one user 2 MiB page.
            scratch.write_u64(modes.PDPT_ADDR + 3 * 8, (modes.PD_ADDR + 3 * 4096) | p | rw | us)
            scratch.write_u64(modes.PD_ADDR + 3 * 4096, DOORBELL_ADDR | p | rw | us | ps)
            entries = b"".join(struct.pack("<Q", (i << 21) | p | rw | ps | (us if i else 0))
                               for i in range(pages))
            for g in range(0, len(entries), 4096):
                scratch.write(modes.PD_ADDR + g, entries[g:g + 4096])
            image = scratch.read(0, 0x10000)
        _low_images[memory] = image
        return image


_trampoline_code: bytes | None = None


def _trampoline() -> bytes:
    global _trampoline_code
    if _trampoline_code is None:
        _trampoline_code = assemble(_TRAMPOLINE, "64", TRAMPOLINE_ADDR)
    return _trampoline_code


_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def shared_kvm() -> Kvm:
    """One /dev/kvm handle for all sandboxes of this process (opened on first use)."""
    with _shared_lock:
        kvm = _shared.get("kvm")
        if kvm is None:
            kvm = _shared["kvm"] = Kvm()
            _shared["cpuid"] = kvm.get_supported_cpuid()
        return kvm


def _supported_cpuid(kvm: Kvm) -> list:
    if kvm is _shared.get("kvm"):
        return _shared["cpuid"]
    return kvm.get_supported_cpuid()


# -- running ------------------------------------------------------------------------

Arg = int | bytes | bytearray | memoryview | str


@dataclass
class GuestContext:
    """What a host-call handler sees: bounds-checked access to the guest's user memory."""

    memory: GuestMemory
    limit: int
    output: bytearray = field(default_factory=bytearray)
    on_write: Callable[[int, int], None] | None = None  # a warm VM restores what the host wrote

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size)
        return self.memory.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self.memory.write(addr, data)
        if self.on_write is not None:
            self.on_write(addr, len(data))

    def _check(self, addr: int, size: int) -> None:
        if size < 0 or addr < ABI_ADDR or addr + size > self.limit:
            raise SandboxError(f"guest buffer [{addr:#x}, {addr + size:#x}) is outside its memory "
                               f"[{ABI_ADDR:#x}, {self.limit:#x})")


HostCall = Callable[..., int]


@dataclass(frozen=True)
class RunResult:
    """A guest function's result: `value` (its signed 64-bit return value) and what it wrote."""

    value: int
    output: bytes
    elapsed: float  # seconds from VM creation to teardown
    hostcalls: int


class _Hostcalls:
    """The PIO device on the host-call and fault ports; `run` is the call in progress."""

    def __init__(self, run: _Run | None = None) -> None:
        self.run = run

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if self.run is not None:
            self.run.on_port(FAULT_PORT_BASE + offset, value & 0xFF)


class _Doorbell:
    """The MMIO device on the doorbell page: a store of a host-call number is a host call."""

    def __init__(self, run: _Run | None = None) -> None:
        self.run = run

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        run = self.run
        if run is not None and run.returned is None and run.error is None:
            nr = value & 0xFF
            if nr == HC_RETURN:  # the result is in rax (kvm_run's synced registers): no store, no fault
                run.returned = _signed(run.loop.vcpu.run_struct.s.regs.regs.rax)
                run.loop.stop()
            else:
                run._on_hostcall(nr)


class _Watchdog:
    """One daemon thread for every sandbox's time budget: deadlines in a heap, no thread per call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._firing: list[Any] | None = None
        self._seq = 0
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fn: Callable[[], None]) -> list[Any]:
        with self._cond:
            self._seq += 1
            entry = [time.monotonic() + seconds, self._seq, fn]
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="kvmpy-sandbox-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return entry

    def disarm(self, entry: list[Any]) -> None:
        """Cancel `entry`; if its callback is running now, wait for it (no kick may outlive its call)."""
        with self._cond:
            entry[2] = None
            while self._firing is entry:
                self._cond.wait()

    def _main(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)
                fn, entry[2] = entry[2], None
                self._firing = entry
                self._cond.release()
                try:
                    fn()
                finally:
                    self._cond.acquire()
                    self._firing = None
                    self._cond.notify_all()


_watchdog = _Watchdog()


class ForgedReport(SandboxError):
    """An exit on the sandbox's report ports that did not come from its CPL0 stub."""


class _WarmVm:
    """One reusable VM of a guest function: built once, checkpointed before any argument, reset after each call."""

    def __init__(self, fn: GuestFunction) -> None:
        kvm = fn.kvm or shared_kvm()
        self.vm = vm = kvm.create_vm()
        self.mem: GuestMemory | None = None
        try:
            self.mem = mem = GuestMemory(fn.memory)
            _load_static(fn, mem)
            vm.add_memory(mem)
            mode = fn.dirty_mode
            if mode is None:  # the bitmap can leave hot pages writable; the ring cannot
                manual = vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0
                mode = DirtyLogMode.RING if ring_capability(vm) and not manual else DirtyLogMode.BITMAP
            if mode is DirtyLogMode.RING:
                vm.enable_dirty_ring(DEFAULT_RING_ENTRIES)
            self.vcpu = vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(_supported_cpuid(kvm))
            _setup_cpu(fn, vcpu, mem, [])
            self.device, self.doorbell = _Hostcalls(), _Doorbell()
            pio, mmio = pio_bus(), mmio_bus()
            pio.register(FAULT_PORT_BASE, HOSTCALL_PORT - FAULT_PORT_BASE + 1, self.device, "sandbox")
            mmio.register(DOORBELL_ADDR, 8, self.doorbell, "sandbox doorbell")
            # The payload runs at CPL3: it cannot write MSRs, debug registers or XCR0 (all #GP),
            # so the vCPU state it can change is the synced registers and the FPU/SSE state.
            self.checkpoint: Checkpoint = vm.checkpoint(system=False, dirty_mode=mode)
            handlers = {}
            if mode is DirtyLogMode.RING:
                handlers[lib.KVM_EXIT_DIRTY_RING_FULL] = self.checkpoint.tracker.on_ring_full
            self.loop = VcpuLoop(vcpu, pio, mmio, handlers=handlers, complete_io_on_stop=False)
            self.checkpoint.reset()  # primes kvm_run's synced registers for the first call
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.vm.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.loop = None  # type: ignore[assignment]


def _load_static(fn: GuestFunction, mem: GuestMemory) -> None:
    """What every call of `fn` starts with: tables, stubs, trampoline, image, return address, entry frame."""
    mem.write(0, _low_image(fn.memory))
    mem.write(TRAMPOLINE_ADDR, _trampoline())
    mem.write(PROLOGUE_ADDR, _prologue(fn.image.entry))
    for seg in fn.image.segments:
        mem.write(seg.vaddr, seg.data)
    # The function returns to the trampoline, which reports rax.
    mem.write_u64(fn.memory - 8, TRAMPOLINE_ADDR)


def _load_args(fn: GuestFunction, mem: GuestMemory, args: Sequence[Arg],
               wrote: Callable[[int, int], None] | None = None) -> list[int]:
    """Copy byte arguments to the heap and write the ABI block; the register values of the arguments."""
    heap_end = fn.memory - fn.stack_size
    heap = (fn.image.end + 15) & ~15
    values = []
    for i, a in enumerate(args):
        if isinstance(a, int):
            values.append(a & (2**64 - 1))
            continue
        data = a.encode() + b"\0" if isinstance(a, str) else bytes(a)
        if heap + len(data) > heap_end:
            raise SandboxError(f"argument {i} ({len(data)} bytes) does not fit in the guest's "
                               f"memory limit of {fn.memory >> 20} MiB")
        mem.write(heap, data)
        if wrote is not None:
            wrote(heap, len(data))
        values.append(heap)
        heap = (heap + len(data) + 15) & ~15
    mem.write(ABI_ADDR, _ABI.pack(ABI_MAGIC, 0, 0, 0, 0, 0, 0, 0, heap, heap_end))
    if wrote is not None:
        wrote(ABI_ADDR, _ABI.size)
    return values


_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _setup_cpu(fn: GuestFunction, vcpu: Any, mem: GuestMemory, values: list[int]) -> None:
    s = vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = modes.GDT_ADDR, 9 * 8 + 8 - 1
    s.idt.base, s.idt.limit = modes.IDT_ADDR, 256 * 16 - 1
    # A user-mode payload starts at CPL3 straight from KVM_RUN: no CPL0 code
    # (emulated on the PVM backend) and no privilege switch before it runs.
    code, data = (modes.USER_CODE64, modes.USER_DATA) if fn.user_mode else (modes.CODE64, modes.DATA)
    code.load(s.cs)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        data.load(seg)
    tr = s.tr
    tr.base, tr.limit, tr.selector = modes.TSS_ADDR, 0x67, modes.TSS_SEL
    tr.type, tr.present, tr.s, tr.dpl, tr.db, tr.l, tr.g, tr.unusable = 0xB, 1, 0, 0, 0, 0, 0, 0
    s.cr3 = modes.PML4_ADDR
    s.cr4 = modes.CR4_PAE | modes.CR4_OSFXSR | modes.CR4_OSXMMEXCPT
    s.cr0 = modes.CR0_PE | modes.CR0_MP | modes.CR0_ET | modes.CR0_NE | modes.CR0_WP | modes.CR0_PG
    s.efer = modes.EFER_LME | modes.EFER_LMA
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    for name, v in zip(_ARG_REGS, values):
        setattr(r, name, v)
    r.rip, r.rsp, r.rflags = PROLOGUE_ADDR, fn.memory - 8, modes.RFLAGS_RESERVED  # IOPL 0, IF 0
    vcpu.set_regs(r)
    # Every exit leaves regs and sregs in kvm_run: the report checks read them without an ioctl.
    vcpu.run_struct.kvm_valid_regs |= SYNC_REGS


class _Run:
    """One call of a guest function, in a fresh VM (torn down after) or in the thread's warm VM."""

    def __init__(self, fn: GuestFunction, args: Sequence[Arg], timeout: float | None,
                 hostcalls: Mapping[int, HostCall], max_hostcalls: int | None) -> None:
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.hostcalls = hostcalls
        self.max_hostcalls = max_hostcalls
        self.calls = 0
        self.returned: int | None = None
        self.error: BaseException | None = None
        self.budget_hit = False
        self.loop: VcpuLoop | None = None
        self.checkpoint: Checkpoint | None = None

    def execute(self) -> RunResult:
        if self.fn.warm:
            return self._execute_warm()
        fn = self.fn
        kvm = fn.kvm or shared_kvm()
        t0 = time.perf_counter()
        vm = kvm.create_vm()
        mem: GuestMemory | None = None
        try:
            mem = GuestMemory(fn.memory)
            self.mem = mem
            self.ctx = GuestContext(mem, fn.memory)
            _load_static(fn, mem)
            values = _load_args(fn, mem, self.args)
            vm.add_memory(mem)
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(_supported_cpuid(kvm))
            _setup_cpu(fn, vcpu, mem, values)
            pio, mmio = pio_bus(), mmio_bus()
            pio.register(FAULT_PORT_BASE, HOSTCALL_PORT - FAULT_PORT_BASE + 1, _Hostcalls(self), "sandbox")
            mmio.register(DOORBELL_ADDR, 8, _Doorbell(self), "sandbox doorbell")
            self.loop = VcpuLoop(vcpu, pio, mmio, complete_io_on_stop=False)  # the VM is closed after
            exit = self._run_loop()
            return self._outcome(vcpu, exit, time.perf_counter() - t0)
        finally:
            vm.close()
            if mem is not None:
                mem.close()
            # Break the cycle run -> loop -> bus -> device -> run at once, so a pool's
            # hundreds of VMs never wait for the garbage collector.
            self.loop = None

    def _execute_warm(self) -> RunResult:
        fn = self.fn
        t0 = time.perf_counter()
        warm = fn._take_warm_vm()
        keep = False
        try:
            self.mem = mem = warm.mem  # type: ignore[assignment]
            self.checkpoint = cp = warm.checkpoint
            self.ctx = GuestContext(mem, fn.memory, on_write=cp.note_write)
            values = _load_args(fn, mem, self.args, cp.note_write)
            regs = warm.vcpu.run_struct.s.regs.regs  # the checkpoint's, loaded at the next KVM_RUN
            for name, v in zip(_ARG_REGS, values):
                setattr(regs, name, v)
            self.loop = warm.loop
            warm.loop.rearm()
            warm.device.run = warm.doorbell.run = self
            exit = self._run_loop()
            keep = self.returned is not None or self.error is not None or self.budget_hit
            return self._outcome(warm.vcpu, exit, time.perf_counter() - t0)
        finally:
            warm.device.run = warm.doorbell.run = None
            self.loop = None
            try:
                if keep:
                    cp.reset()  # nothing of this call survives into the next
            except BaseException:
                keep = False
                raise
            finally:
                fn._give_back_warm_vm(warm, keep)

    def _run_loop(self) -> Exit:
        assert self.loop is not None
        if self.timeout is None:
            return self.loop.run()
        entry = _watchdog.arm(self.timeout, self._expire)
        try:
            return self.loop.run()
        finally:
            _watchdog.disarm(entry)

    def _expire(self) -> None:
        self.budget_hit = True
        loop = self.loop
        if loop is not None:
            loop.stop()

    # -- exits ------------------------------------------------------------------------

    def on_port(self, port: int, value: int) -> None:
        assert self.loop is not None
        if self.returned is not None or self.error is not None:
            return
        try:
            if port == HOSTCALL_PORT:
                if self.fn.user_mode:
                    # IOPL 0 and no stub does this: only forged code could.
                    raise ForgedReport("an exit on the host-call port 0xe0 did not come through the "
                                       "sandbox's #GP gate")
                self._on_hostcall(value)  # a CPL0 payload (user_mode=False) does port I/O itself
                return
            vector = port - FAULT_PORT_BASE
            frame = self._report_frame(vector)
            if vector == GP_VECTOR and self._hostcall_via_gp(frame):
                return
            self.error = self._fault(vector, frame)
        except SandboxError as e:
            self.error = e
        self.loop.stop()

    def _report_frame(self, vector: int) -> int:
        """The address of the exception frame of a report, after checking the stub made the report."""
        s = self.loop.vcpu.run_struct.s.regs  # type: ignore[union-attr]
        stub = STUB_ADDR + vector * 16
        cpl = s.sregs.cs.selector & 3
        rip, rsp = s.regs.rip, s.regs.rsp
        if cpl != 0 or rip not in (stub, stub + 2):
            raise ForgedReport(f"a report on fault port {FAULT_PORT_BASE + vector:#x} came from rip {rip:#x} "
                               f"at cpl {cpl}, not from the sandbox's handler for vector {vector} at {stub:#x}")
        with_code = 8 if vector in _ERROR_CODE_VECTORS else 0
        if self.fn.user_mode:
            expected = KSTACK_TOP - _FRAME - with_code
            if rsp != expected:
                raise ForgedReport(f"the handler for vector {vector} ran with rsp {rsp:#x}, not on the "
                                   f"exception frame the CPU pushes at {expected:#x}")
        elif not KSTACK_TOP <= rsp <= self.fn.memory - _FRAME - with_code:
            raise ForgedReport(f"the exception frame at rsp {rsp:#x} is outside the guest's memory")
        return rsp

    def _hostcall_via_gp(self, frame: int) -> bool:
        """A #GP on the payload's `out` to the host-call port: answer it as the host call.

        The payload runs with IOPL 0, so its `out` faults instead of exiting;
        the CPL0 #GP handler reports it and, once the host moved the frame's
        RIP past the `out`, returns to the payload.
        """
        rip, cs = struct.unpack("<QQ", self.mem.read(frame + 8, 16))  # past the error code
        if cs & 3 != 3 or not ABI_ADDR <= rip < self.fn.memory - 2 or self.mem.read(rip, 2) != _OUT_HOSTCALL:
            return False
        self.mem.write_u64(frame + 8, rip + 2)
        if self.checkpoint is not None:
            self.checkpoint.note_write(frame + 8, 8)
        self._on_hostcall(self.loop.vcpu.run_struct.s.regs.regs.rax & 0xFF)  # type: ignore[union-attr]
        return True

    def _on_hostcall(self, value: int) -> None:
        assert self.loop is not None
        mem = self.mem
        if value == HC_RETURN:
            self.returned = struct.unpack("<q", mem.read(_ABI_RET, 8))[0]
            self.loop.stop()
            return
        self.calls += 1
        if self.max_hostcalls is not None and self.calls > self.max_hostcalls:
            self.error = BudgetExceeded(f"guest function made more than {self.max_hostcalls} host calls")
            self.loop.stop()
            return
        args = struct.unpack("<6Q", mem.read(_ABI_ARGS, 48))
        try:
            ret = self._hostcall(value, args)
        except Exception as e:  # a host handler failing ends the run with its exception
            self.error = e
            self.loop.stop()
            return
        mem.write(_ABI_RET, struct.pack("<q", _signed(ret)))

    def _hostcall(self, nr: int, args: tuple[int, ...]) -> int:
        ctx = self.ctx
        if nr == HC_WRITE:
            data = ctx.read(args[0], args[1])
            if len(ctx.output) + len(data) > MAX_OUTPUT:
                raise SandboxError(f"guest output exceeds {MAX_OUTPUT} bytes")
            ctx.output += data
            return len(data)
        if nr == HC_ABORT:
            msg = ctx.read(args[1], min(args[2], 4096)).decode(errors="replace")
            raise GuestAbort(_signed(args[0]), msg)
        handler = self.hostcalls.get(nr)
        if handler is None:
            raise SandboxError(f"guest made host call {nr}, which has no handler "
                               f"(known: {sorted(self.hostcalls) or 'none'})")
        return int(handler(ctx, *args))

    def _fault(self, vector: int, rsp: int) -> GuestFault:
        assert self.loop is not None
        cr2 = self.loop.vcpu.run_struct.s.regs.sregs.cr2
        error_code = None
        if vector in _ERROR_CODE_VECTORS:
            error_code = self.mem.read_u64(rsp)
            rsp += 8
        try:
            rip, cs = struct.unpack("<QQ", self.mem.read(rsp, 16))
        except GuestMemoryError as e:  # only a CPL0 payload (user_mode=False) can move the frame
            raise ForgedReport(f"exception frame for vector {vector} at {rsp:#x} is not guest memory") from e
        cpl = cs & 3
        if vector == 14 and cr2 >= self.fn.memory:
            return MemoryLimitExceeded(vector, rip, cr2, error_code, cpl,
                                       f"address {cr2:#x} is beyond the memory limit of {self.fn.memory >> 20} MiB")
        if vector == 14 and cr2 < ABI_ADDR:
            return GuestFault(vector, rip, cr2, error_code, cpl,
                              f"address {cr2:#x} is in the supervisor-only first 2 MiB (a null pointer?)")
        return GuestFault(vector, rip, cr2, error_code, cpl)

    def _outcome(self, vcpu: Any, exit: Exit, elapsed: float) -> RunResult:
        if self.returned is not None:
            return RunResult(self.returned, bytes(self.ctx.output), elapsed, self.calls)
        if self.error is not None:
            # Not raised from self.error: the traceback would hold this frame, and the
            # frame self, a cycle only the GC frees (with the VM's Python objects).
            error, self.error = self.error, None
            try:
                raise error
            finally:
                del error  # nor may this frame's local refer to the exception
        if isinstance(exit, IntrExit) and self.budget_hit:
            rip = vcpu.get_regs().rip
            raise BudgetExceeded(f"guest function ran past its time budget of {self.timeout} s",
                                 rip=rip, elapsed=elapsed)
        if isinstance(exit, ShutdownExit):
            raise SandboxError(f"guest triple-faulted (rip {vcpu.get_regs().rip:#x})")
        raise SandboxError(f"guest stopped with an unexpected exit {exit.name} "
                           f"(rip {vcpu.get_regs().rip:#x})")


def _signed(v: int) -> int:
    v &= 2**64 - 1
    return v - 2**64 if v >> 63 else v


class GuestFunction:
    """A guest function compiled once and run many times, each call in a fresh VM or a warm one.

    `code`: C source (str), assembly (str with lang="asm"), machine code
    (bytes) or an `Image`. `memory` is the whole guest's size and its limit
    (a multiple of 2 MiB, at least 4 MiB); `timeout` the default time budget
    per call in seconds (None: unlimited); `user_mode=False` runs the payload
    at CPL0 (emulated, ~1000x slower on the PVM backend: for tests).

    `warm=True` keeps one VM per calling thread and resets it to its
    checkpoint after every call instead of building a VM per call
    (`dirty_mode`: how the reset finds dirtied pages, the dirty ring where
    KVM has one by default). `close()` (or `with`) frees the warm VMs.
    """

    def __init__(self, code: str | bytes | Image, *, lang: str | None = None, entry: str = "guest_main",
                 memory: int | str = DEFAULT_MEMORY, timeout: float | None = 1.0,
                 stack_size: int = DEFAULT_STACK, hostcalls: Mapping[int, HostCall] | None = None,
                 max_hostcalls: int | None = None, user_mode: bool = True, kvm: Kvm | None = None,
                 warm: bool = False, dirty_mode: DirtyLogMode | str | None = None) -> None:
        self.memory = parse_size(memory)
        if self.memory % (2 << 20) or not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise ValueError(f"sandbox memory {memory!r}: must be a multiple of 2 MiB between "
                             f"{MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 20} MiB")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout {timeout!r}: must be positive seconds or None")
        for nr in hostcalls or {}:
            if not HC_USER <= nr <= 255:
                raise ValueError(f"host call number {nr}: the caller's numbers are {HC_USER}..255")
        self.image = build_image(code, lang, entry=entry)
        self.stack_size = stack_size
        if self.image.end + 4096 > self.memory - stack_size:
            raise SandboxError(f"image ends at {self.image.end:#x}: no room for heap and a "
                               f"{stack_size >> 10} KiB stack in {self.memory >> 20} MiB")
        self.timeout = timeout
        self.hostcalls = dict(hostcalls or {})
        self.max_hostcalls = max_hostcalls
        self.user_mode = user_mode
        self.kvm = kvm
        self.warm = warm
        self.dirty_mode = DirtyLogMode(dirty_mode) if dirty_mode is not None else None
        self._warm_vms: dict[int, _WarmVm] = {}
        self._warm_lock = threading.Lock()
        self.warm_vms_built = 0

    def _take_warm_vm(self) -> _WarmVm:
        with self._warm_lock:
            w = self._warm_vms.pop(threading.get_ident(), None)
        if w is None:
            w = _WarmVm(self)
            self.warm_vms_built += 1
        return w

    def _give_back_warm_vm(self, w: _WarmVm, keep: bool) -> None:
        if keep:
            with self._warm_lock:
                if self.warm and threading.get_ident() not in self._warm_vms:
                    self._warm_vms[threading.get_ident()] = w
                    return
        w.close()

    def close(self) -> None:
        """Close the warm VMs (a later warm call builds a new one)."""
        with self._warm_lock:
            vms, self._warm_vms = list(self._warm_vms.values()), {}
        for w in vms:
            w.close()

    def __enter__(self) -> GuestFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *args: Arg, timeout: float | None | str = "default",
            hostcalls: Mapping[int, HostCall] | None = None) -> RunResult:
        """Call the function with up to six arguments (ints, or bytes/str copied into guest memory
        and passed as pointers) and return its `RunResult`."""
        if len(args) > 6:
            raise ValueError(f"a guest function takes at most 6 arguments, got {len(args)}")
        budget = self.timeout if timeout == "default" else timeout
        calls = {**self.hostcalls, **(hostcalls or {})}
        return _Run(self, args, budget, calls, self.max_hostcalls).execute()  # type: ignore[arg-type]

    def __call__(self, *args: Arg) -> int:
        return self.run(*args).value


def run(code: str | bytes | Image, args: Sequence[Arg] = (), *, lang: str | None = None,
        memory: int | str = DEFAULT_MEMORY, timeout: float | None = 1.0,
        hostcalls: Mapping[int, HostCall] | None = None, entry: str = "guest_main",
        user_mode: bool = True) -> int:
    """Build `code`, run it once in a fresh VM with `args`, return its result."""
    fn = GuestFunction(code, lang=lang, entry=entry, memory=memory, timeout=timeout,
                       hostcalls=hostcalls, user_mode=user_mode)
    return fn.run(*args).value


__all__ = ["BudgetExceeded", "CompileError", "ForgedReport", "GuestAbort", "GuestContext", "GuestFault", "GuestFunction",
           "Image", "MemoryLimitExceeded", "RunResult", "SandboxError", "build_image", "compile_c", "run"]
