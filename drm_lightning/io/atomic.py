"""Folders written atomically: a temporary sibling renamed into place, so a crash never leaves half a folder.

Every writer of a folder (task vectors, merged deltas, model folders, adapters, reports) goes through
``atomic_dir``; the temporaries of killed runs are removed by the next write to the same target.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename, on error it vanishes.

    Why: a crash (or SIGKILL) mid-write must never leave a half-written task vector or model at ``target``. A
    SIGKILL does leave the temporary folder behind (nothing runs to remove it), so its name records host and pid
    (``.<name>.tmp-<host>-<pid>-*``) and the next write to the same target removes those of dead processes on this
    host (``remove_stale_temporaries``): killed runs of a many-gigabyte merge do not pile up beside its output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tag = f"{_host_tag()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{tag}")
            os.replace(target, old)
            os.replace(tmp, target)
            _rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _rmtree(tmp)
        raise


def temporary_prefix(target: str | os.PathLike[str]) -> str:
    """Name prefix of a temporary sibling of ``target`` owned by this process (``.<name>.tmp-<host>-<pid>-``).

    Any folder so named (an ``atomic_dir`` temporary, a distributed merge's staging folder) is removed by
    ``remove_stale_temporaries`` once its process is dead.
    """
    return f".{Path(target).name}.tmp-{_host_tag()}-{os.getpid()}-"


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary siblings of ``target`` that ``atomic_dir`` calls of dead processes left; return them.

    Only this host's temporaries are considered (a pid means nothing on another node of a shared filesystem), and
    only those whose process is gone; a live or unknown one is kept. A ``.<name>.old-*`` folder (the previous
    ``target``, moved aside just before the final rename) is removed only while ``target`` exists, as a run killed
    between its two renames leaves it the only complete copy. No-op off POSIX, where pids cannot be probed safely.
    """
    target = Path(target)
    if os.name != "posix" or not target.parent.is_dir():
        return []
    host = _host_tag()
    removed = []
    for path in target.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-{host}-"
            if not path.name.startswith(prefix):
                continue
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                continue
            _rmtree(path)
            removed.append(path)
    return removed


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
