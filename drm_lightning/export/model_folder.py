"""``--save_as model``: the merged weights inside the base's own architecture, a complete ``save_pretrained`` folder.

``save_merged_model(merged, lam, output)`` writes it from a merge output (``merged_delta/``, ``merge.json``,
``heads/``); the in-memory arithmetic it shares with the evaluation is ``merging.engine.apply``. The other ways out
(PEFT adapters, low-rank factors, one-module task models) are the other modules of ``drm_lightning.export``.

Why not the backbone alone: ``load_backbone`` drops what the toolkit's heads do not use (BERT's pooler) and never
has a decoder's ``lm_head``, so a folder saved from it makes ``AutoModelForCausalLM.from_pretrained(out)`` initialise
the LM head at random on any model with untied embeddings. Here the base is loaded once as the class its
``config.architectures`` names (``LlamaForCausalLM``, ``BertModel`` with its pooler, ...), ``λ·Δ_merged`` is added
to its backbone part in place (tied weights share one tensor and so stay tied), and it is saved whole: everything the
base checkpoint had, its config and generation config, plus the base tokenizer, the task heads (``heads/<task>/``,
see ``docs/interop.md``), ``merge.json`` and a ``README.md`` model card (``export.model_card``).

Memory: one base model (in the dtype the experts were fitted in) plus one output shard, streamed from Δ_merged shard
by shard; never two models. The folder is written atomically.

Which class: the first of ``config.architectures`` that ``transformers`` defines (nothing is imported from a model
folder), then ``AutoModelForCausalLM`` for decoders, then ``AutoModel``, then the toolkit's own backbone class;
the first whose weights the checkpoint holds completely (no missing keys) and which contains every merged parameter
is used, so a config that names a class the checkpoint only partly holds never yields random weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drm_lightning.export.checkpoint_base import CheckpointBase, open_checkpoint_base
from drm_lightning.export.folder_writer import write_folder
from drm_lightning.io.disk import check_free_space
from drm_lightning.io.merged_delta import iter_merged_delta, merged_delta_index
from drm_lightning.merging.engine.apply import add_merged_delta, check_lam, recorded_base
from drm_lightning.merging.engine.record import HEADS_DIR, MERGE_FILE, read_merge_record
from drm_lightning.merging.engine.setup import check_output, describe_load
from drm_lightning.merging.engine.space import (
    CONFIG_ALLOWANCE,
    estimate_model_bytes,
    model_bytes,
    tokenizer_bytes,
    tree_bytes,
)
from drm_lightning.models.backbone import (
    accepts_pooling_flag,
    check_family,
    clip_vision_config,
    parse_dtype,
)
from drm_lightning.models.resolve import resolve_pretrained
from drm_lightning.task_vectors.fingerprint import fingerprint_state, scheme_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from drm_lightning.merging.engine.merger import MergeResult
    from drm_lightning.merging.engine.plan import MergePlan

#: What ``merge.json`` of a written folder says it holds (``save_as``).
SAVE_AS = ("model", "adapter")


def _config(path: str, gguf_file: str | None) -> PretrainedConfig:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoConfig.from_pretrained(path, **kwargs)


def backbone_keys(config: PretrainedConfig, family: str) -> set[str]:
    """The ``state_dict()`` names of ``load_backbone``'s module for ``config``, from a weightless (meta) instance.

    Why: the fingerprint a task vector records is of the backbone alone (no pooler), so checking it on a model of
    the full architecture needs the backbone's names without loading a second model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_family(family)
    with torch.device("meta"):
        if family == "seq2seq":
            skeleton = AutoModelForSeq2SeqLM.from_config(config)
        elif family == "decoder_lm":
            skeleton = AutoModelForCausalLM.from_config(config)
        elif family == "clip":  # the vision tower and its projection, inside a whole CLIPModel
            from transformers import CLIPVisionModelWithProjection

            skeleton = CLIPVisionModelWithProjection(clip_vision_config(config))
        else:
            pooled = family in ("encoder", "vision") and accepts_pooling_flag(config)
            skeleton = AutoModel.from_config(config, **({"add_pooling_layer": False} if pooled else {}))
    return set(skeleton.state_dict())


def _candidates(config: PretrainedConfig, family: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(name, loader, extra kwargs)`` of the classes to try, in order (see the module docstring)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seen: set[str] = set()
    for arch in list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and arch not in seen:
            seen.add(arch)
            yield str(arch), cls, {}
    if family in ("decoder", "decoder_lm"):
        yield "AutoModelForCausalLM", AutoModelForCausalLM, {}
    if family == "seq2seq":
        yield "AutoModelForSeq2SeqLM", AutoModelForSeq2SeqLM, {}
    yield "AutoModel", AutoModel, {}
    if family in ("encoder", "vision") and accepts_pooling_flag(config):
        yield "AutoModel (no pooler)", AutoModel, {"add_pooling_layer": False}


def backbone_prefix(model: nn.Module, names: Iterable[str]) -> str | None:
    """``""`` if ``model``'s own ``state_dict()`` holds every name, ``"<base_model_prefix>."`` if its ``base_model``
    does (``LlamaForCausalLM`` -> ``"model."``), else ``None``."""
    names = set(names)
    own = set(model.state_dict())
    if names <= own:
        return ""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if prefix and getattr(model, "base_model", model) is not model and {f"{prefix}.{n}" for n in names} <= own:
        return prefix + "."
    return None


def meta_architecture(
    base: str, family: str, names: Iterable[str], *, gguf_file: str | None = None
) -> tuple[str, str, PretrainedConfig]:
    """The class ``save_merged_model`` would write and the backbone prefix in it, from weightless instances.

    Why: an adapter's keys name modules of the model it will be loaded into (``base_model.model.<prefix>...``), so
    they depend on the class the user loads, without any need to load weights here. Checkpoint completeness is not
    checked (that needs the weights); the order of candidates is ``load_full_base``'s.

    Returns:
        ``(class name, prefix, config)``, e.g. ``("LlamaForCausalLM", "model.", config)``.
    """
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    config = _config(resolve_pretrained(base), gguf_file)
    names = set(names)
    for _label, loader, extra in _candidates(config, family):
        with torch.device("meta"):
            if isinstance(loader, type) and issubclass(loader, _BaseAutoModelClass):
                model = loader.from_config(config, **extra)
            else:
                model = loader._from_config(config)
        prefix = backbone_prefix(model, names)
        if prefix is not None:
            return type(model).__name__, prefix, config
    raise ValueError(f"base model {base!r}: no architecture of its config holds the merged parameters")


def load_full_base(
    base: str,
    family: str,
    names: Iterable[str],
    *,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, str]:
    """Load ``base`` in its own architecture; return the model and the prefix of the backbone inside it.

    Args:
        base: hub id, folder or ``package://`` name.
        family: the ``load_backbone`` family (decides the fallbacks).
        names: backbone parameter names that must be found in the model (those Δ_merged changes).
        torch_dtype, gguf_file: how to load it (as the experts did).

    Raises:
        ValueError: no class holds the checkpoint completely together with every name.
    """
    path = resolve_pretrained(base)
    config = _config(path, gguf_file)
    names = set(names)
    kwargs: dict[str, Any] = {"trust_remote_code": False, "output_loading_info": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    dtype = parse_dtype(torch_dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    tried = []
    for label, loader, extra in _candidates(config, family):
        try:
            model, info = loader.from_pretrained(path, **kwargs, **extra)
        except (ValueError, OSError, TypeError, KeyError) as err:  # a class this checkpoint cannot build
            tried.append(f"{label}: {type(err).__name__}")
            continue
        missing = sorted(info.get("missing_keys") or [])
        prefix = backbone_prefix(model, names)
        if not missing and prefix is not None:
            return model.eval(), prefix
        tried.append(f"{label}: " + (f"missing {missing[:3]}" if missing else "lacks the merged parameters"))
        del model
    raise ValueError(f"base model {base!r}: no architecture holds its checkpoint and the merged parameters ({tried})")


def load_base_with_backbone(
    base: str, family: str, load: Mapping[str, str | None]
) -> tuple[PreTrainedModel, str, dict[str, torch.Tensor]]:
    """``load_full_base`` for a merge still to be planned: the model, the prefix of its backbone, and the backbone's
    ``state_dict()`` as ``load_backbone`` would give it (its keys from ``backbone_keys``, so no pooler), from one
    load of the base (``merger.merge_to_model`` fingerprints and plans on it, then merges into it).

    Why every backbone key picks the class: ``backbone_fingerprint`` needs all of them in the written model anyway,
    so a class that lacks one could never be written.
    """
    config = _config(resolve_pretrained(base), load.get("gguf_file"))
    keys = backbone_keys(config, family)
    model, prefix = load_full_base(base, family, keys, **load)
    backbone = model.get_submodule(prefix[:-1]) if prefix else model
    state = backbone.state_dict()
    return model, prefix, {k: state[k] for k in state if k in keys}


def backbone_fingerprint(backbone: nn.Module, config: PretrainedConfig, family: str, scheme: str = "sampled1") -> str:
    """``fingerprint`` of the ``load_backbone`` module inside ``backbone`` (which may hold more: a pooler), under
    ``scheme`` (``task_vectors/fingerprint.py``: a merge.json recorded before ``sampled1`` holds a full hash).

    Raises:
        ValueError: ``backbone`` lacks some of the backbone's parameters.
    """
    state = backbone.state_dict()
    keys = backbone_keys(config, family)
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise ValueError(f"{type(backbone).__name__}: lacks backbone parameters {missing[:3]}")
    return fingerprint_state({k: state[k] for k in keys}, scheme)


def save_merged_model(
    merged: str | os.PathLike[str],
    lam: float,
    output: str | os.PathLike[str],
    *,
    base: str | None = None,
    family: str | None = None,
    max_shard_size: str | int = "2GB",
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    keep_delta: bool = True,
) -> nn.Module:
    """Write ``W_0 + λ·Δ_merged`` of a merged folder as a complete folder of the base's own architecture.

    Args:
        merged: a folder written by ``merge_task_vectors`` (``merged_delta/``, ``merge.json``, ``heads/``).
        lam: the scaling coefficient λ.
        output: the folder to write (replaced if it is a previous merge output).
        base, family, torch_dtype, gguf_file: default to what ``merge.json`` records.
        max_shard_size: ``save_pretrained``'s shard size.
        keep_delta: whether ``merged`` outlives this call; ``merge.json``'s ``merged_delta`` names it only then
            (a λ search's temporary delta folder is removed once the model is written).

    Returns:
        The backbone part of the written model (the module whose ``state_dict()`` names are Δ_merged's), in memory.

    Raises:
        ValueError: bad ``lam``, a folder that is not a merge output, a base of other weights.
        InsufficientSpaceError: ``output``'s filesystem clearly lacks room (checked before and after loading).
    """
    lam = check_lam(lam)
    merged = Path(merged)
    record = read_merge_record(merged)
    output = Path(output)
    check_output(output, [merged])
    heads = merged / HEADS_DIR
    backbone = write_model_folder(
        record, lam, output, set(merged_delta_index(merged)), iter_merged_delta(merged), heads, source=merged,
        base=base, family=family, max_shard_size=max_shard_size, torch_dtype=torch_dtype, gguf_file=gguf_file,
        heads_bytes=tree_bytes(heads), where=str(merged / MERGE_FILE),
        extra={"merged_delta": str(merged.resolve()) if keep_delta else None},
    )  # fmt: skip
    assert backbone is not None  # loaded through its model class: nothing was given loaded
    return backbone


def write_model_folder(
    record: Mapping[str, Any],
    lam: float,
    output: Path,
    names: set[str],
    deltas: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
    heads: Path | Callable[[Path], None],
    *,
    source: Path,
    base: str | None,
    family: str | None,
    max_shard_size: str | int,
    torch_dtype: str | torch.dtype | None,
    gguf_file: str | None,
    heads_bytes: int,
    where: str,
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    loaded: tuple[PreTrainedModel, str] | CheckpointBase | None = None,
) -> nn.Module | None:
    """The one writer of ``--save_as model`` folders: load the base whole, add ``lam`` times each ``(name, Δ)`` of
    ``deltas`` to its backbone (``add_merged_delta``'s arithmetic), save it with the tokenizer, the heads and
    ``merge.json`` (``record`` plus how the base was loaded, λ and ``extra``) through ``folder_writer.write_folder``.

    Why one writer for two sources: ``save_merged_model`` streams Δ_merged from a merged folder's shards, and a merge
    at a fixed λ (``merger.merge_to_model``) streams it straight from the merge, each parameter added as soon as it is
    merged, so no Δ folder is written and read back; the bytes are the same. ``deltas`` and ``extra`` may be
    callables, called once the base is loaded and checked (``extra`` once ``deltas`` is exhausted: the merge's
    timings).

    Args:
        record: the merge's record (``merge.json`` of the delta folder, or ``record.merge_record``): base model,
            family, fingerprint and how the base was loaded default to it.
        names: the backbone parameters ``deltas`` may hold (to choose the class that contains them).
        source: where ``deltas`` come from, named when one does not fit the base.
        where: what to name in a fingerprint mismatch (the record's file).
        heads: a ``heads/`` folder to copy, or what writes one into the folder it is given.
        heads_bytes: the heads' size, for the free-space check.
        loaded: the base already loaded, merged into in place: by ``load_base_with_backbone`` (model, backbone
            prefix), or as its own checkpoint (``checkpoint_base``: no model class, the same bytes written).

    Returns:
        The backbone part of the written model, in memory; ``None`` for a base written as its checkpoint.
    """
    base_name, family, load = recorded_base(record, base, family, torch_dtype, gguf_file)
    backbone: nn.Module | None = None
    if isinstance(loaded, CheckpointBase):  # checked against the recorded fingerprint when it was opened
        loaded.add(lam, deltas() if callable(deltas) else deltas, source)
        weights, architecture, prefix, size = loaded.save, loaded.architecture, loaded.prefix, loaded.nbytes()
    else:
        if loaded is None:
            estimate = estimate_model_bytes(base_name, **load)
            if estimate is not None:
                check_free_space({output: estimate + heads_bytes}, "merged model")
            model, prefix = load_full_base(base_name, family, names, **load)
        else:
            model, prefix = loaded
        config = _config(resolve_pretrained(base_name), load["gguf_file"])
        backbone = model.get_submodule(prefix[:-1]) if prefix else model
        actual = backbone_fingerprint(backbone, config, family, scheme_of(record["base_fingerprint"]))
        if actual != record["base_fingerprint"]:
            raise ValueError(
                f"base model {base_name!r} {describe_load(load)} has fingerprint {actual}, but {where} was "
                f"merged against {record['base_fingerprint']} ({record['base_model']}): different weights, refusing "
                "to apply"
            )
        stream = deltas() if callable(deltas) else deltas
        add_merged_delta(backbone, source, lam, deltas=stream)  # the evaluation's arithmetic: MergedBackbone.at's
        weights, architecture, size = model, type(model).__name__, model_bytes(model)
    check_free_space({output: size + tokenizer_bytes(base_name) + heads_bytes + CONFIG_ALLOWANCE}, "merged model")
    more = extra() if callable(extra) else extra
    out_record = {
        **record,
        **load,
        "lam": lam,
        **more,
        "save_as": "model",
        "architecture": architecture,
        "backbone_prefix": prefix,
    }
    write_folder(output, weights, max_shard_size=max_shard_size, tokenizer_of=base_name, heads=heads, record=out_record)
    return backbone


def merge_to_model(
    task_vectors: Sequence[str | os.PathLike[str]],
    method: str,
    output: str | os.PathLike[str],
    lam: float,
    params: Mapping[str, Any] | None = None,
    coefficients: Sequence[float] | None = None,
    *,
    base: str | None = None,
    family: str | None = None,
    plan: MergePlan | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    torch_dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    max_shard_size: str | int = "2GB",
) -> MergeResult:
    """Merge T task vectors and write ``W_0 + lam·Δ_merged`` as a model folder, with no Δ folder in between.

    The same folder, byte for byte, as ``merge_task_vectors`` followed by ``apply_merged_delta(delta, lam, output)``
    (``model_folder.write_model_folder``, the one writer of both): the base is loaded whole, once, when the cheap
    checks passed (``prepare_merge`` fingerprints and plans on it: each input byte is read once), and each parameter's
    float32 Δ_merged is added to it as soon as it is merged, then dropped. Why: at a fixed λ the delta is never read
    again, and writing it costs the model's size in float32 on disk (32 GB for an 8B model) plus reading it back.
    Memory: the base model plus one parameter's merge.
    The folder is written atomically (a crash or a kill leaves nothing at ``output``); its ``merge.json`` is the
    merge's record with λ, how the base was loaded and ``merged_delta: null``.

    Args:
        task_vectors, method, params, coefficients, base, family, plan, device, progress, torch_dtype, gguf_file:
            as ``merge_task_vectors``.
        output: the model folder (replaced if it is a previous merge output).
        lam: the scaling coefficient λ.
        max_shard_size: ``save_pretrained``'s shard size.
    """
    from drm_lightning.merging.engine.merger import MergeResult, merge_parameters
    from drm_lightning.merging.engine.record import copy_heads, merge_record
    from drm_lightning.merging.engine.setup import prepare_merge
    from drm_lightning.merging.engine.space import heads_bytes

    t_start = time.perf_counter()
    lam = check_lam(lam)
    loaded: list[Any] = []

    def base_state(
        name: str, fam: str, load: Mapping[str, str | None], expected: Sequence[str]
    ) -> Mapping[str, torch.Tensor]:
        checkpoint = open_checkpoint_base(name, fam, load, expected, max_shard_size)
        if checkpoint is not None:  # no model class needed: its tensors go out under their own names
            loaded.append(checkpoint)
            return checkpoint.backbone_state()
        model, prefix, state = load_base_with_backbone(name, fam, load)
        loaded.append((model, prefix))
        return state

    setup = prepare_merge(
        task_vectors, method, params, coefficients, base=base, family=family, plan=plan, device=device,
        torch_dtype=torch_dtype, gguf_file=gguf_file, base_state=base_state,
    )  # fmt: skip
    output = Path(output)
    check_output(output, [r.folder for r in setup.readers])
    timings = dict(setup.timings)
    present = set().union(*(r.names() for r in setup.readers))
    names = {e.name for e in setup.entries if e.rule != "skip" and e.name in present}
    merged = [0]

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        stream = merge_parameters(
            setup.entries, setup.readers, setup.method, setup.params, setup.coefficients, device=setup.device,
            progress=progress, timings=timings,
        )  # fmt: skip
        for name, delta in stream:
            merged[0] += 1
            yield name, delta
        timings["total"] = time.perf_counter() - t_start

    def record() -> dict[str, Any]:
        return {**merge_record(setup.record(), timings, merged[0]), "merged_delta": None}

    def copy_heads_into(folder: Path) -> None:
        copy_heads(setup.readers, folder)

    write_model_folder(
        record(), lam, output, names, deltas, copy_heads_into, source=setup.readers[0].folder, base=setup.base,
        family=setup.family, max_shard_size=max_shard_size, torch_dtype=setup.torch_dtype,
        gguf_file=setup.gguf_file, heads_bytes=heads_bytes(setup.readers),
        where="the task vectors' meta.json", extra=record, loaded=loaded.pop(),
    )  # fmt: skip
    return MergeResult.from_setup(setup, output, dict(timings), merged[0], str(setup.device))
