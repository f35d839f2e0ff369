"""`MicroVM`: drive a Linux micro-VM from a script.

    from kvmpy import MicroVM, MicroVMConfig

    with MicroVM(MicroVMConfig(kernel="vmlinux", initrd="initramfs.cpio")) as vm:
        vm.start()
        vm.expect("# ", timeout=300)          # the shell prompt
        print(vm.run("uname -a"))              # a command's output
        vm.snapshot("snap/")                   # pause, save, resume
    clone = MicroVM.restore("snap/")           # milliseconds later, a second guest

Built on `kvmpy.machine` (`build(config)` assembles the VM, `Machine` runs
the vCPU threads); this layer adds a life cycle
(created -> running <-> paused -> stopped), console matching with
timeouts, outcomes as exceptions when asked, snapshots and restore
(`kvmpy/snapshot.py`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import KvmError
from .machine import (
    ConfigError,
    DiskConfig,
    Machine,
    MachineConfig,
    NetConfig,
    Outcome,
    Status,
    VsockConfig,
    build,
    fork,
)


class MicroVMError(KvmError):
    """Base of the errors `MicroVM` raises."""


class VmStateError(MicroVMError):
    """The call does not fit the VM's state (e.g. `pause()` before `start()`)."""


class VmFailed(MicroVMError):
    """The guest ended badly (error or panic) or ended while a caller waited for text; `.outcome` says how."""

    def __init__(self, message: str, outcome: Outcome | None) -> None:
        super().__init__(message)
        self.outcome = outcome


class GuestPanic(VmFailed):
    """The guest kernel panicked ("Kernel panic - not syncing" on the console)."""


class ExpectTimeout(MicroVMError, TimeoutError):
    """`expect()` did not see its pattern in time; the message ends with the console's tail."""

    def __init__(self, pattern: str, timeout: float, tail: str) -> None:
        super().__init__(f"console did not show {pattern} within {timeout} s; last output:\n{tail}")
        self.pattern, self.timeout, self.tail = pattern, timeout, tail


# -- config ---------------------------------------------------------------------------

# One config describes a machine end to end (kvmpy/machine/config.py); the
# scripting layer calls it by the name it has always had here.
MicroVMConfig = MachineConfig


# -- the VM ----------------------------------------------------------------------------

class MicroVM:
    """A Linux micro-VM with a life cycle, console matching, snapshots and restore.

    States: "created" (validated, nothing allocated), "running", "paused",
    "stopped". `close()` (or leaving the `with` block) always frees the VM.
    `console_sink` receives every console byte as it arrives (e.g.
    sys.stdout.buffer.write).
    """

    def __init__(self, config: MachineConfig, *, console_sink: Callable[[bytes], None] | None = None) -> None:
        self.config = config.validate()
        self.console_sink = console_sink
        self.machine: Machine | None = None
        self.state = "created"
        self._cursor = 0  # expect() searches the console from here
        self._lock = threading.Lock()
        self.restore_seconds: float | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> MicroVM:
        """Build the machine (load the kernel) and start the vCPUs."""
        with self._lock:
            if self.state != "created":
                raise VmStateError(f"start(): the VM is {self.state}; start() runs once")
            self.machine = build(self.config, console=self.console_sink)
            self.machine.start()
            self.state = "running"
        return self

    def pause(self) -> None:
        """Stop the vCPUs where they are (the guest's clock stops with them)."""
        m = self._need("pause", "running")
        m.pause()
        self.state = "paused"

    def resume(self) -> None:
        m = self._need("resume", "paused")
        m.resume()
        self.state = "running"

    def stop(self) -> Outcome:
        """Stop the guest from the host; returns its outcome (STOPPED unless it had ended)."""
        if self.machine is None:
            self.state = "stopped"
            return Outcome(Status.STOPPED, "never started")
        outcome = self.machine.stop()
        self.state = "stopped"
        return outcome

    def wait(self, timeout: float | None = None, *, check: bool = False) -> Outcome | None:
        """The guest's `Outcome` once it ends (power-off, reboot, panic, error); None on timeout.

        `check=True` raises `GuestPanic` / `VmFailed` for a panic or an error instead.
        """
        m = self.machine
        if m is None:
            raise VmStateError("wait(): the VM was never started")
        outcome = m.wait(timeout)
        if outcome is not None:
            self.state = "stopped"
            if check:
                self._raise_for(outcome)
        return outcome

    @property
    def outcome(self) -> Outcome | None:
        return None if self.machine is None else self.machine.wait(0)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        self.state = "stopped"

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _need(self, what: str, *states: str) -> Machine:
        if self.state not in states or self.machine is None:
            raise VmStateError(f"{what}(): the VM is {self.state}, not {' or '.join(states)}")
        return self.machine

    @staticmethod
    def _raise_for(outcome: Outcome) -> None:
        if outcome.status is Status.PANIC:
            raise GuestPanic(f"guest kernel panic: {outcome.detail}", outcome)
        if outcome.status is Status.ERROR:
            raise VmFailed(f"VM stopped with an error: {outcome.detail}", outcome)

    # -- console --------------------------------------------------------------------

    @property
    def console_bytes(self) -> bytes:
        """Everything the guest printed on its console so far."""
        if self.machine is None:
            return b""
        with self.machine.console.cond:
            return bytes(self.machine.console.data)

    @property
    def console(self) -> str:
        return self.console_bytes.decode(errors="replace")

    def send(self, data: str | bytes) -> None:
        """Type `data` on the guest's console."""
        m = self._need("send", "running", "paused")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        while raw:
            taken = m.send_input(raw)
            raw = raw[taken:]
            if raw:
                m.serial.wait_for_rx_space(1.0)

    def sendline(self, line: str | bytes = "") -> None:
        self.send((line.encode() if isinstance(line, str) else line) + b"\n")

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0) -> re.Match:
        """Wait until the console shows `pattern` (literal text, or a compiled regex) after the
        previous match; return the match (on text decoded as UTF-8, undecodable bytes escaped).

        Raises `ExpectTimeout`, `GuestPanic` if the kernel panics first, or
        `VmFailed` if the guest ends without printing it.
        """
        m = self._need("expect", "running", "paused", "stopped")
        if isinstance(pattern, re.Pattern):
            rx = pattern if isinstance(pattern.pattern, str) else re.compile(
                pattern.pattern.decode("utf-8", "surrogateescape"), pattern.flags & ~re.ASCII)
            shown = f"/{rx.pattern}/"
        else:
            text = pattern.decode("utf-8", "surrogateescape") if isinstance(pattern, bytes) else pattern
            rx, shown = re.compile(re.escape(text)), repr(text)
        deadline = time.monotonic() + timeout
        log = m.console
        with log.cond:
            while True:
                window = log.since(self._cursor).decode("utf-8", "surrogateescape")
                self._cursor = max(self._cursor, log.base)  # output older than the log keeps is gone
                found = rx.search(window)
                if found:
                    self._cursor += len(window[:found.end()].encode("utf-8", "surrogateescape"))
                    return found
                outcome = m.wait(0) if m.finished else None
                if outcome is not None:
                    self.state = "stopped"
                    self._raise_for(outcome)
                    raise VmFailed(f"guest ended ({outcome.status.value}: {outcome.detail}) before the console "
                                   f"showed {shown}", outcome)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpectTimeout(shown, timeout, window[-2000:])
                log.cond.wait(min(left, 0.2))

    def run(self, command: str, *, prompt: str | re.Pattern = "# ", timeout: float = 60.0) -> str:
        """Type a shell command, wait for the next prompt, return what the command printed.

        Assumes a shell at `prompt` that echoes its input (a serial console does).
        """
        # Start and end markers, typed quoted in two halves: the shell's echo of the
        # line (which a line editor may wrap or decorate) never contains them whole.
        tag = f"__kvmpy_{time.monotonic_ns()}"
        self.sendline(f'echo "{tag}""_start__"; {command}; echo "{tag}""_end__"')
        self.expect(re.compile(re.escape(f"{tag}_start__") + r"\r?\n"), timeout)
        found = self.expect(re.compile(r"(.*?)" + re.escape(f"{tag}_end__") + r"\r?\n", re.S), timeout)
        self.expect(prompt, timeout)
        output = found.group(1)
        return output.replace("\r\n", "\n")

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self, directory: str | os.PathLike[str], *, parent: str | os.PathLike[str] | None = None,
                 track: bool = True) -> Path:
        """Save the VM's complete state to `directory`; a running VM pauses for it and resumes.

        `parent`: the VM's previous snapshot; only the pages written since are
        saved (kvmpy/snapshot_chain.py). `track=False`: no page tracking from
        this snapshot on (it cannot be a parent).
        """
        from .snapshot_chain import snapshot

        m = self._need("snapshot", "running", "paused")
        was_running = self.state == "running"
        if was_running:
            self.pause()
        try:
            return snapshot(m, directory, parent=parent, track=track, meta={"expect_cursor": self._cursor})
        finally:
            if was_running:
                self.resume()

    @classmethod
    def restore(cls, snapshot: str | os.PathLike[str] | object, *, start: bool = True,
                console_sink: Callable[[bytes], None] | None = None, force_disks: bool = False) -> MicroVM:
        """A new VM continuing from `snapshot` (a directory or an opened `kvmpy.snapshot.Snapshot`).

        Memory is mapped copy-on-write from the snapshot, so many clones of
        one snapshot share it; so are the disks: each writable disk gets a
        throwaway overlay of the clone's own. A disk that changed since the
        snapshot is refused unless `force_disks`. With `start=False` the VM
        comes back paused.
        """
        from .snapshot import Snapshot, restore_machine

        snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)  # type: ignore[arg-type]
        machine, report = restore_machine(snap, console=console_sink, force_disks=force_disks)
        self = cls.__new__(cls)
        self.config = machine.config  # what the clone has, its new TAPs included
        self.console_sink = console_sink
        self.machine = machine
        self._lock = threading.Lock()
        self._cursor = int(snap.manifest.get("meta", {}).get("expect_cursor", machine.console.end))
        self.restore_seconds = report.seconds
        if start:
            machine.start()
            self.state = "running"
        else:
            machine.mark_paused()  # built, not started: resume() starts the vCPUs
            self.state = "paused"
        return self

    def fork(self, n: int = 1, *, start: bool = True, disk_for_child: Callable[[int, dict], dict] | None = None,
             console_sinks: Sequence[Callable[[bytes], None] | None] | None = None) -> list[MicroVM]:
        """`n` children of this VM sharing its memory copy-on-write (kvmpy/machine/fork.py), started
        unless `start=False`; a running VM pauses for the fork and runs on."""
        m = self._need("fork", "running", "paused")
        machines = fork(m, n, disk_for_child=disk_for_child, console=list(console_sinks) if console_sinks else None)
        children = []
        for i, machine in enumerate(machines):
            children.append(MicroVM._adopt(machine, self._cursor, console_sinks[i] if console_sinks else None, start))
        return children

    @classmethod
    def _adopt(cls, machine: Machine, cursor: int, sink: Callable[[bytes], None] | None, start: bool) -> MicroVM:
        """A MicroVM around a machine made elsewhere (a forked child), paused or started."""
        self = cls.__new__(cls)
        self.config, self.machine, self._lock = machine.config, machine, threading.Lock()
        self.console_sink, self._cursor, self.restore_seconds = sink, cursor, None
        self.state = "paused"
        if start:
            machine.start()
            self.state = "running"
        return self

    def __repr__(self) -> str:
        return f"MicroVM({Path(self.config.kernel).name}, {self.state})"


__all__ = ["ConfigError", "DiskConfig", "ExpectTimeout", "GuestPanic", "MicroVM", "MicroVMConfig",
           "MicroVMError", "NetConfig", "VmFailed", "VmStateError", "VsockConfig"]
