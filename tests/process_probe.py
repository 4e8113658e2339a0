"""What a process holds, read from Linux's /proc: resident memory (now and peak), open
file descriptors, threads. `pid` is "self" or a process id of ours."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * 1024


def _status(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB for the Vm* fields
    raise KeyError(field)


def rss_bytes(pid: int | str = "self") -> int:
    return _status(pid, "VmRSS") * KIB


def peak_rss_bytes(pid: int | str = "self") -> int:
    return _status(pid, "VmHWM") * KIB


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start a new peak (VmHWM) at the current resident size (Linux clear_refs, 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int | str = "self") -> int:
    return _status(pid, "Threads")


@dataclass
class Peak:
    extra_bytes: int = 0  # the peak resident size above where it stood at the start

    @property
    def extra_mib(self) -> float:
        return self.extra_bytes / MIB


@contextmanager
def peak_memory(pid: int | str = "self"):
    """How far resident memory rose above its starting point inside the block."""
    reset_peak_rss(pid)
    start = rss_bytes(pid)
    peak = Peak()
    yield peak
    peak.extra_bytes = max(0, peak_rss_bytes(pid) - start)
