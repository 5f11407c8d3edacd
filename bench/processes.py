"""The processes a run starts, found by a mark in their environment, and their memory.

A simulation's processes (SuperLink, SuperExec, ServerApp, Ray's raylet, GCS and workers) are not all children of
the process that started them (Ray's daemons are re-parented), but every one inherits the environment: a variable
set before the start marks them, however deep. Memory is proportional set size (PSS): pages shared between
processes (Ray's object store, torch's libraries) are split between them instead of counted in each.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def marked_processes(name: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment has `name=value`."""
    marker = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role(pid: int) -> str:
    """A short name for what a process is (its program, or Ray's worker title)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return "gone"
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    program = next((w for w in words if "/" in w and not Path(w).name.startswith("python")), words[0])
    return Path(program).name


class PeakMemory:
    """Samples, every `interval_s` in a thread, the summed PSS of this process and the marked ones; keeps the peak
    of the sum and the peak of each role."""

    def __init__(self, name: str, value: str, interval_s: float = 0.5) -> None:
        self.name, self.value, self.interval_s = name, value, interval_s
        self.peak_total = 0
        self.peak_by_role: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        by_role: dict[str, int] = {}
        for pid in [os.getpid(), *marked_processes(self.name, self.value)]:
            name = "driver" if pid == os.getpid() else role(pid)
            by_role[name] = by_role.get(name, 0) + pss_bytes(pid)
        self.peak_total = max(self.peak_total, sum(by_role.values()))
        for name, size in by_role.items():
            self.peak_by_role[name] = max(self.peak_by_role.get(name, 0), size)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
