"""``drm-lightning merge --mergekit_config``: a mergekit YAML read as this project's merge.

The mapping is a table (each mergekit method and one of ours: method, parameters, coefficients, λ), the refusals a
table of one-line errors naming the key, and end to end a config gives byte for byte the merge its mapped command
line gives, on tiny Llama task vectors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from drm_lightning.cli import main
from drm_lightning.commands.mergekit_config import MergekitConfigError, read_mergekit_config
from tests.helpers.merge_inputs import build_tiny_model, write_task_vectors

OURS = frozenset({"task_arithmetic", "ties", "dare", "drm_v", "iso_cts", "model_stock"})


def _config(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _models(*weights: float, **extra: float) -> list[dict]:
    return [{"model": f"tv/{i}", "parameters": {"weight": w, **extra}} for i, w in enumerate(weights)]


# (config, method, params, coefficients, λ, number of notes)
MAPPINGS = [
    pytest.param(
        {"merge_method": "task_arithmetic", "base_model": "base", "models": _models(1.0, 1.0)},
        "task_arithmetic", {}, None, 1.0, 0, id="task_arithmetic",
    ),
    pytest.param(
        {"merge_method": "task_arithmetic", "base_model": "base", "models": _models(0.5, 0.3),
         "parameters": {"lambda": 0.8}},
        "task_arithmetic", {}, [0.5, 0.3], 0.8, 0, id="task_arithmetic-weights-lambda",
    ),
    pytest.param(
        {"merge_method": "task_arithmetic", "base_model": "base", "models": _models(1.0, 3.0),
         "parameters": {"normalize": True}},
        "task_arithmetic", {}, [0.25, 0.75], 1.0, 0, id="task_arithmetic-normalize",
    ),
    pytest.param(
        {"merge_method": "ties", "base_model": "base", "models": _models(1.0, 1.0, density=0.2)},
        "ties", {"density": 0.2}, None, 1.0, 0, id="ties-equal-weights",
    ),
    pytest.param(
        {"merge_method": "ties", "base_model": "base", "models": _models(1.0, 3.0, density=0.5)},
        "ties", {"density": 0.5}, [0.5, 1.5], 1.0, 1, id="ties-unequal-weights",
    ),
    pytest.param(
        {"merge_method": "ties", "base_model": "base", "models": _models(1.0, 1.0)},
        "ties", {"density": 1.0}, None, 1.0, 0, id="ties-mergekit-default-density",
    ),
    pytest.param(
        {"merge_method": "dare_linear", "base_model": "base", "models": _models(1.0, 1.0, density=0.3)},
        "dare", {"drop_rate": 0.7, "merge": "task_arithmetic"}, None, 1.0, 1, id="dare_linear",
    ),
    pytest.param(
        {"merge_method": "dare_ties", "base_model": "base", "models": _models(1.0, 1.0, density=0.3)},
        "dare", {"drop_rate": 0.7, "merge": "ties", "density": 1.0}, None, 1.0, 2, id="dare_ties",
    ),
    pytest.param(
        {"merge_method": "linear", "base_model": "base",
         "models": [{"model": "base", "parameters": {"weight": 1.0}}, *_models(1.0, 2.0)]},
        "task_arithmetic", {}, [0.25, 0.5], 1.0, 0, id="linear-with-base",
    ),
    pytest.param(
        {"merge_method": "drm_v", "base_model": "base", "models": _models(1.0, 1.0),
         "parameters": {"drop_rate": 0.5, "lambda": 1.2}},
        "drm_v", {"drop_rate": 0.5}, None, 1.2, 0, id="ours-drm_v",
    ),
    pytest.param(
        {"merge_method": "model_stock", "base_model": "base", "models": _models(1.0, 1.0, 1.0)},
        "model_stock", {}, None, 1.0, 0, id="model_stock",
    ),
    pytest.param(
        {"merge_method": "model_stock", "base_model": "base", "models": _models(1.0, 2.0)},
        "model_stock", {}, [1.0, 2.0], 1.0, 1, id="model_stock-weights-said-once",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "method", "params", "coefficients", "lam", "notes"), MAPPINGS)
def test_mapping(tmp_path: Path, body: dict, method: str, params: dict, coefficients, lam: float, notes: int) -> None:
    merge = read_mergekit_config(_config(tmp_path, body), OURS)
    assert (merge.method, merge.params, merge.lam, merge.base) == (method, params, lam, "base")
    assert merge.coefficients == (None if coefficients is None else pytest.approx(coefficients))
    assert merge.task_vectors == [m["model"] for m in body["models"] if m["model"] != "base"]
    assert len(merge.notes) == notes


# (config, words the one-line error must hold)
REFUSALS = [
    pytest.param({"merge_method": "slerp", "models": _models(1.0)}, ["merge_method", "'slerp'"], id="method"),
    pytest.param({"merge_method": "ties", "slices": []}, ["'slices'", "not supported"], id="slices"),
    pytest.param({"merge_method": "ties", "modules": {}}, ["'modules'"], id="modules"),
    pytest.param({"merge_method": "ties", "models": _models(1.0), "tokenizer": {}}, ["'tokenizer'"], id="tokenizer"),
    pytest.param({"merge_method": "ties", "models": _models(1.0), "bogus": 1}, ["unknown key 'bogus'"], id="key"),
    pytest.param({"merge_method": "ties", "models": []}, ["models"], id="no-models"),
    pytest.param(
        {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]},
        ["models[0].parameters.weight", "gradient"], id="gradient",
    ),
    pytest.param(
        {"merge_method": "ties", "models": _models(1.0), "parameters": {"density": [{"filter": "mlp", "value": 1}]}},
        ["parameters.density", "filter"], id="filter",
    ),
    pytest.param(
        {"merge_method": "ties", "models": [{"model": "a+b/lora"}]}, ["models[0].model", "model+LoRA"], id="lora",
    ),
    pytest.param(
        {"merge_method": "ties", "models": [*_models(1.0, density=0.2), {"model": "x", "parameters": {"density": 1}}]},
        ["models[*].parameters.density", "differ"], id="densities",
    ),
    pytest.param(
        {"merge_method": "linear", "models": _models(1.0, 1.0), "parameters": {"normalize": False}},
        ["normalize=false", "summing to 2"], id="linear-unnormalised",
    ),
    pytest.param(
        {"merge_method": "task_arithmetic", "models": _models(1.0), "dtype": "int8"}, ["dtype 'int8'"], id="dtype",
    ),
    pytest.param(
        {"merge_method": "ties", "models": _models(1.0), "parameters": {"epsilon": 0.1}},
        ["parameters.epsilon", "not a parameter"], id="unknown-param",
    ),
    pytest.param(
        {"merge_method": "ties", "models": _models(1.0), "tokenizer_source": "union"},
        ["tokenizer_source='union'"], id="tokenizer-union",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "words"), REFUSALS)
def test_refusals_are_one_line_naming_the_key(tmp_path: Path, body: dict, words: list[str]) -> None:
    path = _config(tmp_path, body)
    with pytest.raises(MergekitConfigError) as err:
        read_mergekit_config(path, OURS)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(MergekitConfigError, match="not found"):
        read_mergekit_config(tmp_path / "nope.yml", OURS)
    (tmp_path / "bad.yml").write_text("merge_method: [ties\n")
    with pytest.raises(MergekitConfigError, match="not valid YAML"):
        read_mergekit_config(tmp_path / "bad.yml", OURS)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("mergekit_llama")
    base = build_tiny_model(root / "base", "llama")
    return base, list(write_task_vectors(base, root / "tv", num_tasks=3, family="decoder"))


# (mergekit YAML body without models/base, per-model weights, density, the same merge as command-line arguments)
SAME_AS_ARGS = [
    pytest.param("task_arithmetic", [0.5, 1.0, 0.25], None, {"lambda": 0.7},
                 ["--method", "task_arithmetic", "--coefficients", "[0.5,1.0,0.25]", "--lam", "0.7"], id="ta"),
    pytest.param("ties", [1.0, 1.0, 1.0], 0.3, {},
                 ["--method", "ties", "--params", "{density: 0.3}"], id="ties"),
    pytest.param("linear", [1.0, 1.0, 2.0], None, {},
                 ["--method", "task_arithmetic", "--coefficients", "[0.25,0.25,0.5]"], id="linear"),
    pytest.param("dare_linear", [1.0, 1.0, 1.0], 0.4, {},
                 ["--method", "dare", "--params", "{drop_rate: 0.6, merge: task_arithmetic}"], id="dare_linear"),
    pytest.param("drm_v", [1.0, 1.0, 1.0], None, {"drop_rate": 0.5, "lambda": 1.5},
                 ["--method", "drm_v", "--params", "{drop_rate: 0.5}", "--lam", "1.5"], id="drm_v"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "weights", "density", "parameters", "args"), SAME_AS_ARGS)
def test_config_merges_byte_for_byte_as_its_arguments(
    llama: tuple[Path, list[Path]], tmp_path: Path, name: str, weights: list[float], density, parameters, args
) -> None:
    base, tvs = llama
    models = [
        {"model": str(tv), "parameters": {"weight": w, **({} if density is None else {"density": density})}}
        for tv, w in zip(tvs, weights, strict=True)
    ]
    config = _config(tmp_path, {"merge_method": name, "base_model": str(base), "models": models,
                                "parameters": parameters, "dtype": "float32"})  # fmt: skip
    assert main(["merge", "--mergekit_config", str(config), "--output", str(tmp_path / "from_config")]) == 0
    listed = "[" + ",".join(map(str, tvs)) + "]"
    plain = ["merge", "--task_vectors", listed, "--base", str(base), "--torch_dtype", "float32", *args]
    assert main([*plain, "--output", str(tmp_path / "from_args")]) == 0
    got, want = _sha(tmp_path / "from_config"), _sha(tmp_path / "from_args")
    assert got and got == want


def test_an_argument_given_twice_is_refused(llama: tuple[Path, list[Path]], tmp_path: Path, capsys) -> None:
    base, tvs = llama
    config = _config(tmp_path, {"merge_method": "ties", "base_model": str(base),
                                "models": [{"model": str(tv)} for tv in tvs]})  # fmt: skip
    out = tmp_path / "out"
    assert main(["merge", "--mergekit_config", str(config), "--output", str(out), "--method", "drm_v"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method and --mergekit_config both given" in err[0]
    assert not out.exists()
