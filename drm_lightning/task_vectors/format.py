"""The on-disk format of a task vector: the contract between the extraction callback and the merger.

A task vector is a folder::

    <folder>/
      task_vector.safetensors   backbone deltas (see below)
      head.safetensors          the task head's state dict (may be empty for heads-free models such as T5)
      meta.json                 see ``TaskVectorMeta``

Parameter names are those of the backbone's own ``state_dict()`` (the ``transformers`` model loaded by
``drm_lightning.models.backbone.load_backbone``), so ``W_0`` comes from that model under the same name.

``kind == "dense"``: one entry per backbone parameter that changed, ``name -> W_ft - W_0`` (float32 or the
training dtype). Parameters absent from the file have a zero delta (frozen ones).

``kind == "lora"``: for every adapted linear weight ``name`` (e.g. ``encoder.layer.0.attention.self.query.weight``)
two entries, ``name + ".lora_A"`` of shape ``[r, in]`` and ``name + ".lora_B"`` of shape ``[out, r]``; the delta is
``scale * lora_B @ lora_A`` with ``scale = meta.lora.scale`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
Other backbone parameters that the LoRA run also trained may appear as plain dense deltas under their own names.

Everything is safetensors and JSON: nothing executable is ever loaded.

Free space: ``write_task_vector`` (and the merger, through ``check_free_space``) refuses up front, before a byte is
written, when the target's filesystem has clearly too little room (``InsufficientSpaceError``). The probe is the
module-level ``disk_free_bytes``, so tests simulate a small disk by replacing it; ``DRM_LIGHTNING_SKIP_SPACE_CHECK=1``
turns the check off where a filesystem reports free space wrongly. A disk that fills anyway mid-write still fails
with ``ENOSPC`` and leaves nothing behind (``atomic_dir``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
DELTAS_FILE = "task_vector.safetensors"
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
#: Weight dtypes a base model may be loaded in (``ExpertModule(torch_dtype=...)``, ``meta.json["torch_dtype"]``).
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: What a task asks: one label per input, or one of several options per input (``meta.json["task_type"]``).
TASK_TYPES = ("classification", "multiple_choice")
#: Environment variable that turns the up-front free-space check off (``1``/``true``/``yes``).
SKIP_SPACE_CHECK_ENV = "DRM_LIGHTNING_SKIP_SPACE_CHECK"
#: Room kept free beyond an estimate: filesystem blocks, safetensors headers, JSON files, estimates' slack.
SPACE_MARGIN_BYTES = 1024**2
SPACE_MARGIN_FRACTION = 0.01


class TaskVectorError(ValueError):
    """A task vector folder that cannot be used; the message names the file and the key or value at fault."""


class InsufficientSpaceError(OSError):
    """A write refused up front: the target's filesystem has too little free space; the message names the folder,
    the bytes needed and the bytes free. An ``OSError`` with ``errno == ENOSPC``, like a disk that fills mid-write,
    so callers that handle a full disk handle this too (the CLI prints it as one error line)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


@dataclass
class LoraMeta:
    """LoRA settings of an expert; ``scale`` multiplies ``B @ A``."""

    r: int
    alpha: float
    scale: float
    target_modules: list[str]
    dropout: float = 0.0


@dataclass
class TaskVectorMeta:
    """What ``meta.json`` holds.

    ``torch_dtype`` and ``gguf_file`` record how ``base_model`` was loaded for training (``None``: the checkpoint's
    own dtype, no GGUF file). The fingerprint is of the weights *as loaded*, so a consumer that reloads the base
    (merge, evaluation, ``ExpertModule.from_task_vector``) must load it the same way; they default to these values.
    Both are optional: a meta.json written before they existed reads as ``None``. ``task_type`` is
    ``classification`` or ``multiple_choice`` (a meta.json written before it existed reads as the former).

    ``source`` is set for experts imported from elsewhere (``drm_lightning.interop``): ``type`` (``transformers`` or
    ``peft``), ``path``, ``architectures``, ``config`` (the task model's config.json), ``head`` (the head layout and
    the mapping from the project head's parameters to the checkpoint's tensor names, or ``None`` with
    ``no_head_reason``) and what was left out. ``None`` for experts fitted here and for older task vectors.

    ``statistics`` describes the input Grams beside the deltas (``statistics.py``: file, kind, examples, rows per
    layer), ``None`` when none were recorded.
    """

    task: str
    kind: Literal["dense", "lora"]
    base_model: str
    base_fingerprint: str
    family: str = "encoder"
    torch_dtype: str | None = None
    gguf_file: str | None = None
    label_names: list[str] = field(default_factory=list)
    task_type: str = "classification"
    lora: LoraMeta | None = None
    head: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = META_FILE) -> TaskVectorMeta:
        data = dict(data)
        missing = [k for k in ("task", "kind", "base_model", "base_fingerprint") if k not in data]
        if missing:
            raise TaskVectorError(f"{source}: missing key(s) {missing}")
        if data["kind"] not in ("dense", "lora"):
            raise TaskVectorError(f"{source}: kind={data['kind']!r}, expected 'dense' or 'lora'")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskVectorError(f"{source}: unknown key(s) {unknown}")
        lora = data.get("lora")
        if data["kind"] == "lora":
            if not isinstance(lora, Mapping):
                raise TaskVectorError(f"{source}: kind='lora' needs a 'lora' section with r, alpha, scale")
            try:
                data["lora"] = LoraMeta(**lora)
            except TypeError as err:
                raise TaskVectorError(f"{source}: bad 'lora' section {dict(lora)}: {err}") from None
        elif lora is not None:
            data["lora"] = LoraMeta(**lora)
        dtype = data.get("torch_dtype")
        if dtype is not None and dtype not in TORCH_DTYPES:
            raise TaskVectorError(f"{source}: torch_dtype={dtype!r}, expected one of {TORCH_DTYPES} or null")
        task_type = data.get("task_type", "classification")
        if task_type not in TASK_TYPES:
            raise TaskVectorError(f"{source}: task_type={task_type!r}, expected one of {TASK_TYPES}")
        gguf = data.get("gguf_file")
        if gguf is not None and (not isinstance(gguf, str) or not gguf):
            raise TaskVectorError(f"{source}: gguf_file={gguf!r}, expected a file name or null")
        origin = data.get("source")
        if origin is not None and not isinstance(origin, Mapping):
            raise TaskVectorError(f"{source}: source={origin!r}, expected an object or null")
        stats = data.get("statistics")
        if stats is not None and not isinstance(stats, Mapping):
            raise TaskVectorError(f"{source}: statistics={stats!r}, expected an object or null")
        return cls(**data)

    def load_options(self, torch_dtype: str | None = None, gguf_file: str | None = None) -> dict[str, str | None]:
        """How to reload ``base_model``: the given values where not ``None``, else the recorded ones.

        Returns ``{"torch_dtype": ..., "gguf_file": ...}`` (dtype as its name), ready for ``load_backbone``.
        """
        return {
            "torch_dtype": torch_dtype if torch_dtype is not None else self.torch_dtype,
            "gguf_file": gguf_file if gguf_file is not None else self.gguf_file,
        }


def library_versions() -> dict[str, str]:
    """Versions recorded in meta.json / merge.json so results can be traced."""
    import importlib.metadata as md

    out = {}
    for name in ("drm_lightning", "torch", "lightning", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Size of the safetensors file ``save_file(tensors)`` writes: the data plus a generous header estimate."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(len(name) + 96 for name in tensors) + 64
    return data + header


def write_task_vector(
    folder: str | os.PathLike[str],
    deltas: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    meta: TaskVectorMeta,
    statistics: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a task vector folder atomically (all its files appear together or not at all).

    ``statistics``: the input Grams to write beside the deltas (``statistics.py``); ``meta.statistics`` must then
    describe them.

    Raises:
        InsufficientSpaceError: before anything is written, when ``folder``'s filesystem lacks the room for the
            three files (the replaced folder, if any, is removed only after the new one is complete, so it does not
            count as free).
    """
    from drm_lightning.task_vectors.statistics import save_statistics, statistics_bytes, statistics_meta

    if (statistics is None) != (meta.statistics is None):
        raise ValueError(f"task {meta.task!r}: statistics and meta.statistics must be given together")
    needed = safetensors_bytes(deltas) + safetensors_bytes(head) + len(meta.to_json().encode())
    needed += statistics_bytes(statistics or {})
    check_free_space({folder: needed}, f"task vector of task {meta.task!r}")
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in deltas.items()}, str(tmp / DELTAS_FILE))
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(tmp / HEAD_FILE))
        if statistics is not None:
            stats = statistics_meta(meta, folder)
            assert stats is not None
            if set(stats.rows) != set(statistics):
                raise ValueError(f"task {meta.task!r}: meta.statistics.rows name other layers than the Grams given")
            save_statistics(tmp / stats.file, statistics, meta)
        (tmp / META_FILE).write_text(meta.to_json())
    return Path(folder)


def read_meta(folder: str | os.PathLike[str]) -> TaskVectorMeta:
    """Read and validate ``meta.json``; errors name the file."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise TaskVectorError(f"{path}: not found (is {folder} a task vector folder?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TaskVectorError(f"{path}: invalid JSON ({err})") from None
    return TaskVectorMeta.from_dict(data, source=str(path))


def read_head(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the head's state dict (safetensors only)."""
    path = Path(folder) / HEAD_FILE
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``safe_open`` with an error that names the file when it is missing, truncated or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise TaskVectorError(f"{path}: not found")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise TaskVectorError(f"{path}: not a readable safetensors file ({err})") from None
    with handle as f:
        yield f
