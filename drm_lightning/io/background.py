"""Reads ahead and writes behind: the two I/O threads of a merge, each with a bounded amount of work in flight.

Why threads: a merge reads each parameter's T deltas, merges them and writes the result; done in turn, the disk (or
the page cache) waits for the math and the math for the disk. ``prefetched`` reads the next parameters' deltas in
one thread while the current one merges, and ``Worker`` writes a full shard in one thread while the next one fills
(mergekit's ``--num-threads``/``--async-write`` do the same). Reading a file and torch's kernels release the GIL, so
the threads run beside the math. The results are the same bytes: only when a tensor is read or written moves, not
what is computed from it or in which order.

Memory stays bounded: ``prefetched(depth=d)`` holds at most ``d + 1`` items read (the one being merged and ``d``
ahead); ``Worker`` runs one job at a time and ``submit`` waits until the previous one is done, so a shard writer
holds at most two shards (one being written, one filling).

Errors: an exception in a thread is raised again in the caller, the same object (so the CLI prints the same one
line), where the sequential code would have raised it: ``prefetched`` at the item whose read failed (the items
before it were merged), ``Worker`` at the next ``submit`` or at ``finish``. ``close`` / ``abort`` stop the thread and
wait for what it is doing, so a folder removed on error (``io.atomic.atomic_dir``) is never written into afterwards.

Settings (environment, read when a merge starts): ``DRM_LIGHTNING_PREFETCH`` parameters read ahead (default 1, at
most 2; 0 reads in the merging thread), ``DRM_LIGHTNING_ASYNC_WRITE`` (default 1; 0 writes shards in the merging
thread). Both off give the sequential path.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

PREFETCH_ENV = "DRM_LIGHTNING_PREFETCH"
ASYNC_WRITE_ENV = "DRM_LIGHTNING_ASYNC_WRITE"
MAX_PREFETCH = 2

T = TypeVar("T")
R = TypeVar("R")


def prefetch_depth() -> int:
    """Parameters read ahead of the one merging (``DRM_LIGHTNING_PREFETCH``, default 1, 0..2).

    Raises:
        ValueError: a value that is not an integer in 0..2 (naming the variable).
    """
    raw = os.environ.get(PREFETCH_ENV, "1").strip()
    if not raw.isdigit() or int(raw) > MAX_PREFETCH:
        raise ValueError(f"{PREFETCH_ENV}={raw!r}: expected 0 (off), 1 or {MAX_PREFETCH} parameters read ahead")
    return int(raw)


def async_write() -> bool:
    """Whether shards are written by a thread of their own (``DRM_LIGHTNING_ASYNC_WRITE``, default 1).

    Raises:
        ValueError: a value other than 0/1/true/false/yes/no (naming the variable).
    """
    raw = os.environ.get(ASYNC_WRITE_ENV, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{ASYNC_WRITE_ENV}={raw!r}: expected 1 (a writer thread) or 0 (write in the merging thread)")
    return raw in ("1", "true", "yes")


_END = object()


def prefetched(items: Sequence[T], load: Callable[[T], R], depth: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, ``load`` running in one thread up to ``depth`` items ahead.

    An item's value is released when the caller asks for the next one; at most ``depth + 1`` values exist at once.
    ``depth=0`` loads each item in the caller's thread, when it is asked for. Closing the generator early (an error
    in the caller, ``break``) stops the thread and waits for the load it is in.

    Raises:
        Exception: what ``load`` raised, at that item.
    """
    if depth <= 0:
        for item in items:
            yield item, load(item)
        return
    slots = threading.Semaphore(depth + 1)  # values alive: the caller's and those read ahead
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        for item in items:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                value = load(item)
            except BaseException as err:  # raised again in the caller, at this item
                results.put((item, None, err))
                return
            results.put((item, value, None))
            del value
        results.put(_END)

    thread = threading.Thread(target=work, name="drm-lightning-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = results.get()
            if got is _END:
                return
            item, value, err = got
            del got
            if err is not None:
                raise err
            yield item, value
            del value
            slots.release()
    finally:
        stop.set()
        thread.join()


class Worker:
    """One thread that runs the submitted jobs in order, one at a time (started at the first job).

    ``submit`` waits until the previous job is done, so one job runs while the caller prepares the next; an error
    of a job is raised at the next ``submit`` or ``finish`` and the jobs after it are not run.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as err:  # raised again in the caller
                self._error = err
            finally:
                del job
                self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the thread once the previous job is done.

        Raises:
            Exception: what an earlier job raised.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.join()
        self._raise()
        self._jobs.put(job)

    def finish(self) -> None:
        """Wait for every job, stop the thread.

        Raises:
            Exception: what a job raised.
        """
        self.abort()
        self._raise()

    def abort(self) -> None:
        """Wait for the job running, stop the thread; an error is kept for ``finish`` (none is raised here)."""
        if self._thread is not None:
            self._jobs.join()
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
