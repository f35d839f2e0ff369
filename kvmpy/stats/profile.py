"""Exit-site profile: which guest code causes the exits, and what they cost the VMM.

`ExitProfile` records the guest RIP of exits, every exit or every Nth, with
the exit reason and the VMM time spent handling each sampled exit, and
symbolizes the sites against the guest kernel's symbols (a `System.map`,
or the ELF symbol table of a vmlinux, both read in pure Python).

Where the RIP comes from, cheapest first:
- kvm_run's synced registers (KVM_CAP_SYNC_REGS): when the loop's vCPU has
  KVM_SYNC_X86_REGS in `run->kvm_valid_regs` (the syscall trap sets it on
  the PVM backend), KVM copies the registers into kvm_run on every exit and
  `run.s.regs.regs.rip` costs no ioctl. Profiling every exit is then cheap.
- KVM_GET_REGS otherwise, one ioctl (5-8 us here) per sample, so the
  default is then to sample every 16th exit.

The RIP of a port I/O or MMIO exit on KVM points after the instruction
(KVM skips it before exiting to userspace for `out`, and completes `in`
and MMIO reads on re-entry with RIP already advanced on some backends);
either way it lies in the function that did the access.

    profile = attach(loop, symbols=SymbolTable.for_kernel(vmlinux))  # before loop.run()
    ...
    profile.top_functions(10)
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .._kvm import ffi, lib
from .accounting import ExitAccounting, reason_name

_SYNC_REGS = lib.KVM_SYNC_X86_REGS
DEFAULT_EVERY_WITH_IOCTL = 16
_TEXT_TYPES = frozenset("tTwW")
_KERNEL_HALF = 1 << 63
# Linker markers at the end of a text range: an address from one of them up to
# the next symbol is outside any function (e.g. .rodata after _etext; the init
# text with start_kernel comes after it again).
END_MARKERS = frozenset({"_etext", "_einittext", "__entry_text_end", "__irqentry_text_end",
                         "__softirqentry_text_end", "_end", "__init_end", "__end_rodata"})


def is_end_marker(name: str) -> bool:
    """A linker marker that ends a range ("_etext", "__static_call_text_end", ...), not a function."""
    return name in END_MARKERS or (name.startswith("__") and name.endswith("_end"))


@dataclass(frozen=True)
class Symbol:
    name: str
    addr: int
    size: int  # 0 when unknown (System.map): the symbol then ends at the next one

    def __str__(self) -> str:
        return self.name


class SymbolTable:
    """Function symbols sorted by address; `resolve(addr)` -> (symbol, offset) or None."""

    def __init__(self, symbols: Iterable[Symbol], stops: Iterable[int] = (), source: str = "") -> None:
        syms = sorted({(s.addr, s.name): s for s in symbols}.values(), key=lambda s: (s.addr, s.name))
        self.symbols = syms
        self.functions = len(syms)
        # Stops end the symbol before them; a symbol at the same address wins over a stop.
        starts = {s.addr for s in syms}
        entries: list[Symbol | None] = list(syms)
        entries += [None for a in stops if a not in starts]
        keys = [s.addr for s in syms] + [a for a in stops if a not in starts]
        order = sorted(range(len(keys)), key=lambda i: (keys[i], entries[i] is not None))
        self._addrs = [keys[i] for i in order]
        self._entries = [entries[i] for i in order]
        last = syms[-1] if syms else None
        self.end = last.addr + (last.size or 4096) if last else 0
        self.source = source

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_system_map(cls, path: str | Path) -> SymbolTable:
        """Text symbols of a `System.map` ("ffffffff81000000 T _text" lines); ends at _etext."""
        syms = []
        stops = []
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                    continue
                try:
                    addr = int(parts[0], 16)
                except ValueError:
                    continue
                name = parts[2]
                if is_end_marker(name):
                    stops.append(addr)
                    continue
                syms.append(Symbol(name, addr, 0))
        return cls(syms, stops, str(path))

    @classmethod
    def from_elf(cls, path: str | Path) -> SymbolTable:
        """Code symbols (STT_FUNC, and assembler STT_NOTYPE labels in executable sections) of an
        ELF64 little-endian file's .symtab (a vmlinux built with symbols)."""
        data = Path(path).read_bytes()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{path}: not a little-endian ELF64 file")
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        syms = []
        stops = []
        for sh in sections:
            if sh[1] != 2:  # SHT_SYMTAB
                continue
            _, _, _, _, off, size, link, _, _, entsize = sh
            stroff = sections[link][4]
            for pos in range(off, off + size, entsize or 24):
                name_off, info, _other, shndx, value, sym_size = struct.unpack_from("<IBBHQQ", data, pos)
                if not name_off:
                    continue
                nul = data.index(b"\0", stroff + name_off)
                name = data[stroff + name_off:nul].decode("ascii", "replace")
                if is_end_marker(name):
                    stops.append(value)
                elif (info & 0xF in (0, 2) and 0 < shndx < len(sections)  # STT_NOTYPE/FUNC, defined
                      and sections[shndx][2] & 0x4 and not name.startswith(".L")):  # in SHF_EXECINSTR
                    syms.append(Symbol(name, value, sym_size))
        if not syms:
            raise ValueError(f"{path}: no function symbols (stripped?)")
        return cls(syms, stops, str(path))

    @classmethod
    def for_kernel(cls, kernel: str | Path) -> SymbolTable:
        """Symbols of a guest kernel: the System.map next to it if there is one, else its ELF symtab."""
        kernel = Path(kernel)
        for candidate in (kernel.with_name("System.map"), kernel.parent / f"System.map-{kernel.name}"):
            if candidate.is_file():
                return cls.from_system_map(candidate)
        return cls.from_elf(kernel)

    def resolve(self, addr: int) -> tuple[Symbol, int] | None:
        """The function containing `addr` and the offset into it, or None outside the text."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or addr >= self.end:
            return None
        s = self._entries[i]
        if s is None:
            return None  # past an end marker
        if s.size and addr >= s.addr + s.size:
            return None  # in a gap between sized functions
        return s, addr - s.addr

    def function(self, addr: int) -> str | None:
        r = self.resolve(addr)
        return r[0].name if r else None

    def format(self, addr: int) -> str:
        """"name+0x1c", or a bracketed class of the address when no symbol covers it."""
        r = self.resolve(addr)
        if r is not None:
            return f"{r[0].name}+{r[1]:#x}" if r[1] else r[0].name
        return "[user]" if addr < _KERNEL_HALF else "[kernel, no symbol]"


class ExitProfile:
    """Guest RIPs of exits of one vCPU (every exit, or every `every`th)."""

    def __init__(self, vcpu: Any, every: int | None = None, symbols: SymbolTable | None = None) -> None:
        self.vcpu = vcpu
        self.run = vcpu.run_struct
        self.symbols = symbols
        synced = bool(self.run.kvm_valid_regs & _SYNC_REGS)
        self.every = every if every is not None else (1 if synced else DEFAULT_EVERY_WITH_IOCTL)
        if self.every < 1:
            raise ValueError(f"every must be at least 1, not {self.every}")
        self.samples = 0
        self.sync_samples = 0
        self.hits: Counter[int] = Counter()  # rip -> sampled exits
        self.reasons: Counter[tuple[int, int]] = Counter()  # (rip, reason) -> sampled exits
        self.handled: Counter[tuple[int, str]] = Counter()  # (rip, label) -> sampled exits booked as label
        self.vmm_ns: Counter[int] = Counter()  # rip -> VMM ns handling the sampled exits there
        self._countdown = self.every
        self._last_rip = -1

    def record(self, reason: int, previous_vmm_ns: int) -> None:
        """Called after each exit with the VMM time of the exit before it."""
        if self._last_rip >= 0:
            self.vmm_ns[self._last_rip] += previous_vmm_ns
            self._last_rip = -1
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = self.every
        run = self.run
        if run.kvm_valid_regs & _SYNC_REGS:
            rip = run.s.regs.regs.rip
            self.sync_samples += 1
        else:
            rip = self.vcpu.get_regs().rip
        self.samples += 1
        self.hits[rip] += 1
        self.reasons[rip, reason] += 1
        self._last_rip = rip

    def relabel(self, reason: int, label: str) -> None:
        """The exit just recorded was handled as `label` (ExitAccounting.book_as): book its sample so."""
        rip = self._last_rip
        if rip < 0 or not self.reasons.get((rip, reason)):
            return  # this exit was not sampled
        self.reasons[rip, reason] -= 1
        if not self.reasons[rip, reason]:
            del self.reasons[rip, reason]
        self.handled[rip, label] += 1

    @property
    def source(self) -> str:
        if not self.samples:
            return "none"
        if self.sync_samples == self.samples:
            return "sync_regs"
        return "get_regs" if not self.sync_samples else "mixed"

    def _name(self, rip: int) -> tuple[str, str]:
        if self.symbols is None:
            return f"{rip:#x}", f"{rip:#x}"
        r = self.symbols.resolve(rip)
        if r is None:
            label = self.symbols.format(rip)
            return label, label
        return (f"{r[0].name}+{r[1]:#x}" if r[1] else r[0].name), r[0].name

    def top_sites(self, n: int | None = 20) -> list[dict[str, Any]]:
        """The RIPs with the most sampled exits: rip, symbol, function, count, vmm_ns, reasons."""
        hits, reasons, vmm = self.hits.copy(), self.reasons.copy(), self.vmm_ns.copy()
        by_rip: dict[int, dict[str, int]] = {}
        for (rip, reason), c in reasons.items():
            by_rip.setdefault(rip, {})[reason_name(reason)] = c
        for (rip, label), c in self.handled.copy().items():
            by_rip.setdefault(rip, {})[label] = c
        out = []
        for rip, c in hits.most_common(n):
            symbol, function = self._name(rip)
            out.append({"rip": rip, "symbol": symbol, "function": function, "count": c,
                        "vmm_ns": vmm.get(rip, 0), "reasons": by_rip.get(rip, {})})
        return out

    def top_functions(self, n: int | None = 20) -> list[dict[str, Any]]:
        """Sampled exits and VMM time summed per function, most exits first."""
        counts: Counter[str] = Counter()
        vmm: Counter[str] = Counter()
        reasons: dict[str, Counter[str]] = {}
        for site in self.top_sites(None):
            f = site["function"]
            counts[f] += site["count"]
            vmm[f] += site["vmm_ns"]
            reasons.setdefault(f, Counter()).update(site["reasons"])
        return [{"function": f, "count": c, "vmm_ns": vmm[f], "reasons": dict(reasons[f])}
                for f, c in counts.most_common(n)]

    def snapshot(self, n: int = 30) -> dict[str, Any]:
        return {"every": self.every, "samples": self.samples, "source": self.source,
                "symbols": self.symbols.source if self.symbols is not None else None,
                "sites": self.top_sites(n), "functions": self.top_functions(n)}


class ProfiledAccounting(ExitAccounting):
    """`ExitAccounting` that also feeds an `ExitProfile` on every exit.

    A separate class so that the default accounting pays nothing for
    profiling when it is off.
    """

    per_exit_hook = True

    def __init__(self, vcpu_id: int, profile: ExitProfile) -> None:
        super().__init__(vcpu_id)
        self.profile = profile

    def after_exit(self, reason: int) -> None:
        # The VMM time of the previous exit ended at this exit's KVM_RUN.
        self.profile.record(reason, self.c.last_vmm_ns)

    def book_as(self, label: str) -> None:
        reason = self.c.last
        super().book_as(label)
        if self.c.last != reason:  # booked: the profile's sample of this exit follows
            self.profile.relabel(reason, label)


def attach(loop: Any, *, every: int | None = None, symbols: SymbolTable | None = None) -> ExitProfile:
    """Start profiling `loop`'s exits; call before `loop.run()` (the loop binds its accounting there).

    The loop's accounting is replaced by a `ProfiledAccounting` that carries
    over what was counted so far.
    """
    profile = ExitProfile(loop.vcpu, every, symbols)
    old = loop.accounting
    new = ProfiledAccounting(old.vcpu_id, profile)
    new.assists, new.started_ns, new._mmio = old.assists, old.started_ns, old._mmio
    new._label_row, new._row_label, new._by_label = old._label_row, old._row_label, old._by_label
    if old.c is not None:
        ffi.memmove(new.c, old.c, ffi.sizeof("struct kvmpy_acct"))
    loop.accounting = new
    return profile


def merge_functions(profiles: Iterable[dict[str, Any]], n: int = 20) -> list[dict[str, Any]]:
    """Per-function totals over several profile snapshots (e.g. one per vCPU)."""
    counts: Counter[str] = Counter()
    vmm: Counter[str] = Counter()
    for p in profiles:
        for f in p.get("functions", []):
            counts[f["function"]] += f["count"]
            vmm[f["function"]] += f["vmm_ns"]
    return [{"function": f, "count": c, "vmm_ns": vmm[f]} for f, c in counts.most_common(n)]
