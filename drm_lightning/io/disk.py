"""Free disk space, checked before a byte is written: one probe, one margin, one error.

A write refuses up front (``InsufficientSpaceError``) when the target's filesystem clearly has too little room. The
probe is the module-level ``disk_free_bytes``, so tests simulate a small disk by replacing it;
``DRM_LIGHTNING_SKIP_SPACE_CHECK=1`` turns the check off where a filesystem reports free space wrongly. A disk that
fills anyway mid-write still fails with ``ENOSPC`` and leaves nothing behind (``io.atomic.atomic_dir``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

#: Environment variable that turns the up-front free-space check off (``1``/``true``/``yes``).
SKIP_SPACE_CHECK_ENV = "DRM_LIGHTNING_SKIP_SPACE_CHECK"
#: Room kept free beyond an estimate: filesystem blocks, safetensors headers, JSON files, estimates' slack.
SPACE_MARGIN_BYTES = 1024**2
SPACE_MARGIN_FRACTION = 0.01


class InsufficientSpaceError(OSError):
    """A write refused up front: the target's filesystem has too little free space; the message names the folder,
    the bytes needed and the bytes free. An ``OSError`` with ``errno == ENOSPC``, like a disk that fills mid-write,
    so callers that handle a full disk handle this too (the CLI prints it as one error line)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it exists, else its nearest existing parent: where a folder about to be made will live."""
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def disk_free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (or would hold it, if it does not exist yet).

    Why a module-level function: it is the one probe every up-front space check calls, so tests replace it to
    simulate a small disk without filling one.
    """
    return int(shutil.disk_usage(existing_ancestor(path)).free)


def human_bytes(nbytes: int | float) -> str:
    """``1288490189`` -> ``"1.2 GiB"``; ``314572800`` -> ``"300 MiB"``: sizes in error messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(nbytes)} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    text = f"{value:.{digits}f}"
    return f"{text.rstrip('0').rstrip('.') if '.' in text else text} {unit}"


def with_margin(nbytes: int) -> int:
    """``nbytes`` plus the safety margin every space check keeps: 1 MiB and 1 %."""
    return int(nbytes) + SPACE_MARGIN_BYTES + int(SPACE_MARGIN_FRACTION * int(nbytes))


def check_free_space(needs: Mapping[str | os.PathLike[str], int], what: str) -> None:
    """Refuse (``InsufficientSpaceError``) when the folders in ``needs`` clearly will not fit on their filesystems.

    Args:
        needs: target folder -> bytes about to be written there (an estimate; the margin is added here). Targets on
            one filesystem are summed, since they fill the same free space.
        what: what is being written, for the message (e.g. ``"merged delta"``).

    Why up front: a many-gigabyte merge or a long fit should fail in a second with the sizes involved, not after
    the work with a half-written temporary folder (which ``atomic_dir`` would remove, but the time is lost).
    """
    if os.environ.get(SKIP_SPACE_CHECK_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    groups: dict[int, list[tuple[Path, int]]] = {}
    for target, nbytes in needs.items():
        if int(nbytes) <= 0:
            continue
        probe = existing_ancestor(target)
        groups.setdefault(probe.stat().st_dev, []).append((Path(target), int(nbytes)))
    for items in groups.values():
        needed = with_margin(sum(n for _, n in items))
        free = disk_free_bytes(items[0][0])
        if free < needed:
            folders = " and ".join(str(t) for t, _ in items)
            raise InsufficientSpaceError(
                f"not enough disk space for the {what} at {folders}: needs {human_bytes(needed)}, "
                f"{human_bytes(free)} free on the filesystem of {existing_ancestor(items[0][0])}"
            )
