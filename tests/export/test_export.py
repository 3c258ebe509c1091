"""Models out: the merged folder is a complete model of the base's own architecture, and LoRA experts merge into a
PEFT adapter equal to the dense merge.

Outputs are loaded in a fresh Python process that never imports drm_lightning (plain ``transformers`` / ``peft``),
and compared with the project's own evaluation of the same merged model (``MergedBackbone``, ``ExpertModule``).
Tiny models are built from configs (hidden size 32).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from drm_lightning.cli import main
from drm_lightning.evaluation.merged import MergedBackbone
from drm_lightning.export.factor import factor_delta
from drm_lightning.export.task_model import load_task_model
from drm_lightning.io.merged_delta import iter_merged_delta
from drm_lightning.io.task_vector import HEAD_FILE, META_FILE, read_meta
from drm_lightning.merging.methods.registry import METHODS
from drm_lightning.merging.ops.lowrank import LowRankDelta
from drm_lightning.models.heads import DecoderHead, EncoderHead
from tests.helpers import delta_cases
from tests.helpers.merge_inputs import with_random_statistics, write_task_vectors
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_tasks import write_tiny_tasks

LAM = 0.7
#: Every method whose merge of LoRA experts is an exact adapter (``lora_span``), with the experts it merges here:
#: ``lora`` (three tasks, rank 3), ``lora_stats`` (the same with input statistics, for RegMean) or ``lora_data`` (two
#: tiny tasks with their data, for RegMean++, which takes its Grams block by block from ``--tasks``).
EXACT = {
    "task_arithmetic": "lora",
    "drm_v": "lora",
    "drm_h": "lora",
    "drm_iso_v": "lora",
    "drm_iso_h": "lora",
    "iso_c": "lora",
    "iso_cts": "lora",
    "tsv_m": "lora",
    "wudi_closed": "lora",
    "model_stock": "lora",
    "regmean": "lora_stats",
    "regmean_plusplus": "lora_data",
}

#: Runs in a fresh interpreter: loads what a spec names with plain transformers/peft, writes logits to a file.
PLAIN = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from safetensors.torch import save_file
    spec = json.load(open(sys.argv[1]))
    out = {}
    ids = torch.tensor(spec["ids"])
    for name, job in spec["jobs"].items():
        cls = getattr(transformers, job["class"])
        if job.get("adapter"):
            from peft import PeftModel
            model = PeftModel.from_pretrained(cls.from_pretrained(job["base"]), job["adapter"])
        else:
            model = cls.from_pretrained(job["path"])
        model.eval()
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        key = "logits" if hasattr(res, "logits") and res.logits is not None else "last_hidden_state"
        out[name] = getattr(res, key).float().contiguous()
        if job.get("generate"):
            out[name + ".generated"] = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
            out[name + ".lm_head"] = model.lm_head.weight.detach().contiguous()
        if job.get("tied"):
            tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            out[name + ".tied"] = torch.tensor([int(tied)])
    assert "drm_lightning" not in sys.modules
    save_file(out, sys.argv[2])
    """
)


def _plain(tmp: Path, jobs: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "ids": ids.tolist()}))
    result = tmp / "plain.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(spec), str(result)], capture_output=True, text=True, timeout=300, cwd=tmp
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(result))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _with_heads(folders: list[Path], kind: str = "encoder") -> None:
    """Give fake task vectors real heads (state and config), as ``fit`` writes them: mean-pooling ``EncoderHead``s
    or ``DecoderHead``s."""
    for i, folder in enumerate(folders):
        torch.manual_seed(100 + i)
        head = EncoderHead(32, 2, pooling="mean") if kind == "encoder" else DecoderHead(32, 2)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
        meta = json.loads((folder / META_FILE).read_text())
        meta["head"] = head.config()
        (folder / META_FILE).write_text(json.dumps(meta))


def _merge(*args: str) -> None:
    """``drm-lightning merge``, keeping Δ_merged in ``<output>_delta`` (the tests compare against it)."""
    assert main(["merge", *args, "--keep_delta", "true"]) == 0


def _tvs(folders: list[Path]) -> str:
    return "[" + ",".join(str(f) for f in folders) + "]"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Every output of this module, merged through the CLI, then loaded by ONE plain transformers/peft process
    (a fresh interpreter costs seconds on a loaded 2-core machine): decoders (untied, and ``decoder_lm``), tied
    embeddings, an encoder with its pooler, and LoRA experts of a tiny Llama merged with every exact method both
    as a dense model and as an adapter."""
    root = tmp_path_factory.mktemp("export")
    jobs: dict[str, dict] = {}
    decoder = make_tiny_model("decoder", root / "decoder_base")  # LlamaForCausalLM, untied embeddings
    jobs["base"] = {"class": "AutoModelForCausalLM", "path": decoder}
    for family in ("decoder", "decoder_lm"):
        tvs = write_task_vectors(decoder, root / f"tvs_{family}", 2, family=family, drop=r"lm_head|embed_tokens")
        _merge("--task_vectors", _tvs(tvs), "--method", "task_arithmetic", "--lam", str(LAM), "--output",
               str(root / family))  # fmt: skip
        jobs[family] = {"class": "AutoModelForCausalLM", "path": str(root / family), "generate": 1}
    tied = make_tiny_model("decoder", root / "tied_base", tie_word_embeddings=True)
    tvs = write_task_vectors(tied, root / "tvs_tied", 2, family="decoder")  # embed_tokens changes too
    _merge("--task_vectors", _tvs(tvs), "--method", "ties", "--output", str(root / "tied"))
    jobs["tied"] = {"class": "AutoModelForCausalLM", "path": str(root / "tied"), "tied": 1}
    encoder = make_tiny_model("encoder", root / "encoder_base")  # BertModel with its pooler
    enc_tvs = write_task_vectors(encoder, root / "tvs_encoder", 2)
    _with_heads(enc_tvs)
    _merge("--task_vectors", _tvs(enc_tvs), "--method", "iso_c", "--lam", str(LAM), "--output", str(root / "encoder"))
    jobs["encoder"] = {"class": "AutoModel", "path": str(root / "encoder")}
    lora = write_task_vectors(decoder, root / "tvs_lora", 3, kind="lora", family="decoder", rank=3, scale=0.05)
    _with_heads(lora, "decoder")
    data = write_tiny_tasks(root / "data", sizes=(24, 8, 8))
    experts = {
        "lora": lora,
        "lora_stats": with_random_statistics(lora, root / "tvs_lora_stats"),
        "lora_data": write_task_vectors(
            decoder, root / "tvs_lora_data", 2, kind="lora", family="decoder", rank=3, scale=0.05, tasks=list(data)
        ),  # fmt: skip
    }
    _with_heads(experts["lora_data"], "decoder")
    tasks = ["--tasks", _tvs(list(data.values()))]
    for method, key in EXACT.items():
        common = ["--task_vectors", _tvs(experts[key]), "--method", method, "--lam", str(LAM)]
        if METHODS[method].block_by_block:
            common += tasks
        _merge(*common, "--output", str(root / f"dense_{method}"))
        _merge(*common, "--save_as", "adapter", "--output", str(root / f"adapter_{method}"))
        jobs[f"dense_{method}"] = {"class": "LlamaForCausalLM", "path": str(root / f"dense_{method}")}
        adapter = str(root / f"adapter_{method}")
        jobs[f"adapter_{method}"] = {"class": "LlamaForCausalLM", "base": decoder, "adapter": adapter}
    ids = torch.randint(5, 60, (3, 7))
    got = _plain(root, jobs, ids)
    return {"root": root, "decoder": decoder, "tied_base": tied, "encoder_base": encoder, "enc_tvs": enc_tvs,
            "lora": lora, "experts": experts, "ids": ids, "got": got}  # fmt: skip


@pytest.mark.parametrize("family", ["decoder", "decoder_lm"])
def test_decoder_folder_generates_with_the_base_lm_head(run: dict, family: str) -> None:
    got, ids, root = run["got"], run["ids"], run["root"]
    base_head = load_file(str(Path(run["decoder"]) / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(got[f"{family}.lm_head"], base_head)  # the base's own LM head, not a random one
    assert got[f"{family}.generated"].shape == (1, ids.shape[1] + 4)
    # The project's evaluation of the same merged model: MergedBackbone at λ (then the base's LM head).
    backbone = MergedBackbone(root / f"{family}_delta").at(LAM)
    with torch.no_grad():
        out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = out.logits if family == "decoder_lm" else out.last_hidden_state @ base_head.T
    assert _rel(got[family], logits) < 1e-6
    assert _rel(got[family], got["base"]) > 1e-3  # the merge changed something
    record = json.loads((root / family / "merge.json").read_text())
    assert record["architecture"] == "LlamaForCausalLM" and record["save_as"] == "model"


def test_tied_embeddings_stay_tied(run: dict) -> None:
    root = run["root"]
    assert int(run["got"]["tied.tied"]) == 1
    saved = load_file(str(root / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in saved  # saved once, as the base was
    merged = dict(iter_merged_delta(root / "tied_delta"))["embed_tokens.weight"]
    base_embed = load_file(str(Path(run["tied_base"]) / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(saved["model.embed_tokens.weight"], base_embed + 1.0 * merged)


def test_encoder_folder_keeps_the_pooler_and_load_task_model_matches_the_evaluation(run: dict) -> None:
    from drm_lightning.models.expert import ExpertModule

    root, ids = run["root"], run["ids"]
    out = root / "encoder"
    saved = load_file(str(out / "model.safetensors"))
    base_weights = load_file(str(Path(run["encoder_base"]) / "model.safetensors"))
    assert torch.equal(saved["pooler.dense.weight"], base_weights["pooler.dense.weight"])
    mask = torch.ones_like(ids)
    backbone = MergedBackbone(root / "encoder_delta").at(LAM)
    for folder in run["enc_tvs"]:
        task = read_meta(folder).task
        # The documented head format, in plain torch: masked mean (all ones here), dense, tanh, out_proj.
        head = load_file(str(out / "heads" / task / HEAD_FILE))
        pooled = run["got"]["encoder"].mean(dim=1)
        plain = torch.tanh(pooled @ head["dense.weight"].T + head["dense.bias"]) @ head["out_proj.weight"].T
        plain = plain + head["out_proj.bias"]
        expert = ExpertModule.from_task_vector(folder, backbone=backbone)
        with torch.no_grad():
            evaluation = expert({"input_ids": ids, "attention_mask": mask})
            loaded = load_task_model(out, task)(input_ids=ids, attention_mask=mask)
        assert _rel(plain, evaluation) < 1e-5
        assert _rel(loaded, evaluation) < 1e-6


def test_the_report_lines_classify_with_plain_transformers_and_peft(run: dict) -> None:
    """The lines a report (and a model card) ends with, run in a fresh interpreter (no drm_lightning), give
    load_task_model's prediction and logits: an encoder model folder (mean pooling), a decoder adapter folder
    (last-token head) and a label-word decoder_lm folder (log-likelihoods)."""
    from drm_lightning.export.snippet import usage_lines

    root = run["root"]
    cases = [(root / "encoder", "task0"), (root / "adapter_iso_c", "task1"), (root / "decoder_lm", "task0")]
    text = "the movie was good"
    script = "\n".join(line for folder, task in cases for line in usage_lines(folder, task, text))
    done = subprocess.run(
        [sys.executable, "-c", script + "\nimport sys; assert 'drm_lightning' not in sys.modules"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(printed) == len(cases)
    for (folder, task), line in zip(cases, printed, strict=True):
        model = load_task_model(folder, task)
        inputs = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
        label, values = line.split(" ", 1)
        assert label == model.label_names[int(logits.argmax())]
        assert _rel(torch.tensor(json.loads(values)), logits) < 1e-4, (folder, line, logits)


#: Merged folders of the ``run`` fixture, each written by ``drm-lightning merge``: a model folder and an adapter.
CARDS = [("encoder", "transformers"), ("decoder_lm", "transformers"), ("adapter_iso_c", "peft")]


def _card(folder: Path) -> tuple[dict, str]:
    """The model card's YAML front matter (parsed) and its body."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), f"{folder}/README.md: no YAML front matter"
    matter, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(matter), body


@pytest.mark.parametrize(("name", "library"), CARDS, ids=[c[0] for c in CARDS])
def test_every_merged_folder_has_a_model_card_the_hub_reads(run: dict, name: str, library: str) -> None:
    """README.md as the Hugging Face Hub reads it: front matter with base_model, library_name and the merge tags; the
    body names the method, its parameters and λ, and every expert with its base fingerprint and folder."""
    folder = run["root"] / name
    record = json.loads((folder / "merge.json").read_text())
    matter, body = _card(folder)
    assert matter["base_model"] == record["base_model"]
    assert matter["library_name"] == library
    assert matter["tags"][:2] == ["merge", "drm-lightning"] and record["method"] in matter["tags"]
    assert f"`{record['method']}`" in body and f"| λ | {LAM:g} " in body
    assert f"`{record['base_fingerprint']}`" in body
    assert record["inputs"], "merge.json lists no experts"
    experts = body.split("## Experts", 1)[1].split("\n## ", 1)[0]
    for item in record["inputs"]:
        row = next((line for line in experts.splitlines() if line.startswith(f"| {item['task']} |")), None)
        assert row is not None, f"{name}: expert {item['task']} is not in the card"
        assert f"`{item['base_fingerprint']}`" in row and f"`{item['path']}`" in row
    assert f"{folder.name!r})" in body.split("## Use it", 1)[1]  # the lines load this folder, by its name


def test_the_readme_load_snippet_runs_on_a_merged_folder(run: dict) -> None:
    """README.md's "Take the merged model anywhere" lines, on a merged encoder folder of this module (its path and
    task put in for the README's): the backbone loads with plain transformers, and load_task_model gives logits."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_task_model" in b]
    assert len(blocks) == 1, "README.md: expected one Python block that loads a merged folder"
    folder = run["root"] / "encoder"
    task = sorted(p.name for p in (folder / "heads").iterdir())[0]
    code = blocks[0].replace("runs/merged/drm_v", str(folder)).replace('"rotten_tomatoes"', repr(task))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    logits = namespace["logits"]
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, len(namespace["clf"].label_names))


# -- LoRA out --------------------------------------------------------------------------------------------------


def test_the_table_holds_every_exact_method() -> None:
    assert set(EXACT) == {name for name, method in METHODS.items() if method.lora_span is not None}


@pytest.mark.parametrize("method", EXACT)
def test_lora_adapter_equals_the_dense_merge(run: dict, method: str) -> None:
    root, got = run["root"], run["got"]
    assert _rel(got[f"adapter_{method}"], got[f"dense_{method}"]) < 1e-5
    assert _rel(got[f"adapter_{method}"], got["base"]) > 1e-3  # the merge changed the model
    adapter = root / f"adapter_{method}"
    if not METHODS[method].block_by_block:  # RegMean++ merges into a dense delta first, kept by --keep_delta
        assert not (root / f"adapter_{method}_delta").exists()  # a fixed λ writes no dense delta
    config = json.loads((adapter / "adapter_config.json").read_text())
    record = json.loads((adapter / "merge.json").read_text())
    assert record["save_as"] == "adapter" and record["lam"] == LAM and record["method"] == method
    span = METHODS[method].lora_span  # the factoring went through the span the registry declares
    bases = {info["basis"] for info in record["adapter"]["modules"].values() if info["rank"]}
    assert bases <= ({"rows", "columns"} if span == "both" else {span}), bases
    assert config["rank_pattern"] == config["alpha_pattern"]
    experts = run["experts"][EXACT[method]]
    sum_r = 3 * len(experts)
    assert config["rank_pattern"] and max(config["rank_pattern"].values()) <= sum_r
    assert config["modules_to_save"]  # the norms the experts changed, as full weights
    assert set(config["target_modules"]) == set(config["rank_pattern"])
    assert sorted(p.name for p in (adapter / "heads").iterdir()) == sorted(read_meta(t).task for t in experts)
    # Per module: B·A equals λ·Δ_merged of the dense merge, and the rank is that of Δ_merged itself.
    dense = dict(iter_merged_delta(root / f"dense_{method}_delta"))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    for module, rank in config["rank_pattern"].items():
        name = module.removeprefix("model.") + ".weight"
        b = weights[f"base_model.model.{module}.lora_B.weight"].double()
        a = weights[f"base_model.model.{module}.lora_A.weight"].double()
        assert a.shape[0] == rank
        assert _rel(b @ a, LAM * dense[name]) < 1e-5
        assert rank == int(torch.linalg.matrix_rank(dense[name].double(), rtol=1e-6))


def test_an_adapter_from_a_dense_merged_folder_equals_the_streamed_one(run: dict, tmp_path: Path) -> None:
    """``--lam search`` (and torchrun) factor the dense Δ_merged folder afterwards: the same bytes in, the same
    factors out as the fixed-λ stream straight into the adapter."""
    from drm_lightning.export.adapter import adapter_from_merged

    root = run["root"]
    adapter_from_merged(root / "dense_drm_v_delta", LAM, tmp_path / "adapter")
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(root / "adapter_drm_v" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((root / "adapter_drm_v" / "adapter_config.json").read_text())


def test_evaluate_loads_an_adapter_folder_as_the_dense_merged_backbone(run: dict) -> None:
    from drm_lightning.commands.evaluate import load_model
    from drm_lightning.models.backbone import load_backbone

    root = run["root"]
    got = load_model(str(root / "adapter_tsv_m"), None, [str(t) for t in run["lora"]]).state_dict()
    ref = load_backbone(str(root / "dense_tsv_m"), "decoder").state_dict()
    assert sorted(got) == sorted(ref)
    assert max(_rel(got[k], ref[k]) for k in ref if ref[k].norm() > 0) < 1e-5


def test_pipeline_export_picks_the_best_on_validation_and_falls_back_to_a_model(run: dict, tmp_path: Path) -> None:
    """``export="all"`` with ``save_as="adapter"``: the exact method becomes an adapter, TIES a model folder; the
    best is chosen by the validation score at each method's λ, whatever the test numbers say."""
    from drm_lightning.commands.pipeline_export import best_on_validation, export_models
    from drm_lightning.evaluation.results import EvaluationResults, LambdaPoint, MethodResult
    from drm_lightning.merging.engine.merger import merge_task_vectors

    root, lora = run["root"], run["lora"]
    merge_task_vectors(lora, "ties", tmp_path / "ties_delta", progress=False)
    tasks = [read_meta(t).task for t in lora]
    results = EvaluationResults(
        tasks=tasks,
        expert={t: {"accuracy": 0.8} for t in tasks},
        methods=[
            MethodResult(
                "iso_c",
                {t: {"accuracy": 0.4} for t in tasks},
                lam=LAM,
                method="iso_c",
                curve=[LambdaPoint(LAM, 0.9), LambdaPoint(1.0, 0.95)],
            ),
            MethodResult(
                "ties", {t: {"accuracy": 0.7} for t in tasks}, lam=0.5, method="ties", curve=[LambdaPoint(0.5, 0.8)]
            ),
        ],  # fmt: skip
        split="test",
    )
    assert best_on_validation(results) == ("iso_c", 0.9)  # the score at its chosen λ, not the curve's best
    logs: list[str] = []
    usage = export_models(
        results, {"iso_c": root / "dense_iso_c_delta", "ties": tmp_path / "ties_delta"},
        {"iso_c": "iso_c", "ties": "ties"}, lora, tmp_path / "models", {}, export="all", save_as="adapter",
        log=logs.append,
    )  # fmt: skip
    assert (tmp_path / "models" / "iso_c" / "adapter_config.json").is_file()
    assert (tmp_path / "models" / "ties" / "model.safetensors").is_file()
    assert any("ties" in line and "not exact" in line for line in logs)
    assert usage["label"] == "iso_c" and usage["save_as"] == "adapter" and usage["lines"]
    assert json.loads((tmp_path / "models" / "ties" / "merge.json").read_text())["lam"] == 0.5
    for label, merged in (("iso_c", 0.4), ("ties", 0.7)):  # each card holds its method's results beside the experts'
        _, body = _card(tmp_path / "models" / label)
        assert all(f"| {t} | accuracy | {merged:.4f} | 0.8000 |" in body for t in tasks), body
    weights = load_file(str(tmp_path / "models" / "iso_c" / "adapter_model.safetensors"))
    ref = load_file(str(root / "adapter_iso_c" / "adapter_model.safetensors"))
    assert all(torch.equal(weights[k], ref[k]) for k in ref)  # the same λ, the same adapter


def test_full_rank_methods_are_refused_in_one_line(run: dict, tmp_path: Path, capsys) -> None:
    """``main`` is the console script's own function: its return value is the exit status."""
    refused = [name for name, method in METHODS.items() if method.lora_span is None]
    assert refused == ["ties", "dare", "wudi"]
    for method in refused:
        args = ["merge", "--task_vectors", _tvs(run["lora"]), "--save_as", "adapter", "--method", method]
        assert main([*args, "--output", str(tmp_path / method)]) != 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and method in lines[0] and "full rank" in lines[0] and "max_rank" in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_max_rank_truncates_and_reports_the_error_per_module(run: dict, tmp_path: Path, capsys) -> None:
    tvs = run["lora"]
    _merge("--task_vectors", _tvs(tvs), "--method", "ties", "--output", str(tmp_path / "dense"))
    _merge("--task_vectors", _tvs(tvs), "--method", "ties", "--save_as", "adapter", "--max_rank", "2", "--output",
           str(tmp_path / "adapter"))  # fmt: skip
    printed = capsys.readouterr().err
    dense = dict(iter_merged_delta(tmp_path / "dense_delta"))
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    modules = json.loads((tmp_path / "adapter" / "merge.json").read_text())["adapter"]["modules"]
    assert modules
    for module, info in modules.items():
        name = module.removeprefix("model.") + ".weight"
        b = weights[f"base_model.model.{module}.lora_B.weight"].double()
        a = weights[f"base_model.model.{module}.lora_A.weight"].double()
        assert a.shape[0] == info["rank"] == 2
        error = _rel(b @ a, dense[name])  # λ = 1
        assert abs(error - info["error"]) < 1e-6 and error > 1e-2  # TIES is full rank: the cut costs something
        # the best rank-2 approximation (Eckart–Young): the error is that of the SVD tail
        s = torch.linalg.svdvals(dense[name].double())
        assert abs(error - float((s[2:] ** 2).sum().sqrt() / s.norm())) < 1e-6
        assert f"{module}: rank 2" in printed


def test_factor_delta_has_the_exact_rank_of_every_method() -> None:
    """Against float64: the factors reproduce the merged delta and their rank is its numerical rank (≤ Σ r_i), for
    every exact method (RegMean's with random Grams)."""
    gen = torch.Generator().manual_seed(0)
    for n, m in ((24, 16), (16, 40)):
        factors = delta_cases.agreeing_factors((n, m), (2, 3), gen, torch.float32)
        lora = [LowRankDelta(b, a, 0.5) for b, a in factors]
        inputs = [torch.randn(2 * m, m, generator=gen) for _ in lora]
        grams = [x.T @ x / x.shape[0] for x in inputs]
        for name in EXACT:
            method = METHODS[name]
            kwargs = {"statistics": grams} if method.needs_statistics else {}
            merge = method.merge_matrix if method.matrix_only else method.fn
            merged = merge(lora, out_dtype=torch.float64, **kwargs)
            result = factor_delta(merged, lora)
            assert _rel(result.B @ result.A, merged) < 1e-10, name
            assert result.rank == int(torch.linalg.matrix_rank(merged, rtol=1e-9)) <= 5, name
            assert result.error < 1e-7, name
    with pytest.raises(ValueError, match="max_rank"):
        factor_delta(torch.randn(6, 6, dtype=torch.float64), [], max_rank=None)
