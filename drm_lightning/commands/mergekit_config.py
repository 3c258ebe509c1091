"""A mergekit YAML (``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype``) as ``merge``'s arguments.

::

    drm-lightning merge --mergekit_config ties.yml --output merged/ties

Most people who merge LLMs already have a mergekit config. ``read_mergekit_config`` maps the whole-model part of it
onto this project's merge: every model but the base becomes a task vector input (a fine-tuned folder, a PEFT
adapter or a task vector folder), ``weight`` a per-task coefficient, ``density`` the method's density, ``lambda``
λ, ``out_dtype`` (else ``dtype``) the dtype the base is loaded and saved in. ``merge_method`` takes mergekit's
names of the methods both tools have (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``linear``)
and every name of this project's registry (``drm_v``, ``iso_cts``, ...), whose own parameters go under
``parameters``; so a known config switches to DRM by changing one word.

Where the two tools define a method differently the merge follows this project's definition (docs/methods.md) and
the mapping says so in its ``notes`` (printed once by ``merge``); docs/interop.md has the table. What a whole-model
delta merge cannot express (``slices``, ``modules``, gradient lists, conditional ``filter`` values, tokenizer
unions, ``model+lora`` references) is refused in one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: mergekit's methods that this project has: mergekit name -> (our method, mergekit's default for ``normalize``).
MERGEKIT_METHODS: dict[str, tuple[str, bool]] = {
    "task_arithmetic": ("task_arithmetic", False),
    "ties": ("ties", True),
    "dare_linear": ("dare", False),
    "dare_ties": ("dare", False),
    "linear": ("task_arithmetic", True),
}

#: Top-level keys read; anything else is refused by name.
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
#: Top-level keys mergekit has and a whole-model delta merge cannot express.
_REFUSED_TOP = {
    "slices": "layer slices (passthrough, frankenmerges)",
    "modules": "per-module definitions",
    "tokenizer": "tokenizer unions",
    "chat_template": "chat templates",
}
_DTYPES = {"float32", "float16", "bfloat16", "float64"}


class MergekitConfigError(ValueError):
    """A mergekit config that cannot be read or expressed; the message is one line naming the file and key."""


@dataclass(frozen=True)
class MergekitMerge:
    """What a mergekit config says, in ``merge``'s terms.

    Attributes:
        task_vectors: The models to merge (the base left out), as ``merge``'s inputs.
        method: This project's method name.
        params: The method's parameters.
        coefficients: Per-task coefficients, or None for all 1.
        lam: λ.
        base: The base model, or None for the one the inputs record.
        torch_dtype: The dtype to load and save the base in, or None.
        notes: Where the merge differs from what mergekit would compute (one line each).
    """

    task_vectors: list[str]
    method: str
    params: dict[str, Any]
    coefficients: list[float] | None
    lam: float
    base: str | None
    torch_dtype: str | None
    notes: list[str] = field(default_factory=list)


def read_mergekit_config(path: str | Path, known_methods: set[str] | frozenset[str]) -> MergekitMerge:
    """Read the mergekit YAML at ``path`` as a merge of this project (module docstring).

    Args:
        path: The mergekit config file.
        known_methods: This project's method names (the registry's), accepted as ``merge_method`` as they are.

    Raises:
        MergekitConfigError: the file is missing or not YAML, or a key or value cannot be expressed (one line).
    """
    import yaml

    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MergekitConfigError(f"{where}: not found") from None
    except yaml.YAMLError as err:
        raise MergekitConfigError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise MergekitConfigError(f"{where}: expected a mergekit config (a mapping with merge_method and models)")
    for key in raw:
        if key in _REFUSED_TOP:
            raise MergekitConfigError(
                f"{where}: key {key!r} ({_REFUSED_TOP[key]}) is not supported: drm-lightning merges whole models "
                "from their task vectors"
            )
        if key not in _TOP_KEYS:
            raise MergekitConfigError(f"{where}: unknown key {key!r}; expected some of {sorted(_TOP_KEYS)}")
    name = raw.get("merge_method")
    if name in MERGEKIT_METHODS:
        method, normalize_default = MERGEKIT_METHODS[name]
    elif name in known_methods:
        method, normalize_default = name, False
    else:
        known = sorted(set(MERGEKIT_METHODS) | set(known_methods))
        raise MergekitConfigError(f"{where}: merge_method {name!r} is not supported; expected one of {known}")
    base = _model_ref(raw.get("base_model"), f"{where}: base_model", optional=True)
    top = _scalars(raw.get("parameters"), f"{where}: parameters")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise MergekitConfigError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")

    inputs: list[str] = []
    weights: list[float] = []
    base_weight = 0.0
    per_model: list[dict[str, Any]] = []
    for i, entry in enumerate(models):
        key = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise MergekitConfigError(f"{key}: expected {{model: PATH, parameters: {{weight: ..., density: ...}}}}")
        model = _model_ref(entry["model"], f"{key}.model")
        params = {**top, **_scalars(entry.get("parameters"), f"{key}.parameters")}
        weight = _number(params.get("weight", 1.0), f"{key}.parameters.weight")
        if model == base:  # mergekit skips the base in the delta methods; linear averages it in
            base_weight += weight
            continue
        inputs.append(model)
        weights.append(weight)
        per_model.append({k: v for k, v in params.items() if k not in ("weight",)})
    if not inputs:
        raise MergekitConfigError(f"{where}: models: every entry is the base_model; nothing to merge")

    shared = _shared_params(per_model, f"{where}: models[*].parameters")
    normalize = shared.pop("normalize", normalize_default)
    if not isinstance(normalize, bool):
        raise MergekitConfigError(f"{where}: parameters.normalize={normalize!r}: expected true or false")
    lam = _number(shared.pop("lambda", 1.0), f"{where}: parameters.lambda")
    shared.pop("int8_mask", None)  # the mask's storage dtype only; the result does not depend on it
    rescale = shared.pop("rescale", None)
    notes: list[str] = []
    params: dict[str, Any]
    coefficients: list[float] | None = list(weights)
    if name == "linear":
        total = sum(weights) + base_weight
        if normalize:
            coefficients = [w / total for w in weights]
        elif abs(total - 1.0) > 1e-12:
            raise MergekitConfigError(
                f"{where}: parameters.normalize=false with weights summing to {total:g} scales the base weights "
                "too; a delta merge cannot express that (use normalize: true or weights summing to 1)"
            )
        params = {}
        _no_extra(shared, f"{where}: parameters", name)
    elif name in MERGEKIT_METHODS:
        density = _number(shared.pop("density", 1.0), f"{where}: parameters.density")
        _no_extra(shared, f"{where}: parameters", name)
        if name == "task_arithmetic":
            params = {}
            if density != 1.0:
                raise MergekitConfigError(f"{where}: parameters.density={density:g}: task_arithmetic has no density")
            if normalize:
                coefficients = [w / sum(weights) for w in weights]
        elif name == "ties":
            params = {"density": density}
            if not normalize:
                notes.append(
                    "ties with normalize: false: mergekit sums the surviving entries; drm-lightning takes their "
                    "mean (TIES's disjoint mean)"
                )
            if len(set(weights)) > 1:
                notes.append(
                    "ties with unequal weights: mergekit elects signs on the weighted deltas and divides by the "
                    "survivors' weight; drm-lightning elects on the unweighted deltas and divides by their count "
                    "(equal when all weights are equal)"
                )
                mean = sum(weights) / len(weights)
                coefficients = [w / mean for w in weights]
            else:
                coefficients = None  # equal weights: mergekit's weighted mean is the plain disjoint mean
        else:
            params = {"drop_rate": 1.0 - density, "merge": "ties" if name == "dare_ties" else "task_arithmetic"}
            if name == "dare_ties":
                params["density"] = 1.0  # mergekit's dare_ties elects signs without a further trim
                notes.append(
                    "dare_ties: mergekit sums the surviving entries (normalize: false); drm-lightning takes their "
                    "mean (TIES's disjoint mean)"
                )
            if normalize:
                coefficients = [w / sum(weights) for w in weights]
            notes.append(
                "dare: the random masks are this project's (seeded, docs/methods.md) and survivors are scaled by "
                "1/(1-p); mergekit draws its own masks and rescales each delta to its L1 norm"
                + ("" if rescale is not False else " (rescale: false is not supported and is ignored)")
            )
    else:
        if normalize:
            coefficients = [w / sum(weights) for w in weights]
        if name == "model_stock" and any(w != 1.0 for w in weights):
            notes.append(
                "model_stock: mergekit ignores the models' weights; drm-lightning weighs the mean with them (the "
                "cosines stay unweighted)"
            )
        params = dict(shared)
        if rescale is not None:
            raise MergekitConfigError(f"{where}: parameters.rescale: not a parameter of {name}")
    if coefficients is not None and all(c == 1.0 for c in coefficients):
        coefficients = None
    dtype = raw.get("out_dtype", raw.get("dtype"))
    if dtype is not None and dtype not in _DTYPES:
        raise MergekitConfigError(f"{where}: dtype {dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
    tokenizer = raw.get("tokenizer_source")
    if tokenizer not in (None, "base") and tokenizer != base:
        raise MergekitConfigError(
            f"{where}: tokenizer_source={tokenizer!r}: only the base model's tokenizer is written (tokenizer_source: "
            "base)"
        )
    return MergekitMerge(inputs, method, params, coefficients, lam, base, dtype, notes)


def _model_ref(value: Any, key: str, *, optional: bool = False) -> str | None:
    """A model reference as a path string; mergekit's ``model+lora`` and mapping forms are refused."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise MergekitConfigError(f"{key}: expected a model folder path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise MergekitConfigError(
            f"{key}: {value!r}: mergekit's model+LoRA references are not supported; give the PEFT adapter folder "
            "itself as a model"
        )
    return value


def _scalars(value: Any, key: str) -> dict[str, Any]:
    """A parameters mapping whose values are plain scalars (no gradient lists, no conditional filters)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergekitConfigError(f"{key}: expected a mapping of parameter: value")
    for name, v in value.items():
        if isinstance(v, (list, dict)):
            raise MergekitConfigError(
                f"{key}.{name}: gradient lists and conditional (filter) values are not supported; give one value"
            )
    return dict(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergekitConfigError(f"{key}={value!r}: expected a number")
    return float(value)


def _shared_params(per_model: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The parameters every model gives the same value (this project's methods take one value per merge)."""
    names = {name for params in per_model for name in params}
    shared: dict[str, Any] = {}
    for name in sorted(names):
        values = [params.get(name) for params in per_model]
        if any(v != values[0] for v in values):
            raise MergekitConfigError(
                f"{key}.{name}: per-model values differ ({', '.join(map(repr, values))}); drm-lightning takes one "
                "value per merge"
            )
        shared[name] = values[0]
    return shared


def _no_extra(shared: dict[str, Any], key: str, method: str) -> None:
    """Refuse a parameter left over once mergekit's own ones of ``method`` are taken."""
    extra = sorted(shared)
    if extra:
        raise MergekitConfigError(f"{key}.{extra[0]}: not a parameter of mergekit's {method}")
