"""``merge`` of fine-tuned model folders at a fixed λ: each delta taken when the merge reads it, never written first.

What is checked, on folders ``transformers`` saved itself:

- the merged model folder is, byte for byte, the one ``extract`` of each expert followed by a merge writes, per base
  (BERT with its pooler and a sharded classifier, a bf16 Llama, a float32 Llama with bf16 experts) and method;
- where the base's stored tensors are its backbone no base is loaded and nothing is converted (``load_base`` and
  ``write_import`` are never called), also when the merge keeps its delta; where they are not (a cast on load,
  ``--torch_dtype``) the written way runs;
- each delta the reader takes equals the written one exactly, and a parameter the fine-tune left unchanged reads
  as absent;
- bad input is one line naming the file: NaN or Inf in a fine-tuned tensor, a fine-tuned file cut short, a spoilt
  ``reference.json``; nothing is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.cli import main
from drm_lightning.interop import inputs as inputs_module
from drm_lightning.interop.inputs import convert, import_inputs
from drm_lightning.io.delta_reference import REFERENCE_FILE
from drm_lightning.io.task_vector import DELTAS_FILE, TaskVectorError
from drm_lightning.merging.engine.reader import MappedReference, TaskVectorReader
from tests.helpers.interop_models import bert_base, bert_classifier, llama_base, llama_causal

UNCHANGED = "embeddings.LayerNorm.bias"  # put back to the base's in one BERT expert


def _unchanged(folder: Path, base: Path) -> Path:
    """``folder`` with its copy of ``UNCHANGED`` put back to the base's value (a frozen parameter)."""
    tensors = load_file(folder / "model.safetensors")
    tensors["bert." + UNCHANGED] = load_file(base / "model.safetensors")[UNCHANGED]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("by_reference")
    bert = bert_base(root / "bert")
    llama16 = llama_base(root / "llama16", dtype=torch.bfloat16)
    llama32 = llama_base(root / "llama32")
    return {
        "bert": (bert, [bert_classifier(bert, root / "sst", seed=1, shard="40KB"),
                        _unchanged(bert_classifier(bert, root / "nli", seed=2), bert)]),
        "llama-bf16": (llama16, [llama_causal(llama16, root / f"chat{i}", seed=i) for i in (3, 4)]),
        "llama-f32-base-bf16-experts": (llama32, [llama_causal(llama32, root / f"code{i}", seed=i) for i in (5, 6)]),
    }  # fmt: skip


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a base was loaded or a delta written for an input that goes by reference")

    monkeypatch.setattr(inputs_module, "load_base", refuse)
    monkeypatch.setattr(inputs_module, "write_import", refuse)


def _merge(inputs: list[Path], output: Path, method: str, *extra: str) -> None:
    args = ["merge", "--task_vectors", "[" + ",".join(map(str, inputs)) + "]", "--method", method, "--lam", "0.7"]
    assert main([*args, "--output", str(output), *extra]) == 0


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "drm_v"])
@pytest.mark.parametrize("case", ["bert", "llama-bf16", "llama-f32-base-bf16-experts"])
def test_a_merge_by_reference_writes_the_bytes_of_extract_then_merge(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, method: str
) -> None:
    base, experts = cases[case]
    tvs = [convert(str(e), tmp_path / e.name, base=str(base)) for e in experts]
    _merge(tvs, tmp_path / "staged", method)
    with monkeypatch.context() as patch:
        _no_conversion(patch)
        _merge(experts, tmp_path / "direct", method, "--base", str(base))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "staged" / name).read_bytes(), name
    for expert in experts:
        head = f"heads/{expert.name}/head.safetensors"
        assert (tmp_path / "direct" / head).read_bytes() == (tmp_path / "staged" / head).read_bytes()
    record = json.loads((tmp_path / "direct" / "merge.json").read_text())
    assert [(i["path"], i["converted_from"]) for i in record["inputs"]] == [
        (str(e.resolve()), "model") for e in experts
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the reference folders are gone


def test_a_merge_that_keeps_its_delta_goes_by_reference_too(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts = cases["bert"]
    tvs = [convert(str(e), tmp_path / e.name, base=str(base)) for e in experts]
    _merge(tvs, tmp_path / "staged", "ties", "--keep_delta", "true")
    with monkeypatch.context() as patch:
        _no_conversion(patch)
        _merge(experts, tmp_path / "direct", "ties", "--base", str(base), "--keep_delta", "true")
    for name in ("direct/model.safetensors", "direct_delta/merged_delta/delta-00001.safetensors"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("direct", "staged")).read_bytes(), name


def test_a_base_that_loads_cast_goes_the_written_way_with_the_same_result(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts = cases["llama-f32-base-bf16-experts"]
    written = []
    real = inputs_module.write_import
    monkeypatch.setattr(inputs_module, "write_import", lambda *a, **k: written.append(a[2]) or real(*a, **k))
    _merge(experts, tmp_path / "direct", "task_arithmetic", "--base", str(base), "--torch_dtype", "bfloat16")
    assert len(written) == 2  # loading casts float32 to bfloat16: the stored tensors are not the backbone
    tvs = [convert(str(e), tmp_path / e.name, base=str(base), torch_dtype="bfloat16") for e in experts]
    _merge(tvs, tmp_path / "staged", "task_arithmetic")
    assert (tmp_path / "direct/model.safetensors").read_bytes() == (tmp_path / "staged/model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["bert", "llama-bf16"])
def test_each_delta_taken_by_reference_equals_the_written_one(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, case: str
) -> None:
    base, experts = cases[case]
    with import_inputs([str(e) for e in experts], tmp_path / "out", base=str(base), by_reference=True) as folders:
        for expert, folder in zip(experts, folders, strict=True):
            assert (Path(folder) / REFERENCE_FILE).is_file() and not (Path(folder) / DELTAS_FILE).exists()
            written = TaskVectorReader(convert(str(expert), tmp_path / expert.name, base=str(base)))
            reader = TaskVectorReader(folder)
            assert reader.meta.base_fingerprint == written.meta.base_fingerprint  # the loaded base's, unloaded
            shapes = reader.delta_shapes()
            for name, shape in shapes.items():
                stored = written.get(name, shape)
                mapped = reader.get(name, shape, check=False)  # as the merge's read-ahead thread asks: no arithmetic
                assert isinstance(mapped, MappedReference), name
                for taken in (reader.get(name, shape), reader.check(name, mapped)):
                    if stored is None:
                        assert taken is None, name
                    else:
                        assert taken.dtype == stored.dtype and torch.equal(taken, stored), name
            if case == "bert" and expert.name == "nli":  # listed by reference, read as absent
                assert UNCHANGED in shapes and reader.get(UNCHANGED, shapes[UNCHANGED]) is None


def test_a_bad_delta_by_reference_is_found_by_the_merging_threads_check_not_the_read_ahead(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """The read-ahead thread maps the two tensors and nothing more (its arithmetic would run beside the merge's, each
    with an OpenMP team on the same cores: TIES from folders took 19.8 s instead of 12.4 s); the NaN is found when
    the merging thread checks, in one line naming the fine-tuned file and tensor."""
    base, experts = cases["bert"]
    broken = _copy(experts[1], tmp_path / "in" / "nli")
    _spoil_tensor(broken, float("nan"))
    with import_inputs([str(broken)], tmp_path / "out", base=str(base), by_reference=True) as (folder,):
        reader = TaskVectorReader(folder)
        name = "encoder.layer.1.attention.self.query.weight"
        mapped = reader.get(name, reader.delta_shapes()[name], check=False)
        assert isinstance(mapped, MappedReference)
        with pytest.raises(TaskVectorError, match=r"nli/model\.safetensors: tensor 'bert\.encoder.*holds NaN or Inf"):
            reader.check(name, mapped)


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def _spoil_tensor(folder: Path, value: float) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["bert.encoder.layer.1.attention.self.query.weight"].view(-1)[3] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _cut_short(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda f: _spoil_tensor(f, float("nan")),
            r"nli/model\.safetensors: tensor 'bert\.encoder\.layer\.1\.attention"
            r"\.self\.query\.weight' minus the base's .* holds NaN or Inf",
        ),
        (lambda f: _spoil_tensor(f, float("-inf")), r"nli/model\.safetensors: .*query\.weight.* holds NaN or Inf"),
        (_cut_short, r"nli/model\.safetensors: .*(truncated|file ends)"),
    ],
    ids=["nan", "-inf", "cut-short"],
)
def test_bad_fine_tuned_tensors_fail_the_merge_in_one_line_naming_the_file(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil, message: str
) -> None:
    base, experts = cases["bert"]
    broken = _copy(experts[1], tmp_path / "in" / "nli")
    spoil(broken)
    inputs = f"[{experts[0]},{broken}]"
    assert main(["merge", "--task_vectors", inputs, "--base", str(base), "--output", str(tmp_path / "merged")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: "{", r"reference\.json: not readable as JSON"),
        (lambda r: json.dumps({**r, "format": 9}), r"reference\.json: expected format 1"),
        (lambda r: json.dumps({**r, "delta_dtype": "int8"}), r"reference\.json: delta_dtype='int8'"),
        (
            lambda r: json.dumps({**r, "tensors": {"x": {"tuned": ["/nowhere.safetensors", "k"], "base": ["a", "b"]}}}),
            r"/nowhere\.safetensors: not found",
        ),
    ],
    ids=["not-json", "format", "dtype", "missing-file"],
)
def test_a_spoilt_reference_file_is_one_line_naming_it(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path, edit, message: str
) -> None:
    base, experts = cases["bert"]
    with import_inputs([str(experts[0])], tmp_path / "out", base=str(base), by_reference=True) as (folder,):
        path = Path(folder) / REFERENCE_FILE
        path.write_text(edit(json.loads(path.read_text())))
        with pytest.raises(TaskVectorError, match=message):
            TaskVectorReader(folder)


def test_the_recorded_fingerprint_of_an_input_by_reference_follows_its_weights(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """``merge.json`` records a fingerprint per input: by reference it must change with the fine-tuned weights, not
    only with where they are (the folder holds their paths, not their bytes)."""
    base, experts = cases["llama-bf16"]
    expert = _copy(experts[0], tmp_path / "in" / "chat")

    def recorded(output: str) -> str:
        _merge([expert, experts[1]], tmp_path / output, "task_arithmetic", "--base", str(base))
        return json.loads((tmp_path / output / "merge.json").read_text())["inputs"][0]["fingerprint"]

    first = recorded("a")
    assert recorded("b") == first  # the same weights: the same fingerprint
    tensors = load_file(expert / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    assert recorded("c") != first


def test_an_adapter_is_written_as_it_is_even_where_a_model_goes_by_reference(
    cases: dict[str, tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """Only a fine-tuned model's plan has a reference form: an adapter's factors (and its ``modules_to_save``, also
    where no LoRA factor is left) are small and written, and ``write_reference_import`` refuses its plan."""
    from drm_lightning.interop.peft_adapter import plan_adapter
    from drm_lightning.interop.stored_base import stored_backbone
    from drm_lightning.interop.write import write_reference_import
    from tests.helpers.interop_models import bert_lora

    base, experts = cases["bert"]
    adapter = bert_lora(base, tmp_path / "lora", seed=7)
    inputs = [str(experts[0]), str(adapter)]
    with import_inputs(inputs, tmp_path / "out", base=str(base), by_reference=True) as (model, lora):
        assert (Path(model) / REFERENCE_FILE).is_file() and (Path(lora) / DELTAS_FILE).is_file()
    plan, info = plan_adapter(str(adapter), str(base))
    plan.lora = {}  # what is left of an adapter whose LoRA modules were all skipped
    with pytest.raises(ValueError, match="only a fine-tuned model's plan has a reference form"):
        write_reference_import(plan, info, tmp_path / "tv", "lora", stored_backbone(info, {}))
