"""What the operating system says about this machine's processors, without importing anything heavy (so that a
command can take a first reading before it imports torch)."""

import time
from typing import NamedTuple, Optional


class CpuTicks(NamedTuple):
    """Linux /proc/stat counters: all processors' time, their idle time, this process's own time (clock ticks),
    and when they were read (monotonic seconds)."""

    total: int
    idle: int
    own: int
    at: float


def cpu_ticks() -> Optional[CpuTicks]:
    """The counters now; None where /proc cannot be read (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat", encoding="ascii") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return CpuTicks(sum(values), values[3] + values[4], int(own[11]) + int(own[12]), time.monotonic())
    except (OSError, ValueError, IndexError):
        return None
