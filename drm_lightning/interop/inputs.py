"""Any expert folder -> a task-vector folder: what ``merge`` and ``extract`` call for each input.

Kinds, told apart by the files a folder holds:

- ``task_vector``: ``meta.json`` (written by ``fit`` or by ``extract``), used as is;
- ``adapter``: ``adapter_config.json`` (``PeftModel.save_pretrained``), converted by ``interop/peft_adapter.py``;
- ``model``: ``config.json`` with safetensors weights (``save_pretrained``), converted by ``interop/full_model.py``.

``import_inputs`` plans every conversion first (configs and headers only), so a bad third input is refused before
the first is converted, then writes each into a temporary folder beside the output that is removed afterwards
(and, should the process be killed, by the next write to that output: ``remove_stale_temporaries``). Experts of
one base share one loaded base (``load_base``). For a merge at a fixed λ (``by_reference``) a fine-tuned model
whose base loads as stored is not converted at all: its folder names the two checkpoints, and the merge takes each
delta as it reads the parameter (``io/delta_reference.py``); no base is loaded for it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from drm_lightning.interop.checkpoint import CheckpointError, local_folder
from drm_lightning.interop.full_model import plan_model
from drm_lightning.interop.peft_adapter import ADAPTER_CONFIG, plan_adapter
from drm_lightning.interop.stored_base import StoredBackbone, stored_backbone
from drm_lightning.interop.write import (
    import_notes,
    load_base,
    task_name_for,
    write_import,
    write_reference_import,
)
from drm_lightning.io.atomic import temporary_prefix
from drm_lightning.io.task_vector import META_FILE

Kind = Literal["task_vector", "adapter", "model"]


def input_kind(name: str | os.PathLike[str]) -> Kind:
    """What ``name`` is (see the module docstring); a hub id is looked up in the local cache only.

    Raises:
        CheckpointError: none of the three (names the folder and what it lacks).
    """
    path = Path(name)
    if path.is_dir() and (path / META_FILE).is_file():
        return "task_vector"
    folder = local_folder(name)
    if (folder / META_FILE).is_file():
        return "task_vector"
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise CheckpointError(
        f"{name}: neither a task vector ({META_FILE}), a PEFT adapter ({ADAPTER_CONFIG}) nor a save_pretrained "
        "model (config.json)"
    )


def convert(
    source: str,
    output: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    base: str | None = None,
    family: str | None = None,
    task: str | None = None,
    skip: Sequence[str] = (),
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
) -> Path:
    """Convert one fine-tuned model or adapter into the task-vector folder ``output``.

    Args:
        source: a fine-tuned ``save_pretrained`` folder, a PEFT LoRA adapter folder (``adapter_config.json`` +
            ``adapter_model.safetensors``), or a cached hub id of either.
        output: the task-vector folder to write (replaced atomically).
        kind: ``model`` or ``adapter`` (default: told from the files, ``input_kind``).
        base: the model it was fine-tuned from (an adapter's default: ``base_model_name_or_path`` of its
            ``adapter_config.json``).
        family: the project family (default: from the base's ``model_type``).
        task: the task name (default: the folder's name).
        skip: regexes of backbone parameters to leave out (e.g. the embeddings of a model with added tokens).
        torch_dtype, gguf_file: how to load the base (recorded for the merge to load it the same way).
    """
    kind = kind or input_kind(source)
    if kind == "task_vector":
        raise CheckpointError(f"{source}: is already a task vector folder; nothing to convert")
    planner = plan_adapter if kind == "adapter" else plan_model
    plan, info = planner(source, base, family=family, skip=skip)
    name = task_name_for(Path(source), task)
    return write_import(plan, info, output, name, torch_dtype=torch_dtype, gguf_file=gguf_file)


def default_base(inputs: Sequence[str | os.PathLike[str]], kinds: Sequence[Kind]) -> str | None:
    """The base a mix of inputs implies when none is given: the first task vector's, else the first adapter's.

    Why: in ``merge --task_vectors [tv/a,ckpt/b]`` the task vector already says which base it was taken against
    (and the merge will use it), so the fine-tuned folder beside it needs no ``--base`` of its own.
    """
    from drm_lightning.interop.checkpoint import CheckpointError
    from drm_lightning.io.json_file import read_json_object
    from drm_lightning.io.task_vector import read_meta

    for source, kind in zip(inputs, kinds, strict=True):
        if kind == "task_vector":
            return read_meta(local_folder(source)).base_model
    for source, kind in zip(inputs, kinds, strict=True):
        if kind == "adapter":
            config = read_json_object(local_folder(source) / ADAPTER_CONFIG, error=CheckpointError)
            recorded = config.get("base_model_name_or_path")
            if recorded:
                return str(recorded)
    return None


@contextmanager
def import_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    beside: str | os.PathLike[str],
    *,
    base: str | None = None,
    family: str | None = None,
    skip: Sequence[str] = (),
    torch_dtype: str | None = None,
    gguf_file: str | None = None,
    evaluates: bool = False,
    by_reference: bool = False,
) -> Iterator[list[str]]:
    """Yield task-vector folders for ``inputs``: task vectors as they are, the others converted for the duration;
    what the conversions left out is said once (``import_notes``; the tasks without a head only if ``evaluates``).

    Args:
        inputs: task-vector, PEFT adapter and ``save_pretrained`` folders (or cached hub ids), mixed.
        beside: the output the converted folders live next to (same filesystem), in a temporary folder.
        base: the base of the models (and of adapters, over their adapter_config.json); default:
            ``default_base``.
        family, skip, torch_dtype, gguf_file: as for ``convert``.
        by_reference: a fine-tuned model whose base's stored tensors are its backbone (``stored_backbone``) gets a
            folder that holds its deltas by reference (``write_reference_import``), read only by the merger
            (``TaskVectorReader``): for a merge at a fixed λ on one process, whose only reader of the inputs is the
            merger.
    """
    kinds = [input_kind(p) for p in inputs]
    base = base if base is not None else default_base(inputs, kinds)
    plans = []
    for source, kind in zip(inputs, kinds, strict=True):
        if kind == "task_vector":
            plans.append(None)
            continue
        planner = plan_adapter if kind == "adapter" else plan_model
        plans.append(planner(os.fspath(source), base, family=family, skip=skip))
    if all(plan is None for plan in plans):
        yield [os.fspath(p) for p in inputs]
        return
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=temporary_prefix(beside) + "inputs-", dir=beside.parent))
    try:
        folders, converted, loaded = [], [], None
        stored: dict[tuple[str, str], StoredBackbone | None] = {}
        load = {"torch_dtype": torch_dtype, "gguf_file": gguf_file}
        for i, (source, plan) in enumerate(zip(inputs, plans, strict=True)):
            if plan is None:
                folders.append(os.fspath(source))
                continue
            name, (import_plan, info) = task_name_for(Path(source), None), plan
            converted.append((name, *plan))
            if by_reference and import_plan.whole_model:  # an adapter (its modules_to_save too) is written as it is
                if (info.name, info.family) not in stored:
                    stored[info.name, info.family] = stored_backbone(info, load)
                backbone = stored[info.name, info.family]
                if backbone is not None:
                    folders.append(str(write_reference_import(import_plan, info, work / f"{i}-{name}", name, backbone,
                                                              torch_dtype=torch_dtype)))  # fmt: skip
                    continue
            if loaded is None or not loaded.serves(info, torch_dtype, gguf_file):
                loaded = None  # one base in memory at a time
                loaded = load_base(info, torch_dtype=torch_dtype, gguf_file=gguf_file)
            folder = write_import(*plan, work / f"{i}-{name}", name, torch_dtype=torch_dtype, gguf_file=gguf_file,
                                  notes=False, loaded=loaded)  # fmt: skip
            folders.append(str(folder))
        del loaded
        for line in import_notes(converted, evaluates):
            print(f"drm-lightning: {line}", file=sys.stderr)
        yield folders
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record_sources(
    records: Sequence[str | os.PathLike[str]], inputs: Sequence[str | os.PathLike[str]], folders: Sequence[str]
) -> bool:
    """Point the ``inputs`` of each ``merge.json`` in ``records`` at the folders the experts were converted from;
    whether any input was converted (so a record changed, and the model card written from it must be rewritten).

    Why: a converted input was merged from a temporary folder that is gone once ``merge`` returns; the record
    should name what the user gave (and say it was converted), not a path that no longer exists.
    """
    sources = {}
    for given, folder in zip(inputs, folders, strict=True):
        if os.fspath(given) != folder:
            sources[str(Path(folder).resolve())] = (str(local_folder(given).resolve()), input_kind(given))
    if not sources:
        return False
    for record_dir in records:
        path = Path(record_dir) / "merge.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        for entry in record.get("inputs") or []:
            if entry.get("path") in sources:
                entry["path"], entry["converted_from"] = sources[entry["path"]]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    return True
