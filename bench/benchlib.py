"""Helpers shared by the benchmark scripts: a stage clock and the machine's description."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time

class StageClock:
    """Adds up seconds spent inside wrapped functions and generators, by stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def function(self, stage: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._add(stage, time.perf_counter() - t0)
        return timed

    def generator(self, stage: str, fn):
        def timed(*a, **kw):  # time spent producing each item, not the consumer's time between items
            it = iter(fn(*a, **kw))
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self._add(stage, time.perf_counter() - t0)
                    return
                self._add(stage, time.perf_counter() - t0)
                yield item
        return timed


def package_versions(names) -> dict:
    """Installed versions of the named distributions (those installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine_info(packages, **extra) -> dict:
    """What the figures were measured on: platform, CPUs, memory, Python and package versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "python": sys.version.split()[0],
        "packages": package_versions(packages),
        **extra,
    }
