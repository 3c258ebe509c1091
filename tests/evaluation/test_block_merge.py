"""RegMean++ (``evaluation/block_merge.py``): Grams on the merged model's own inputs, block by block.

The math against a float64 evaluation of the equations on a tiny two-layer model (layer 2's Grams taken on the
*merged* layer 1's outputs); then real merged folders from tiny BERT task vectors: one task gives that task's
deltas, the first block equals plain RegMean's (whose Grams the expert's own earlier layers give, the same here),
bad input is one line with nothing written, and a pipeline recipe runs the method.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from drm_lightning.evaluation.block_merge import RECORD_KEY, BlockSchedule, TaskData, merge_block_by_block, merge_blocks
from drm_lightning.io.merged_delta import iter_merged_delta
from drm_lightning.io.task_vector import HEAD_FILE, read_meta
from drm_lightning.merging import reference as ref
from drm_lightning.merging.engine.plan import MergePlan
from drm_lightning.merging.methods.registry import get_method
from drm_lightning.merging.methods.regmean import regmean
from tests.helpers.merge_inputs import dense_deltas, write_task_vectors
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_tiny_tasks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
F64 = torch.float64
ALPHA = 0.95


# ---------------------------------------------------------------------------------- the equations, two layers


class _Reader:
    """A task vector in memory (what the merge loop reads: ``task``, ``get``, ``check``)."""

    def __init__(self, task: str, deltas: dict[str, torch.Tensor]) -> None:
        self.task, self.deltas, self.folder = task, deltas, Path(task)

    def get(self, name: str, shape: tuple[int, ...], *, check: bool = True) -> torch.Tensor | None:
        return self.deltas.get(name)

    def check(self, name: str, delta: torch.Tensor | None) -> torch.Tensor | None:
        assert delta is None or bool(torch.isfinite(delta).all())
        return delta


def _two_layers(tasks: int, seed: int) -> tuple[nn.Sequential, list[_Reader], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    readers = [
        _Reader(f"t{i}", {n: torch.randn(p.shape, generator=gen, dtype=F64) * 0.3 for n, p in model.named_parameters()})
        for i in range(tasks)
    ]
    scales = torch.logspace(-1, 0.5, 5, dtype=F64)
    inputs = [torch.randn(11 + 3 * i, 5, generator=gen, dtype=F64) * scales for i in range(tasks)]
    return model, readers, inputs


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def _reference(model: nn.Sequential, readers: list[_Reader], inputs: list[torch.Tensor], coefficients):
    """RegMean++ from the equations: layer 1 by RegMean on the inputs' Grams; layer 2 by RegMean on the Grams of
    tanh(x W1ᵀ + b1) with the *merged* layer 1 (W_0 + Δ); biases the plain mean."""
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def deltas(name: str) -> list[torch.Tensor]:
        return [r.deltas[name] for r in readers]

    out = {"0.weight": ref.regmean(deltas("0.weight"), [_gram(x) for x in inputs], ALPHA, coefficients)}
    out["0.bias"] = ref.task_mean(deltas("0.bias"), coefficients)
    w1, b1 = w0["0.weight"] + out["0.weight"], w0["0.bias"] + out["0.bias"]
    hidden = [torch.tanh(x @ w1.T + b1) for x in inputs]
    out["2.weight"] = ref.regmean(deltas("2.weight"), [_gram(h) for h in hidden], ALPHA, coefficients)
    out["2.bias"] = ref.task_mean(deltas("2.bias"), coefficients)
    return out


def _in_memory(model: nn.Sequential, readers: list[_Reader], inputs: list[torch.Tensor], coefficients):
    """What ``merge_block_by_block`` hands ``merge_blocks``: the setup's fields it reads, and the tasks' data (every
    task's "expert" is the model itself, its examples one batch)."""
    method = get_method("regmean_plusplus")
    setup = SimpleNamespace(method=method, params=method.check({}), coefficients=coefficients, readers=readers,
                            device=torch.device("cpu"))  # fmt: skip
    counts = {r.task: len(x) for r, x in zip(readers, inputs, strict=True)}
    return setup, TaskData([model] * len(readers), [[x] for x in inputs], counts)


def _merge_in_memory(model: nn.Sequential, readers: list[_Reader], inputs: list[torch.Tensor], coefficients):
    method = get_method("regmean_plusplus")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    entries = MergePlan().entries(shapes, method, num_tasks=len(readers))
    setup, tasks = _in_memory(model, readers, inputs, coefficients)
    layers = {"0.weight": model[0], "2.weight": model[2]}
    schedule = BlockSchedule.probe(model, layers, inputs[0], entries)
    assert schedule.blocks == ["0", "2"] and schedule.first == [] and schedule.early
    return dict(merge_blocks(setup, model, tasks, schedule, layers, {})), schedule


@pytest.mark.parametrize(("tasks", "coefficients"), [(3, None), (3, [1.0, 0.5, -0.3]), (1, None)])
def test_two_layer_model_matches_the_equations(tasks: int, coefficients: list[float] | None) -> None:
    import copy

    from drm_lightning.merging.engine.apply import add_merged_delta

    model, readers, inputs = _two_layers(tasks, seed=tasks)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    applied = copy.deepcopy(model)
    expected = _reference(model, readers, inputs, coefficients)
    merged, _ = _merge_in_memory(model, readers, inputs, coefficients)
    assert set(merged) == set(expected)
    for name, delta in merged.items():  # float32 Grams and result: a tolerance, not identity
        assert ref.relative_error(delta, expected[name]) <= 1e-4, name
    add_merged_delta(applied, "in memory", 1.0, deltas=merged.items())
    for name, weight in applied.state_dict().items():  # the model ends as W_0 + 1·Δ_merged, as λ = 1 applies it
        assert torch.equal(model.state_dict()[name], weight), name
    if tasks == 1:  # one task: its own deltas, whatever the Grams
        for name, delta in merged.items():
            torch.testing.assert_close(delta.to(F64), readers[0].deltas[name], rtol=1e-5, atol=1e-6)
        return
    first = regmean([r.deltas["0.weight"] for r in readers], ALPHA, coefficients=coefficients,
                    statistics=[_gram(x) for x in inputs])  # fmt: skip
    assert ref.relative_error(merged["0.weight"], first) <= 1e-5  # layer 1: plain RegMean's
    # layer 2 is not RegMean's, whose Grams come from each expert's own layer 1
    expert_hidden = [
        torch.tanh(x @ (w0["0.weight"] + r.deltas["0.weight"]).T + w0["0.bias"] + r.deltas["0.bias"])
        for r, x in zip(readers, inputs, strict=True)
    ]
    plain = ref.regmean([r.deltas["2.weight"] for r in readers], [_gram(h) for h in expert_hidden], ALPHA, coefficients)
    assert ref.relative_error(merged["2.weight"], plain) > 1e-2


def test_early_stop_changes_nothing() -> None:
    """Stopping each pass at the next block's first layer gives the Grams of the whole pass."""
    model, readers, inputs = _two_layers(3, seed=7)
    merged, schedule = _merge_in_memory(model, readers, inputs, None)
    model2, readers2, inputs2 = _two_layers(3, seed=7)
    schedule.early = False
    setup, tasks = _in_memory(model2, readers2, inputs2, None)
    full = dict(merge_blocks(setup, model2, tasks, schedule, {"0.weight": model2[0], "2.weight": model2[2]}, {}))
    for name in merged:
        assert torch.equal(merged[name], full[name]), name


# ---------------------------------------------------------------------------------- merged folders, tiny BERT

EXAMPLES = 24


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT, two random task vectors with real encoder heads (with and without embedding deltas), and the
    tiny tasks' datamodules."""
    from drm_lightning.commands.tasks import task_datamodules
    from drm_lightning.models.expert import ExpertModule

    root = tmp_path_factory.mktemp("block_merge")
    base = make_tiny_model("encoder", root / "base")
    data = write_tiny_tasks(root / "data", sizes=(40, 8, 8))
    out = {"root": root, "base": base, "data": data}
    for key, drop in (("tvs", None), ("no_embeddings", r"embeddings\.")):
        folders = write_task_vectors(base, root / key, 2, tasks=list(data), drop=drop, scale=0.05)
        for folder in folders:  # the helper's head is one linear map; the encoder family's is dense + out_proj
            meta = read_meta(folder)
            head = ExpertModule(base, "encoder", meta.task, meta.label_names).head
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
        out[key] = [str(f) for f in folders]
    out["datamodules"] = task_datamodules([str(p) for p in data.values()], out["tvs"])
    return out


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_merged_delta(folder))


def test_one_task_gives_its_own_deltas_and_a_normal_merged_folder(bert: dict, tmp_path: Path) -> None:
    from drm_lightning.merging.engine.apply import apply_merged_delta

    one = bert["tvs"][:1]
    result = merge_block_by_block(one, "regmean_plusplus", tmp_path / "m", bert["datamodules"], examples=EXAMPLES)
    merged, own = _merged(tmp_path / "m"), dense_deltas(one[0])
    assert set(merged) == set(own)
    for name, delta in merged.items():
        torch.testing.assert_close(delta, own[name], rtol=1e-4, atol=1e-6)
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["method"] == "regmean_plusplus" and record["params"] == {"alpha": ALPHA, "ridge": 1e-8}
    info = record[RECORD_KEY]
    assert info["blocks"] == ["encoder.layer.0", "encoder.layer.1"] and info["early_stop"]
    assert info["examples"] == {read_meta(one[0]).task: EXAMPLES} and "embeddings" in info["merged_first"]
    assert result.timings["grams"] > 0 and (tmp_path / "m" / "heads").is_dir()
    model = apply_merged_delta(tmp_path / "m", 1.0)  # every reader of merged folders takes it
    assert isinstance(model, nn.Module)


def test_first_block_is_plain_regmeans(bert: dict, tmp_path: Path) -> None:
    """Without embedding deltas the first block's inputs are the base's, as in each expert: RegMean's Grams, over
    the same examples (``drm-lightning statistics``' sample), give the same first block; the second differs."""
    import shutil

    from drm_lightning.commands.statistics import add_expert_statistics
    from drm_lightning.merging.engine.merger import merge_task_vectors

    folders = [shutil.copytree(f, tmp_path / "tv" / Path(f).name) for f in bert["no_embeddings"]]
    for folder in folders:
        add_expert_statistics(folder, bert["datamodules"][read_meta(folder).task], EXAMPLES, device="cpu")
    params = {"alpha": ALPHA}
    merge_task_vectors(folders, "regmean", tmp_path / "rm", params, progress=False, device="cpu")
    merge_block_by_block(folders, "regmean_plusplus", tmp_path / "pp", bert["datamodules"], params,
                         examples=EXAMPLES, device="cpu")  # fmt: skip
    plain, plus = _merged(tmp_path / "rm"), _merged(tmp_path / "pp")
    assert set(plain) == set(plus)
    matrices = [n for n in plain if plain[n].ndim == 2 and "embeddings" not in n]
    for name in matrices:
        error = ref.relative_error(plus[name], plain[name])
        if name.startswith("encoder.layer.0."):
            assert error <= 1e-4, name
        elif name.startswith("encoder.layer.1.") and "query" in name:
            assert error > 1e-3, name  # its inputs come from the merged first block


def test_bad_input_is_one_line_and_writes_nothing(bert: dict, tmp_path: Path) -> None:
    from drm_lightning.merging.engine.merger import merge_task_vectors

    task = read_meta(bert["tvs"][1]).task
    only_one = {t: dm for t, dm in bert["datamodules"].items() if t != task}
    with pytest.raises(ValueError, match=rf"meta\.json: task '{task}' has no datamodule") as err:
        merge_block_by_block(bert["tvs"], "regmean_plusplus", tmp_path / "a", only_one)
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"examples=0") as err:
        merge_block_by_block(bert["tvs"], "regmean_plusplus", tmp_path / "b", bert["datamodules"], examples=0)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"method='regmean': merges parameter by parameter"):
        merge_block_by_block(bert["tvs"], "regmean", tmp_path / "c", bert["datamodules"])
    # the streaming merge has no data: refused before anything is loaded, naming where the method runs
    with pytest.raises(ValueError, match=r"merged model's earlier layers produce.*--tasks") as err:
        merge_task_vectors(bert["tvs"], "regmean_plusplus", tmp_path / "d", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "d").exists()


def test_pipeline_recipe_with_regmean_plusplus(tmp_path: Path) -> None:
    """``method: regmean_plusplus`` in a recipe: merged with the recipe's datamodules into merged/<label>, then λ, the
    report and the exported model as for any method; a rerun reuses the merge."""
    from tests.helpers.recipes import run_recipe, tiny_two_task_recipe

    methods = [{"method": "regmean_plusplus", "lambdas": [0.5, 1.0]}]
    recipe = tiny_two_task_recipe(tmp_path, methods=methods, split="validation")
    run = run_recipe(tmp_path, recipe)
    report = json.loads((run / "report.json").read_text())
    assert [m["method"] for m in report["results"]["methods"]] == ["regmean_plusplus"]
    merged = run / "merged" / "regmean_plusplus"
    record = json.loads((merged / "merge.json").read_text())
    assert record[RECORD_KEY]["examples"] == {"sentiment": 48, "animal": 48}  # every example of a 48-row split
    assert (run / "models" / "regmean_plusplus" / "config.json").is_file()
    stamp = (merged / "merge.json").stat().st_mtime_ns
    run_recipe(tmp_path, recipe)
    assert (merged / "merge.json").stat().st_mtime_ns == stamp


def test_merge_command_takes_the_tasks(bert: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``drm-lightning merge --method regmean_plusplus`` merges with the --tasks' training examples and writes the
    model folder (no Δ folder left behind at a fixed λ); without --tasks it is one line and writes nothing."""
    from drm_lightning.cli import main

    args = ["merge", "--method", "regmean_plusplus", "--task_vectors", json.dumps(bert["tvs"]), "--lam", "1.0"]
    tasks = ["--tasks", json.dumps([str(p) for p in bert["data"].values()])]
    assert main([*args, *tasks, "--output", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["method"] == "regmean_plusplus" and record["lam"] == 1.0 and RECORD_KEY in record
    assert (tmp_path / "m" / "config.json").is_file() and not (tmp_path / "m_delta").exists()
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tasks" in err[0] and not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    ("family", "blocks"),
    [
        ("decoder", ["layers.0", "layers.1"]),
        ("seq2seq", ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]),
    ],
)
def test_other_families_merge_in_call_order(family: str, blocks: list[str], bert: dict, tmp_path: Path) -> None:
    """A Llama decoder and a T5 (encoder blocks, then decoder blocks whose cross-attention reads the merged encoder):
    the blocks in the order a pass calls them, early stops, and one task gives its own deltas."""
    from drm_lightning.commands.tasks import task_datamodules
    from drm_lightning.models.expert import ExpertModule

    base = make_tiny_model(family, tmp_path / "base")
    [folder] = write_task_vectors(base, tmp_path / "tv", 1, tasks=["sentiment"], family=family, scale=0.05)
    meta = read_meta(folder)
    head = ExpertModule(base, family, meta.task, meta.label_names).head
    if head is not None:  # seq2seq scores label words: no head
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    datamodules = task_datamodules([str(bert["data"]["sentiment"])], [str(folder)])
    merge_block_by_block([str(folder)], "regmean_plusplus", tmp_path / "m", datamodules, examples=8)
    info = json.loads((tmp_path / "m" / "merge.json").read_text())[RECORD_KEY]
    assert info["blocks"] == blocks and info["early_stop"]
    merged, own = _merged(tmp_path / "m"), dense_deltas(folder)
    assert set(merged) == set(own)
    for name, delta in merged.items():
        torch.testing.assert_close(delta, own[name], rtol=1e-4, atol=1e-6)


def test_lora_task_vectors(bert: dict, tmp_path: Path) -> None:
    """LoRA task vectors: each expert's block runs with ``scale·B·A`` added, the solve takes the factors; one task
    gives its own (dense) deltas."""
    from drm_lightning.models.expert import ExpertModule

    [folder] = write_task_vectors(bert["base"], tmp_path / "tv", 1, tasks=["sentiment"], kind="lora", scale=0.05)
    meta = read_meta(folder)
    head = ExpertModule(bert["base"], "encoder", meta.task, meta.label_names).head
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    merge_block_by_block([str(folder)], "regmean_plusplus", tmp_path / "m", bert["datamodules"], examples=8)
    merged, own = _merged(tmp_path / "m"), dense_deltas(folder)
    assert set(merged) == set(own)
    for name, delta in merged.items():
        torch.testing.assert_close(delta, own[name], rtol=1e-4, atol=1e-6)
