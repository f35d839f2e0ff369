"""The assembly layer: one config, one builder, the running machine, its state records.

    from kvmpy.machine import MachineConfig, build

    with build(MachineConfig(kernel="vmlinux", initrd="initramfs.cpio")) as m:
        m.start()
        print(m.wait(300))

config.py   `MachineConfig` and its device configs: data, validated once
builder.py  `build(config)` / `restore(config, state, memory)`: the only assembler
machine.py  `Machine`: vCPU threads, pause/resume, outcome
state.py    `MachineState`: what each component saved
"""

from .builder import DeviceError, build, device_configs, kernel_cmdline, make_devices, restore
from .config import (
                     DEFAULT_CMDLINE,
                     DEFAULT_MEMORY,
                     MAX_CMDLINE,
                     TEST_DEVICES,
                     ConfigError,
                     DiskConfig,
                     MachineConfig,
                     ModuleConfig,
                     NetConfig,
                     ShareConfig,
                     VsockConfig,
                     memory_problem,
)
from .fork import ForkError, fork, fork_machine
from .machine import ConsoleLog, Ending, Machine, Outcome, Status
from .state import MachineState

__all__ = ["DEFAULT_CMDLINE", "DEFAULT_MEMORY", "MAX_CMDLINE", "TEST_DEVICES", "ConfigError", "ConsoleLog",
           "DeviceError", "DiskConfig", "Ending", "ForkError", "Machine", "MachineConfig", "MachineState",
           "ModuleConfig",
           "NetConfig", "Outcome", "ShareConfig", "Status", "VsockConfig", "build", "device_configs", "fork",
           "fork_machine", "kernel_cmdline",
           "make_devices", "memory_problem", "restore"]
