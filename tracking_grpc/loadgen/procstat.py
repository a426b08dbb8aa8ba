"""CPU time and resident memory of a server process and its children, from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Usage:
    """Summed over a process tree at one moment."""

    cpu_s: float  # user + system time since each process started
    rss_bytes: int
    processes: int


def _stat_fields(pid: int) -> list[str]:
    text = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces; everything after ')' splits cleanly.
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (worker processes of a server)."""
    by_parent: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        by_parent.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def workers(pid: int) -> list[int]:
    """The direct children of ``pid`` (a supervisor's workers) that still run."""
    found = []
    for child in children(pid):
        try:
            if int(_stat_fields(child)[1]) == pid:
                found.append(child)
        except (OSError, ValueError, IndexError):
            continue
    return found


def usage(pid: int) -> Usage:
    """CPU seconds and resident bytes of ``pid`` and its descendants."""
    cpu_ticks, rss_pages, count = 0, 0, 0
    for member in [pid, *children(pid)]:
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12) ... rss(21)
        cpu_ticks += int(fields[11]) + int(fields[12])
        rss_pages += int(fields[21])
        count += 1
    return Usage(cpu_ticks / TICKS_PER_S, rss_pages * PAGE_BYTES, count)


def pids_named(*names: str) -> list[int]:
    """Processes whose command name is one of ``names`` (postgres, redis-server)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of these processes that still runs."""
    found = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    return found


class MemberCpu:
    """CPU seconds of each process of a tree (a server and its workers) since the
    meter was made. A process that dies meanwhile (a killed worker) keeps what it
    had used at its last :meth:`sample`."""

    def __init__(self, pid: int) -> None:
        self.members = [pid, *children(pid)]
        self.start = cpu_by_pid(self.members)
        self.last = dict(self.start)

    def sample(self) -> None:
        self.last.update(cpu_by_pid(self.members))

    def gone(self) -> list[int]:
        """Members that no longer run."""
        running = cpu_by_pid(self.members)
        return [m for m in self.members if m not in running]

    def gone_cpu_s(self) -> float:
        """What the members that died had used in all, at their last sample."""
        return sum(self.last.get(m, 0.0) for m in self.gone())

    def elapsed(self) -> list[float]:
        """CPU seconds of each member since the start (members in order)."""
        self.sample()
        return [self.last.get(m, 0.0) - self.start.get(m, 0.0) for m in self.members]
