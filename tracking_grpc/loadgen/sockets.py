"""Established loopback TCP connections, and which process holds each end (/proc).

Workers sharing a port with SO_REUSEPORT get connections from the kernel, not
evenly; these tell how many each holds, and which worker serves a given client
process (the one a fault trial kills).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = "01"


@dataclass(frozen=True, slots=True)
class Connection:
    """One end of an established TCP connection, as the kernel lists it."""

    local_port: int
    remote_port: int
    inode: str  # as a process's file descriptor links to it: "socket:[N]"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def established() -> list[Connection]:
    """Every established TCP connection end of this machine (IPv4 and IPv6)."""
    found = []
    for table in TABLES:
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == ESTABLISHED:
                    local, remote = _port(fields[1]), _port(fields[2])
                    found.append(Connection(local, remote, f"socket:[{fields[9]}]"))
    return found


def sockets_of(pid: int) -> set[str]:
    """The socket inodes a process holds open."""
    held = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                held.add(os.readlink(fd))
    return held


def held_by_each(pids: list[int], port: int) -> list[int]:
    """Client connections to ``port`` that each of ``pids`` holds the server end of."""
    served = {c.inode for c in established() if c.local_port == port}
    return [len(served & sockets_of(pid)) for pid in pids]


def serving(pids: list[int], port: int, client_pid: int) -> int | None:
    """The process of ``pids`` that serves a connection of ``client_pid`` to
    ``port`` (the first found), or None."""
    connections = established()
    mine = sockets_of(client_pid)
    client_ports = {
        c.local_port for c in connections if c.remote_port == port and c.inode in mine
    }
    served = {
        c.inode
        for c in connections
        if c.local_port == port and c.remote_port in client_ports
    }
    for pid in pids:
        if served & sockets_of(pid):
            return pid
    return None
