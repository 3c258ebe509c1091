"""Starting and reaping the extra processes of multi-process tests (torchrun launches on localhost)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Yield ``proc``; if the block fails (a timeout, an assertion), kill and wait for it, so no rank outlives its
    test and holds its ports."""
    try:
        yield proc
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
