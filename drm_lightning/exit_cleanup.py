"""Destroy a process group still alive when the interpreter exits, before Python tears itself down.

Why: a gloo group left to the interpreter's teardown can abort a process whose work is done ("terminate called
without an active exception", SIGABRT): gloo's worker threads still hold their last collective's tensors, and a
thread that must take the GIL to free one while the interpreter finalises is killed (pytorch/pytorch PR 179291
describes it; torch registers no such handler itself). The launcher then reports a failed rank. Seen here in
Lightning's ``ddp_spawn`` workers and in ``torchrun`` merges under load. ``import drm_lightning`` registers the
handler (in spawned workers too: they import drm_lightning to unpickle its modules), so a group that Lightning,
the user or this package made is destroyed while the interpreter is whole. torch is not imported here: the
handler looks for ``torch.distributed`` among the loaded modules.
"""

from __future__ import annotations

import atexit
import gc
import sys

_registered = False


def has_process_group() -> bool:
    """Whether a default ``torch.distributed`` group exists (never imports torch: without it there is none)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def leave_process_group() -> bool:
    """Destroy the default process group (and every group made under it) if one is initialised, then collect
    reference cycles, which may hold groups already destroyed but not yet freed. True when a group was destroyed.

    Why public: a command run under a launcher calls it before it returns (``cli.main``), so its group is gone
    before the interpreter exits; the exit handler covers the processes that return some other way.
    """
    if "torch.distributed" not in sys.modules:
        return False  # no torch.distributed loaded: no group, and no gloo group to free
    destroyed = has_process_group()
    if destroyed:
        sys.modules["torch.distributed"].destroy_process_group()
    gc.collect()
    return destroyed


def leave_rank_watch(failure: str | None = None) -> None:
    """Tell the other ranks that this one is done (``failure``: the error line it ends with), if ``drm_lightning.world``
    watches them; a rank that ends without saying so (killed) is taken for dead by the others."""
    world = sys.modules.get("drm_lightning.world")
    if world is not None:
        world.leave_watch(failure)


def _at_exit() -> None:
    leave_rank_watch()
    try:
        leave_process_group()
    except (RuntimeError, ValueError) as err:  # a peer already gone: nothing to wait for at exit
        print(f"drm_lightning: process group not destroyed at exit: {err}", file=sys.stderr)


def register() -> None:
    """Register the exit handler once per process."""
    global _registered
    if not _registered:
        atexit.register(_at_exit)
        _registered = True
