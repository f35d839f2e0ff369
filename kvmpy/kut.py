"""Run upstream kvm-unit-tests (x86) on kvmpy, and optionally on QEMU beside it.

    kvmpy kvm-unit-tests PATH [--qemu] [--only NAME ...] [--jobs N] [--all] [--markdown FILE]

PATH is a built x86_64 kvm-unit-tests tree (`./configure --arch=x86_64 &&
make`): the runner reads PATH/x86/unittests.cfg, the format of
scripts/common.bash (sections `[name]`; `file`, `smp`, `test_args`,
`qemu_params`/`extra_params` (also triple-quoted), `groups`, `arch`,
`check`, `accel`, `timeout`), and runs each entry's .flat.

Each test runs in its own subprocess (`python -m kvmpy.kut run-one ...`) on
kvmpy's `Machine` (the one that boots Linux): guest RAM (128 MiB or `-m`),
the multiboot loader with the environment module and the command line,
in-kernel irqchip + PIT, COM1, QEMU's test devices (isa-debug-exit, fw_cfg,
pc-testdev, ACPI tables with a PM timer and S3 wake-up), N vCPUs on
threads, instruction completion on.
The parent kills a subprocess that outlives its timeout, so no test hangs.

Verdict (as QEMU's scripts/runtime.bash): debug-exit status 1 -> PASS,
77 -> SKIP, anything else -> FAIL (3: failures, 127: abort, 0: the VM
ended without writing 0xf4); killed at its timeout -> TIMEOUT. Entries the
host cannot run are SKIPped before starting: `arch = i386`, `groups =
nodefault` (unless --all or named with --only), an unmet `check`,
`accel = tcg`, a .flat that was not built.

Of `qemu_params`, kvmpy honours `-m SIZE`, `-machine pit=off` and `-cpu`
(model `max`/`host` adds what KVM emulates to the CPUID table, `+feat`/
`-feat` for the features in `CPU_FEATURES`, `vendor=` is ignored); on the
PVM backend the guest sees the host's CPUID whatever is set. Everything
else (-device, -global, -overcommit, phys-bits, hv_* ...) is ignored and
listed per test in the `ignored` column of `--markdown` output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

DEFAULT_TIMEOUT = 90.0  # scripts/runtime.bash: TIMEOUT default 90s
DEFAULT_MEMORY = 128 << 20  # QEMU's default -m

# -cpu +feat/-feat that kvmpy can express in the CPUID table: (leaf, subleaf, register, bit).
CPU_FEATURES: dict[str, tuple[int, int, str, int]] = {
    "x2apic": (1, 0, "ecx", 21), "tsc-deadline": (1, 0, "ecx", 24), "pcid": (1, 0, "ecx", 17),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "xsave": (1, 0, "ecx", 26),
    "invpcid": (7, 0, "ebx", 10), "umip": (7, 0, "ecx", 2), "smap": (7, 0, "ebx", 20),
    "smep": (7, 0, "ebx", 7), "pku": (7, 0, "ecx", 3), "rdpid": (7, 0, "ecx", 22),
    "rdtscp": (0x8000_0001, 0, "edx", 27),
}  # not +vmx/+svm: kvmpy offers no nested virtualization, so those stay as the host has them


# -- unittests.cfg ----------------------------------------------------------------------

@dataclass
class KutTest:
    """One [section] of x86/unittests.cfg."""

    name: str
    file: str = ""
    smp: int = 1
    test_args: str = ""
    params: str = ""  # qemu_params / extra_params
    groups: list[str] = field(default_factory=list)
    arch: str = ""
    check: list[str] = field(default_factory=list)
    accel: str = ""
    timeout: float | None = None

    @property
    def args(self) -> list[str]:
        """test_args as shell words, quotes removed (scripts/common.bash evals them)."""
        return shlex.split(self.test_args) if self.test_args else []

    @property
    def append(self) -> str:
        """The -append string: the guest splits it on blanks into argv[1..]."""
        return " ".join(self.args)


def parse_unittests_cfg(text: str) -> list[KutTest]:
    """Parse the unittests.cfg format of kvm-unit-tests' scripts/common.bash."""
    tests: list[KutTest] = []
    current: KutTest | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^\[(.*)\]$", line)
        if m:
            current = KutTest(m.group(1))
            tests.append(current)
            continue
        m = re.match(r"^([a-z_]+)\s*=\s*(.*)$", line)
        if not m or current is None:
            continue
        key, value = m.group(1), m.group(2)
        if key in ("qemu_params", "extra_params") and value.startswith('"""'):
            body = value[3:]
            while '"""' not in body:
                try:
                    nxt = next(lines)
                except StopIteration:
                    break
                body = body[:-1] if body.endswith("\\") else body + " "
                body += nxt.strip()
            value = body.split('"""')[0]
        if key == "file":
            current.file = value
        elif key == "smp":
            current.smp = int(value.split()[0])
        elif key == "test_args":
            current.test_args = value
        elif key in ("qemu_params", "extra_params"):
            current.params = " ".join(value.split())
        elif key == "groups":
            current.groups = value.split()
        elif key == "arch":
            current.arch = value
        elif key == "check":
            current.check = value.split()
        elif key == "accel":
            current.accel = value
        elif key == "timeout":
            current.timeout = _seconds(value)
    return tests


def _seconds(text: str) -> float:
    m = re.match(r"^(\d+(?:\.\d+)?)([smh]?)$", text.strip())
    if not m:
        raise ValueError(f"timeout {text!r}: expected a number of seconds (e.g. 90, 90s, 2m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class MachineOptions:
    """What kvmpy takes from a test's QEMU parameters."""

    memory: int = DEFAULT_MEMORY
    cpu_model: str = "qemu64"
    cpu_add: list[str] = field(default_factory=list)
    cpu_remove: list[str] = field(default_factory=list)
    pit: bool = True
    ignored: list[str] = field(default_factory=list)


def parse_qemu_params(params: str) -> MachineOptions:
    """-m, -cpu and -machine pit=off; the rest is recorded in `ignored`."""
    from .memory import parse_size
    opts = MachineOptions()
    words = shlex.split(params)
    i = 0
    while i < len(words):
        w = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        if w in ("-m", "--m"):
            opts.memory = parse_size(arg if arg[-1:].isalpha() else arg + "M")
            i += 2
        elif w in ("-cpu", "--cpu"):
            parts = arg.split(",")
            opts.cpu_model = parts[0]
            for p in parts[1:]:
                if p.startswith("+"):
                    opts.cpu_add.append(p[1:])
                elif p.startswith("-"):
                    opts.cpu_remove.append(p[1:])
                else:
                    opts.ignored.append(f"-cpu {p}")
            i += 2
        elif w in ("-machine", "-M"):
            for p in arg.split(","):
                if p == "pit=off":
                    opts.pit = False
                else:
                    opts.ignored.append(f"-machine {p}")
            i += 2
        elif w.startswith("-") and arg and not arg.startswith("-"):
            opts.ignored.append(f"{w} {arg}")
            i += 2
        else:
            opts.ignored.append(w)
            i += 1
    return opts


# -- the machine for one test (runs in the child process) -----------------------------------

def _cpuid_table(kvm: Any, opts: MachineOptions, apic_id: int, ncpus: int) -> list[Any]:
    from .x86.cpuid import vcpu_cpuid
    entries = kvm.get_supported_cpuid()
    if opts.cpu_model in ("max", "host"):
        emulated = {(e.function, e.index): e for e in kvm.get_emulated_cpuid()}
        merged = []
        for e in entries:
            x = emulated.get((e.function, e.index))
            if x is not None:
                e = replace(e, eax=e.eax | x.eax, ebx=e.ebx | x.ebx, ecx=e.ecx | x.ecx, edx=e.edx | x.edx)
            merged.append(e)
        entries = merged
    table = {(e.function, e.index): e for e in entries}
    for names, on in ((opts.cpu_add, True), (opts.cpu_remove, False)):
        for name in names:
            spec = CPU_FEATURES.get(name)
            if spec is None or (spec[0], spec[1]) not in table:
                opts.ignored.append(f"-cpu {'+' if on else '-'}{name}")
                continue
            leaf, sub, reg, bit = spec
            e = table[(leaf, sub)]
            v = getattr(e, reg)
            table[(leaf, sub)] = replace(e, **{reg: (v | (1 << bit)) if on else (v & ~(1 << bit))})
    return vcpu_cpuid([table[(e.function, e.index)] for e in entries], apic_id, ncpus)


class KutMachine:
    """A `Machine` for one kvm-unit-tests binary: `run(timeout)` returns the exit status QEMU would.

    The test is a multiboot kernel with the environment file as its module
    and QEMU's test devices (isa-debug-exit, pc-testdev, fw_cfg, ACPI with
    S3 wake-up); memory, PIT and each vCPU's CPUID table come from the
    entry's QEMU parameters. QEMU runs the tests with -no-reboot, so a VM
    that ends any other way than through isa-debug-exit has status 0.
    """

    def __init__(self, flat: Path, *, smp: int = 1, args: Sequence[str] = (), params: str = "",
                 env: str = "", output: Any = None) -> None:
        from .machine import MachineConfig, ModuleConfig, build

        self.opts = parse_qemu_params(params)
        self.output = output or (lambda b: (sys.stdout.buffer.write(b), sys.stdout.buffer.flush()))
        self.error: str | None = None
        self._env = tempfile.NamedTemporaryFile("w", prefix="kvmpy-kut-env-", delete=False)
        self._env.write(env)
        self._env.close()
        opts = self.opts
        config = MachineConfig(kernel=Path(flat), cmdline=" ".join(args), memory=opts.memory, vcpus=smp,
                               entry="multiboot", modules=(ModuleConfig(Path(self._env.name)),),
                               test_devices=("debug-exit", "testdev", "fw-cfg", "acpi"), pit=opts.pit,
                               cpuid=lambda kvm, apic_id, ncpus: _cpuid_table(kvm, opts, apic_id, ncpus))
        try:
            self.machine = build(config, console=self.output)
        except BaseException:
            os.unlink(self._env.name)
            raise

    @property
    def mmio(self) -> Any:
        return self.machine.mmio

    def run(self, timeout: float) -> int:
        from .machine import Status

        m = self.machine
        m.start()
        outcome = m.wait(timeout)
        if outcome is None:
            m.stop(f"timeout after {timeout:g} s")
            self.error = f"timeout after {timeout:g} s"
            return 124
        if outcome.status is Status.DEBUG_EXIT:
            return outcome.exit_code
        self.error = outcome.detail  # QEMU -no-reboot: a triple fault or an error ends with status 0
        return 0

    def completions(self) -> dict[str, int]:
        return self.machine.completions()

    def close(self) -> None:
        self.machine.close()
        os.unlink(self._env.name)


def _run_one(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmpy.kut run-one")
    p.add_argument("flat", type=Path)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--params", default="")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p.add_argument("--args", default="", help="the test's arguments (shell words)")
    a = p.parse_args(argv)
    a.args = shlex.split(a.args)
    env = "QEMU_ACCEL=kvm\nKVMPY=1\n"
    try:
        m = KutMachine(a.flat, smp=a.smp, args=a.args, params=a.params, env=env)
    except Exception as e:
        print(f"kvmpy: cannot start {a.flat.name}: {e}", file=sys.stderr)
        return 0
    status = m.run(a.timeout)
    if m.error:
        print(f"kvmpy: {m.error}", file=sys.stderr)
    comp = m.completions()
    if comp:
        print("kvmpy: completed " + ", ".join(f"{k} x{v}" for k, v in sorted(comp.items())), file=sys.stderr)
    if m.opts.ignored:
        print("kvmpy: ignored " + " ".join(m.opts.ignored), file=sys.stderr)
    sys.stdout.flush()
    os._exit(status)  # vCPU threads may still sit in KVM_RUN; the process ends them


# -- running and judging -----------------------------------------------------------------

@dataclass
class Result:
    name: str
    verdict: str  # PASS FAIL SKIP TIMEOUT
    seconds: float
    detail: str = ""
    status: int | None = None
    log: str = ""


def verdict_of(status: int | None, output: str, timed_out: bool) -> tuple[str, str]:
    """(verdict, first failing line or reason) from the exit status and the serial log."""
    lines = [ln.strip() for ln in output.splitlines()]
    first_fail = next((ln for ln in lines if ln.startswith(("FAIL:", "ABORT:"))), "")
    kvmpy_err = next((ln for ln in lines if ln.startswith("kvmpy:") and "completed" not in ln
                      and "ignored" not in ln), "")
    summary = next((ln for ln in reversed(lines) if ln.startswith("SUMMARY:")), "")
    vmm_error = next((ln for ln in lines if ln.startswith("qemu-system") and "warning" not in ln), "")
    if timed_out:
        return "TIMEOUT", first_fail or kvmpy_err or (lines[-1] if lines else "")
    if status == 1:
        if vmm_error:  # QEMU's own errors also exit 1 (scripts/runtime.bash checks stderr too)
            return "FAIL", vmm_error
        return "PASS", summary
    if status == 77:
        skip = next((ln for ln in reversed(lines) if ln.startswith("SKIP:")), "")
        return "SKIP", skip or summary
    if status == 127:
        unhandled = next((ln for ln in lines if ln.startswith("Unhandled exception")), "")
        return "FAIL", first_fail or unhandled or vmm_error or "aborted"
    if status == 3:
        return "FAIL", first_fail or summary
    return "FAIL", kvmpy_err or first_fail or vmm_error or f"exit status {status}"


def pre_skip(test: KutTest, root: Path, *, include_nodefault: bool) -> str | None:
    """Why the runner would not start `test` on this host, or None."""
    if test.arch and test.arch != "x86_64":
        return f"arch {test.arch} only"
    if "nodefault" in test.groups and not include_nodefault:
        return "nodefault group (use --all)"
    if test.accel == "tcg":
        return "needs accel=tcg"
    for c in test.check:
        path, _, want = c.partition("=")
        try:
            have = Path(path).read_text().strip()
        except OSError:
            return f"check {path}: absent"
        if have != want:
            return f"check {path}={have}, needs {want}"
    if not (root / "x86" / test.file).is_file():
        return f"x86/{test.file} not built"
    return None


def _timeout(test: KutTest) -> float:
    env = os.environ.get("TIMEOUT")
    return _seconds(env) if env else (test.timeout or DEFAULT_TIMEOUT)


def run_test_kvmpy(test: KutTest, root: Path) -> Result:
    timeout = _timeout(test)
    cmd = [sys.executable, "-m", "kvmpy.kut", "run-one", str(root / "x86" / test.file), "--smp",
           str(test.smp), f"--params={test.params}", "--timeout", str(timeout),
           f"--args={shlex.join(test.args)}"]
    return _run_process(test.name, cmd, timeout)


def run_test_qemu(test: KutTest, root: Path, qemu: str = "qemu-system-x86_64") -> Result:
    timeout = _timeout(test)
    env_file = tempfile.NamedTemporaryFile("w", prefix="kut-qemu-env-", delete=False)
    env_file.write("QEMU_ACCEL=kvm\n")
    env_file.close()
    cmd = [qemu, "--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
           "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
           "-display", "none", "-serial", "stdio", "-device", "pci-testdev", "-machine", "accel=kvm",
           "-kernel", str(root / "x86" / test.file), "-smp", str(test.smp)]
    if test.args:
        cmd += ["-append", " ".join(test.args)]
    cmd += shlex.split(test.params) + ["-initrd", env_file.name]
    try:
        return _run_process(test.name, cmd, timeout)
    finally:
        os.unlink(env_file.name)


def _run_process(name: str, cmd: list[str], timeout: float) -> Result:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout + 5)  # the child stops itself at `timeout`
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    seconds = time.monotonic() - start
    text = out.decode(errors="replace").replace("\r", "")
    status = None if timed_out else proc.returncode
    if status == 124 or "kvmpy: timeout after" in text:
        timed_out = True
    verdict, detail = verdict_of(status, text, timed_out)
    return Result(name, verdict, seconds, detail, status, text)


def run_kvm_unit_tests(path: str | Path, *, qemu: bool = False, only: Sequence[str] = (), jobs: int = 1,
                       include_nodefault: bool = False, log_dir: Path | None = None,
                       progress: Any = None) -> list[tuple[KutTest, Result, Result | None]]:
    """Run the cfg's tests on kvmpy (and QEMU with `qemu=True`); one row per entry, in cfg order."""
    root = Path(path)
    cfg = root / "x86" / "unittests.cfg"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: not found; PATH must be a built kvm-unit-tests tree "
                                "(./configure --arch=x86_64 && make)")
    tests = parse_unittests_cfg(cfg.read_text())
    if only:
        unknown = set(only) - {t.name for t in tests}
        if unknown:
            raise ValueError(f"no such tests in {cfg}: {', '.join(sorted(unknown))}")
        tests = [t for t in tests if t.name in only]
    if qemu and shutil.which("qemu-system-x86_64") is None:
        raise FileNotFoundError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")

    def one(test: KutTest) -> tuple[KutTest, Result, Result | None]:
        reason = pre_skip(test, root, include_nodefault=include_nodefault or bool(only))
        if reason:
            skipped = Result(test.name, "SKIP", 0.0, reason)
            row = (test, skipped, replace(skipped) if qemu else None)
        else:
            k = run_test_kvmpy(test, root)
            q = run_test_qemu(test, root) if qemu else None
            row = (test, k, q)
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / f"{test.name}.kvmpy.log").write_text(k.log)
                if q is not None:
                    (log_dir / f"{test.name}.qemu.log").write_text(q.log)
        if progress is not None:
            progress(row)
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, tests))


def format_table(rows: Sequence[tuple[KutTest, Result, Result | None]], *, markdown: bool = False) -> str:
    with_qemu = any(q is not None for _, _, q in rows)
    head = ["test", "kvmpy", "s", "first failing line / reason"]
    if with_qemu:
        head += ["qemu", "s", "first failing line / reason"]
    body = []
    for _, k, q in rows:
        r = [k.name, k.verdict, f"{k.seconds:.1f}", k.detail[:90]]
        if with_qemu:
            r += [q.verdict, f"{q.seconds:.1f}", q.detail[:90]] if q else ["", "", ""]
        body.append(r)
    totals = {}
    for _, k, q in rows:
        totals.setdefault("kvmpy", {}).setdefault(k.verdict, 0)
        totals["kvmpy"][k.verdict] += 1
        if q is not None:
            totals.setdefault("qemu", {}).setdefault(q.verdict, 0)
            totals["qemu"][q.verdict] += 1
    summary = "; ".join(f"{who}: " + ", ".join(f"{v} {n}" for v, n in sorted(t.items()))
                        for who, t in totals.items())
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines) + f"\n\n{summary}\n"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in body] + ["", summary])


# -- the command -------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `kvm-unit-tests` to the `kvmpy` command's subparsers."""
    p = subparsers.add_parser("kvm-unit-tests", help="run an x86 kvm-unit-tests build tree on kvmpy",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("path", type=Path, help="a built kvm-unit-tests tree (has x86/unittests.cfg)")
    p.add_argument("--qemu", action="store_true", help="also run each test under qemu-system-x86_64 -enable-kvm")
    p.add_argument("--only", nargs="+", default=(), metavar="NAME", help="run only these cfg entries")
    p.add_argument("--jobs", type=int, default=1, help="tests run at once (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="include the nodefault group")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--logs", type=Path, help="keep each test's serial log in this directory")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """`kvmpy kvm-unit-tests`: print the table; exit 0 when kvmpy has no FAIL or TIMEOUT."""
    def progress(row: tuple[KutTest, Result, Result | None]) -> None:
        _, k, q = row
        extra = f"   qemu {q.verdict} {q.seconds:.1f}s" if q is not None else ""
        print(f"{k.name:<28} {k.verdict:<8} {k.seconds:6.1f}s {k.detail[:60]}{extra}", file=sys.stderr)

    try:
        rows = run_kvm_unit_tests(args.path, qemu=args.qemu, only=args.only, jobs=args.jobs,
                                  include_nodefault=args.all, log_dir=args.logs, progress=progress)
    except (ValueError, OSError) as e:  # a wrong path or test name: say which, no traceback
        print(f"kvmpy kvm-unit-tests: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.markdown:
        args.markdown.write_text(format_table(rows, markdown=True))
    return 0 if all(k.verdict in ("PASS", "SKIP") for _, k, _ in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run-one":
        return _run_one(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kvmpy.kut")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
