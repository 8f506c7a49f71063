"""This process's children, found from /proc: what a failed local engine start leaves running is ended."""
from __future__ import annotations

import glob
import os
import signal


def descendants(pid: int | None = None) -> set[int]:
    """The ids of the descendants of process pid (default: this one), read from /proc (empty where there is
    none)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        parent[int(stat.split("/")[2])] = int(fields[1])
    found, frontier = set(), {os.getpid() if pid is None else pid}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def terminate(pids: set[int]) -> None:
    """SIGTERM to each of pids that still runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
