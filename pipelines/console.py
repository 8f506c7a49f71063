"""What a run prints besides its results: one progress line per item, and the engines' noise kept out."""
from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager


def progress(line: str) -> None:
    """One item's progress line, on stderr. On Ray it travels back with the item's result and the driver
    prints it (pipelines.engines.ray); elsewhere it goes straight to the console."""
    print(f"  {line}", file=sys.stderr, flush=True)


@contextmanager
def stderr_without(noise: re.Pattern, fd: int = 2):
    """Filter this process's stderr (file descriptor 2, which an engine's local worker processes inherit and
    its native code writes to; or `fd`, 1 for stdout) through a thread that drops the lines `noise` matches
    while the block runs."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not noise.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="engine-log-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stream.flush()
        os.dup2(saved, fd)  # the pipe's last writer here; the workers holding it have ended with the job
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(saved)
