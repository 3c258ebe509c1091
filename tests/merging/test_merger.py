"""The streaming merger end to end on tiny models: plan, lazy reader, merge, apply, and every way inputs go wrong.

Models are built from configs and saved to disk so the real loading path runs; task vectors are written with the
project's own format. Module-scoped fixtures build each model and task vector set once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drm_lightning.export.model_folder import save_merged_model
from drm_lightning.io.merged_delta import INDEX_FILE, MERGED_DIR, delta_writer, iter_merged_delta
from drm_lightning.io.shards import ShardWriter
from drm_lightning.io.task_vector import (
    DELTAS_FILE,
    META_FILE,
    TaskVectorError,
    read_head,
    read_meta,
    write_task_vector,
)
from drm_lightning.merging.engine.apply import add_merged_delta, apply_merged_delta
from drm_lightning.merging.engine.merger import merge_task_vectors
from drm_lightning.merging.engine.plan import MergePlan, estimate_cost, summarize
from drm_lightning.merging.engine.reader import TaskVectorReader, matches_lora_targets
from drm_lightning.merging.methods.registry import METHODS, get_method
from drm_lightning.merging.ops.lowrank import LowRankDelta
from drm_lightning.models.backbone import load_backbone
from tests.helpers.merge_inputs import (
    build_tiny_model,
    dense_deltas,
    family_of,
    with_random_statistics,
    write_task_vectors,
)

T = 3
QUERY = "encoder.layer.0.attention.self.query.weight"
LAST_DENSE = "encoder.layer.1.output.dense.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merger")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    return build_tiny_model(root / "llama", "llama")


@pytest.fixture(scope="module")
def lora_as_dense_tvs(root: Path, lora_tvs: list[Path]) -> list[Path]:
    """The LoRA task vectors multiplied out: the same deltas stored densely."""
    out = []
    for folder in lora_tvs:
        meta = read_meta(folder)
        meta.kind, meta.lora = "dense", None
        out.append(
            write_task_vector(
                folder.parent.parent / "tv_lora_dense" / folder.name, dense_deltas(folder), read_head(folder), meta
            )
        )
    return out


def _base_state(folder: Path, family: str = "encoder") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_backbone(str(folder), family).state_dict().items()}


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_merged_delta(folder))


def _leftovers(output: Path) -> list[Path]:
    """Anything at ``output`` or a temporary sibling of it: an aborted merge must leave neither."""
    return [p for p in output.parent.iterdir() if p.name == output.name or p.name.startswith(f".{output.name}.")]


# --------------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    ("name", "shape", "matrix_only", "rule"),
    [
        ("encoder.layer.0.attention.self.query.weight", (32, 32), True, "matrix"),
        ("encoder.layer.0.intermediate.dense.weight", (64, 32), True, "matrix"),
        ("layers.0.mlp.down_proj.weight", (32, 64), True, "matrix"),
        ("encoder.layer.0.attention.self.query.weight", (32, 32), False, "elementwise"),
        ("encoder.layer.0.attention.self.query.bias", (32,), True, "elementwise"),
        ("encoder.layer.0.output.LayerNorm.weight", (32,), True, "elementwise"),
        ("layers.0.input_layernorm.weight", (32,), True, "elementwise"),
        ("embeddings.word_embeddings.weight", (64, 32), True, "elementwise"),
        ("embeddings.position_embeddings.weight", (64, 32), True, "elementwise"),
        ("embeddings.token_type_embeddings.weight", (2, 32), True, "elementwise"),
        ("embed_tokens.weight", (64, 32), True, "elementwise"),
        ("model.embed_tokens.weight", (64, 32), True, "elementwise"),
        ("shared.weight", (64, 32), True, "elementwise"),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 2), True, "elementwise"),
        ("lm_head.weight", (64, 32), True, "elementwise"),
        ("classifier.weight", (2, 32), True, "elementwise"),
        ("score.weight", (2, 32), True, "elementwise"),
        ("embeddings.patch_embeddings.projection.weight", (32, 3, 8, 8), True, "elementwise"),
    ],
)
def test_default_plan_rules(name: str, shape: tuple[int, ...], matrix_only: bool, rule: str) -> None:
    assert MergePlan().rule(name, shape, matrix_only) == rule


@pytest.mark.parametrize(
    ("plan", "name", "shape", "rule"),
    [
        (MergePlan(include=[r"\.attention\."]), "encoder.layer.0.attention.self.query.weight", (32, 32), "matrix"),
        (MergePlan(include=[r"\.attention\."]), "encoder.layer.0.intermediate.dense.weight", (64, 32), "elementwise"),
        (MergePlan(exclude=[r"query"]), "encoder.layer.0.attention.self.query.weight", (32, 32), "elementwise"),
        (MergePlan(exclude=[r"query"]), "embeddings.word_embeddings.weight", (64, 32), "matrix"),  # replaces defaults
        (MergePlan(exclude=[]), "lm_head.weight", (64, 32), "matrix"),
        (MergePlan(skip=[r"LayerNorm"]), "encoder.layer.0.output.LayerNorm.weight", (32,), "skip"),
        (MergePlan(skip=[r"query"]), "encoder.layer.0.attention.self.query.weight", (32, 32), "skip"),
    ],
)
def test_plan_regexes(plan: MergePlan, name: str, shape: tuple[int, ...], rule: str) -> None:
    assert plan.rule(name, shape, True) == rule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["("]}, r"MergePlan\.include: invalid regex '\('"),
        ({"exclude": ["[a-"]}, r"MergePlan\.exclude: invalid regex '\[a-'"),
        ({"skip": "LayerNorm"}, r"MergePlan\.skip='LayerNorm': expected a list"),
    ],
)
def test_plan_refuses_bad_regexes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MergePlan(**kwargs)


def test_plan_entries_order_presence_and_cost() -> None:
    shapes = {
        "a.weight": (64, 32),
        "a.bias": (64,),
        "b.weight": (32, 32),
        "embeddings.word_embeddings.weight": (64, 32),
    }
    entries = MergePlan().entries(
        shapes, True, present={"a.weight", "a.bias", "embeddings.word_embeddings.weight"}, num_tasks=4
    )
    assert [e.name for e in entries] == list(shapes)
    assert [e.rule for e in entries] == ["matrix", "elementwise", "skip", "elementwise"]
    assert entries[0].cost == 4 * 64 * 32 * 32 + 32**3
    assert entries[1].cost == 4 * 64
    assert entries[2].cost == 0.0
    assert entries[3].cost == 4 * 64 * 32
    assert summarize(entries) == {"matrix": 1, "elementwise": 2, "skip": 1}
    assert (
        estimate_cost((64, 32), "matrix", 8)
        > estimate_cost((64, 32), "matrix", 4)
        > estimate_cost((64, 32), "elementwise", 4)
    )


def test_plan_entries_accept_a_registry_method() -> None:
    shapes = {"x.weight": (8, 8)}
    for name, method in METHODS.items():
        rule = MergePlan().entries(shapes, method)[0].rule
        assert rule == ("matrix" if get_method(name).matrix_only else "elementwise"), name


# --------------------------------------------------------------------------------------------------- reader


def test_reader_reads_dense_lora_and_absent(bert: Path, dense_tvs: list[Path], lora_tvs: list[Path]) -> None:
    base = _base_state(bert)
    dense = TaskVectorReader(dense_tvs[0])
    assert dense.task == "task0" and set(dense.names()) == set(base)
    dense.validate({k: v.shape for k, v in base.items()})
    assert torch.equal(dense.get(QUERY, base[QUERY].shape), dense_deltas(dense_tvs[0])[QUERY])

    lora = TaskVectorReader(lora_tvs[0])
    lora.validate({k: v.shape for k, v in base.items()})
    delta = lora.get(QUERY, base[QUERY].shape)
    assert isinstance(delta, LowRankDelta) and delta.rank == 2 and delta.scale == 2.0
    torch.testing.assert_close(delta.dense(), dense_deltas(lora_tvs[0])[QUERY])
    # LoRA runs only train the adapted weights (and here 1-D params): embeddings have a zero delta.
    assert lora.get("embeddings.word_embeddings.weight", base["embeddings.word_embeddings.weight"].shape) is None


@pytest.mark.parametrize(
    ("module", "targets", "expected"),
    [
        ("encoder.layer.0.attention.self.query", ["query"], True),  # '.'-suffix
        ("encoder.layer.0.attention.self.query", ["self.query"], True),  # a longer suffix
        ("query", ["query"], True),  # the whole name
        ("encoder.layer.0.attention.self.query", ["value", "key"], False),
        ("encoder.layer.0.attention.self.myquery", ["query"], False),  # a suffix, but not at a '.'
        ("encoder.layer.0.attention.self.query", ["self"], False),  # an inner part is no match
        ("encoder.layer.0.attention.self.query", [], False),
        ("encoder.layer.0.attention.self.query", r".*\.(query|value)", True),  # a string: regex, full match
        ("encoder.layer.0.attention.self.query", "query", False),  # ... so a bare name does not match
        ("encoder.layer.0.attention.self.query", r"encoder\.layer\.1\..*", False),
        ("encoder.layer.1.attention.self.query", r"encoder\.layer\.1\..*", True),
    ],
)
def test_matches_lora_targets_follows_peft(module: str, targets: list[str] | str, expected: bool) -> None:
    assert matches_lora_targets(module, targets) is expected


def _all_lora_modules(meta: dict, folder: Path) -> None:
    """Set ``lora.target_modules`` to the full names of the modules ``folder``'s LoRA factors adapt."""
    keys = load_file(str(folder / DELTAS_FILE))
    meta["lora"]["target_modules"] = sorted({k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_A")})


@pytest.mark.parametrize(
    ("form", "targets"),
    [
        ("as written", None),  # write_task_vectors' last name parts: ["dense", "key", "query", "value"]
        ("full names", None),
        ("regex of last parts", r".*\.(query|key|value|dense)"),
        ("regex of a prefix", r"encoder\.layer\.\d+\..*"),
    ],
)
def test_reader_accepts_lora_targets_in_peft_forms(
    root: Path, lora_tvs: list[Path], form: str, targets: str | None
) -> None:
    folder = lora_tvs[1]
    if form == "as written":
        assert read_meta(folder).lora.target_modules == ["dense", "key", "query", "value"]
    else:
        edit = (
            (lambda m: _all_lora_modules(m, lora_tvs[1]))
            if targets is None
            else (lambda m: m["lora"].update(target_modules=targets))
        )
        folder = _rewrite(folder, root / f"targets_{form.replace(' ', '_')}" / folder.name, meta_edit=edit)
    assert TaskVectorReader(folder).is_lowrank(QUERY)


# --------------------------------------------------------------------------------------------------- full path


@pytest.mark.parametrize(
    ("arch", "coefficients", "dtype"),
    [("bert", None, torch.float32), ("llama", [0.5, -1.0, 2.0], torch.bfloat16)],
)
def test_task_arithmetic_full_path(
    root: Path, bert: Path, llama: Path, arch: str, coefficients: list[float] | None, dtype: torch.dtype
) -> None:
    """W_0 + λ·Σ c_i Δ_i, parameter by parameter, through the real files; bf16 deltas are merged in float32."""
    base_folder = {"bert": bert, "llama": llama}[arch]
    family = family_of(arch)
    tvs = write_task_vectors(
        base_folder, root / f"ta_{arch}", T, family=family, seed=3, drop=r"layer(s)?\.1\.", dtype=dtype
    )
    out = root / f"ta_{arch}_out"
    result = merge_task_vectors(tvs, "task_arithmetic", out, coefficients=coefficients, progress=False)

    base = _base_state(base_folder, family)
    deltas = [dense_deltas(tv) for tv in tvs]
    coeffs = coefficients or [1.0] * T
    lam = 0.7
    model = apply_merged_delta(out, lam)
    merged = _merged(out)
    for name, w0 in base.items():
        if name not in deltas[0]:  # dropped by every task: no merged delta, W_0 unchanged
            assert name not in merged
            assert torch.equal(model.state_dict()[name], w0), name
            continue
        expected_delta = sum(c * d[name].double() for c, d in zip(coeffs, deltas, strict=True))
        torch.testing.assert_close(merged[name].double(), expected_delta, rtol=0, atol=1e-7)
        torch.testing.assert_close(
            model.state_dict()[name], (w0.double() + lam * expected_delta).float(), rtol=0, atol=1e-6
        )
    assert any(n not in merged for n in base), "the drop regex should leave some parameters without a delta"

    assert result.method == "task_arithmetic" and result.output == out
    assert result.rule_counts["matrix"] == 0 and result.rule_counts["skip"] == len(base) - len(merged)
    assert result.merged_parameters == len(merged)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "task_arithmetic" and record["coefficients"] == coefficients
    assert record["lam"] is None and record["family"] == family
    assert record["base_fingerprint"] == read_meta(tvs[0]).base_fingerprint
    assert [i["task"] for i in record["inputs"]] == ["task0", "task1", "task2"]
    assert all(i["base_fingerprint"] == record["base_fingerprint"] for i in record["inputs"])
    assert {"load", "read", "matrix", "elementwise", "write", "total"} <= set(record["timings"])
    for tv in tvs:
        task = read_meta(tv).task
        assert (out / "heads" / task / "head.safetensors").read_bytes() == (tv / "head.safetensors").read_bytes()
        assert read_meta(out / "heads" / task).task == task


def test_mixed_absent_deltas_count_as_zero(
    root: Path, bert: Path, dense_tvs: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One task that never touched the query weights: its zero delta keeps the coefficients aligned."""
    partial = write_task_vectors(bert, root / "partial", 1, seed=50, drop=r"query", tasks=["partial"])[0]
    out = root / "partial_out"
    merge_task_vectors([dense_tvs[0], partial], "task_arithmetic", out, coefficients=[1.0, 3.0], progress=True)
    assert "merge Task Arithmetic" in capsys.readouterr().err  # the progress bar of parameters merged
    merged = _merged(out)
    torch.testing.assert_close(merged[QUERY], dense_deltas(dense_tvs[0])[QUERY])
    key = "encoder.layer.0.attention.self.key.weight"
    torch.testing.assert_close(merged[key], dense_deltas(dense_tvs[0])[key] + 3 * dense_deltas(partial)[key])


@pytest.mark.parametrize("method", ["task_arithmetic", "drm_v"])
def test_lora_merge_equals_dense_equivalent(
    root: Path, lora_tvs: list[Path], lora_as_dense_tvs: list[Path], method: str
) -> None:
    a = merge_task_vectors(lora_tvs, method, root / f"lora_{method}", progress=False).output
    b = merge_task_vectors(lora_as_dense_tvs, method, root / f"lora_dense_{method}", progress=False).output
    merged_a, merged_b = _merged(a), _merged(b)
    assert merged_a.keys() == merged_b.keys()
    for name in merged_a:
        scale = merged_b[name].abs().max().item() or 1.0
        torch.testing.assert_close(merged_a[name] / scale, merged_b[name] / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_tiny_model_deterministically(root: Path, dense_tvs: list[Path], method: str) -> None:
    """The contract over the registry: a real merge per method, plan rules as promised, byte-identical reruns."""
    m = get_method(method)
    if m.block_by_block:  # its Grams need the tasks' data while merging: refused here (test_block_merge.py)
        with pytest.raises(ValueError, match=rf"method='{method}': each layer's Grams"):
            merge_task_vectors(dense_tvs, method, root / f"every_{method}", progress=False)
        assert not (root / f"every_{method}").exists()
        return
    tvs = with_random_statistics(dense_tvs, root / "with_statistics") if m.needs_statistics else dense_tvs
    outs = [root / f"every_{method}_{i}" for i in range(2)]
    results = [merge_task_vectors(tvs, method, o, progress=False, max_shard_bytes=20_000) for o in outs]
    counts = results[0].rule_counts
    assert (counts["matrix"] > 0) == m.matrix_only
    shards = sorted(p.name for p in (outs[0] / MERGED_DIR).iterdir())
    assert len(shards) > 2, "small max_shard_bytes should give several shards"
    assert shards == sorted(p.name for p in (outs[1] / MERGED_DIR).iterdir())
    for shard in shards:
        assert (outs[0] / MERGED_DIR / shard).read_bytes() == (outs[1] / MERGED_DIR / shard).read_bytes(), shard
    base = _base_state(Path(read_meta(dense_tvs[0]).base_model))
    merged = _merged(outs[0])
    assert set(merged) == set(base)
    for name, delta in merged.items():
        assert delta.dtype == torch.float32 and delta.shape == base[name].shape and torch.isfinite(delta).all()
    record = json.loads((outs[0] / "merge.json").read_text())
    assert record["label"] == m.label and record["params"] == json.loads(json.dumps(results[0].params))


def test_sharding_does_not_change_the_result(root: Path, dense_tvs: list[Path]) -> None:
    one = merge_task_vectors(dense_tvs, "ties", root / "shard_one", progress=False).output
    many = merge_task_vectors(dense_tvs, "ties", root / "shard_many", progress=False, max_shard_bytes=4096).output
    index = json.loads((many / MERGED_DIR / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 10
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _merged(many).values())
    single, sharded = _merged(one), _merged(many)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_apply_writes_a_loadable_hf_folder(root: Path, bert: Path, dense_tvs: list[Path]) -> None:
    from transformers import AutoModel, AutoTokenizer

    merged = merge_task_vectors(dense_tvs, "task_arithmetic", root / "apply_merged", progress=False).output
    out = root / "apply_out"
    model = save_merged_model(merged, 0.3, out, max_shard_size="50KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1, "max_shard_size should shard the weights"
    reloaded = AutoModel.from_pretrained(out)  # the base's own architecture: BertModel with its pooler
    expected = model.state_dict()
    assert "pooler.dense.weight" in expected
    assert reloaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(reloaded.state_dict()[k], expected[k]) for k in expected)
    base = _base_state(bert)
    assert not torch.equal(expected[QUERY], base[QUERY])
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("movie") == AutoTokenizer.from_pretrained(
        bert
    ).convert_tokens_to_ids("movie")
    record = json.loads((out / "merge.json").read_text())
    assert record["lam"] == 0.3 and record["method"] == "task_arithmetic"
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["task0", "task1", "task2"]
    # λ = 0 gives the base model back, bit for bit.
    zero = apply_merged_delta(merged, 0.0)
    assert all(torch.equal(zero.state_dict()[k], base[k]) for k in base)


def test_add_merged_delta_updates_tied_weights_once_and_rounds_low_precision_once(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight
            self.norm = torch.nn.LayerNorm(4).to(torch.bfloat16)

    model = Tied()
    w0, n0 = model.a.weight.detach().clone(), model.norm.weight.detach().clone()
    delta, norm_delta = torch.randn(4, 4), torch.full((4,), 1e-3)
    writer = delta_writer(tmp_path)
    for name, tensor in {"a.weight": delta, "b.weight": delta.clone(), "norm.weight": norm_delta}.items():
        writer.add(name, tensor)
    writer.close()
    add_merged_delta(model, tmp_path, 0.5)
    torch.testing.assert_close(model.a.weight.detach(), w0 + 0.5 * delta)
    assert torch.equal(model.norm.weight.detach(), (n0.float() + 0.5 * norm_delta).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------------- refusals


def _rewrite(src: Path, dst: Path, deltas=None, meta_edit=None) -> Path:  # noqa: ANN001
    """A copy of task vector ``src`` at ``dst`` with ``deltas(dict) -> dict`` / ``meta_edit(dict)`` applied."""
    shutil.copytree(src, dst)
    if deltas is not None:
        save_file(deltas(load_file(str(src / DELTAS_FILE))), str(dst / DELTAS_FILE))
    if meta_edit is not None:
        meta = json.loads((src / META_FILE).read_text())
        meta_edit(meta)
        (dst / META_FILE).write_text(json.dumps(meta))
    return dst


def _set(d: dict, key: str, value: torch.Tensor) -> dict:
    return {**d, key: value}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _nan_at(d: dict, key: str, value: float = math.nan) -> dict:
    t = d[key].clone()
    t.view(-1)[3] = value
    return {**d, key: t}


def _truncate(folder: Path) -> None:
    data = (folder / DELTAS_FILE).read_bytes()
    (folder / DELTAS_FILE).write_bytes(data[: len(data) // 2])


LQ = QUERY + ".lora_A"
BAD_ROWS = {
    # name: (which task vectors, rewrite kwargs, post-edit, expected key in the message)
    "unknown key": (
        "dense",
        {"deltas": lambda d: _set(d, "encoder.layer.0.attention.self.qurey.weight", torch.zeros(32, 32))},
        None,
        "qurey",
    ),
    "wrong dense shape": ("dense", {"deltas": lambda d: _set(d, QUERY, torch.zeros(32, 31))}, None, QUERY),
    "NaN in a late parameter": ("dense", {"deltas": lambda d: _nan_at(d, LAST_DENSE)}, None, LAST_DENSE),
    "Inf": ("dense", {"deltas": lambda d: _nan_at(d, QUERY, math.inf)}, None, QUERY),
    "integer delta": (
        "dense",
        {"deltas": lambda d: _set(d, QUERY, torch.zeros(32, 32, dtype=torch.int64))},
        None,
        QUERY,
    ),
    "LoRA factor in a dense task vector": ("dense", {"deltas": lambda d: _set(d, LQ, torch.zeros(2, 32))}, None, LQ),
    "LoRA rank differs from meta": ("lora", {"meta_edit": lambda m: m["lora"].update(r=3)}, None, "lora.r=3"),
    "LoRA A wrong in_features": ("lora", {"deltas": lambda d: _set(d, LQ, torch.zeros(2, 16))}, None, LQ),
    "LoRA B wrong out_features": (
        "lora",
        {"deltas": lambda d: _set(d, QUERY + ".lora_B", torch.zeros(16, 2))},
        None,
        QUERY + ".lora_B",
    ),
    "unpaired LoRA factor": ("lora", {"deltas": lambda d: _without(d, QUERY + ".lora_B")}, None, LQ),
    "LoRA factors outside meta target_modules": (
        "lora",
        {"meta_edit": lambda m: m["lora"].update(target_modules=["query"])},
        None,
        "'encoder.layer.0.attention.output.dense.weight.lora_A' adapts module "
        "'encoder.layer.0.attention.output.dense', which meta.json's lora.target_modules=['query'] does not select",
    ),
    "LoRA factors outside a meta target regex": (
        "lora",
        {"meta_edit": lambda m: m["lora"].update(target_modules=r".*\.(query|key|value)")},
        None,
        "outside it (modules named ['dense'])",
    ),
    "LoRA target regex not matching whole names": (
        "lora",
        {"meta_edit": lambda m: m["lora"].update(target_modules="query|key|value|dense")},
        None,
        "lora.target_modules='query|key|value|dense'",
    ),
    "LoRA target_modules not a regex": (
        "lora",
        {"meta_edit": lambda m: m["lora"].update(target_modules="(query")},
        None,
        "lora.target_modules='(query' is not a valid regular expression",
    ),
    "LoRA target_modules neither list nor string": (
        "lora",
        {"meta_edit": lambda m: m["lora"].update(target_modules=3)},
        None,
        "lora.target_modules=3: expected a list",
    ),
    "truncated safetensors": ("dense", {}, _truncate, DELTAS_FILE),
    "missing meta.json": ("dense", {}, lambda f: (f / META_FILE).unlink(), META_FILE),
    "bad meta kind": ("dense", {"meta_edit": lambda m: m.update(kind="full")}, None, "kind='full'"),
    "missing head": ("dense", {}, lambda f: (f / "head.safetensors").unlink(), "head.safetensors"),
}


@pytest.mark.parametrize("row", sorted(BAD_ROWS))
def test_bad_task_vector_is_refused_and_nothing_is_written(
    root: Path, dense_tvs: list[Path], lora_tvs: list[Path], row: str
) -> None:
    kind, rewrite, post, key = BAD_ROWS[row]
    good = {"dense": dense_tvs, "lora": lora_tvs}[kind]
    slug = row.replace(" ", "_")
    bad = _rewrite(good[1], root / f"bad_{slug}" / good[1].name, **rewrite)
    if post is not None:
        post(bad)
    out = root / f"bad_{slug}_out"
    with pytest.raises(TaskVectorError) as info:
        merge_task_vectors([good[0], bad, good[2]], "task_arithmetic", out, progress=False, max_shard_bytes=1024)
    message = str(info.value)
    assert str(bad) in message and key in message, message
    assert _leftovers(out) == []


def test_fingerprint_mismatch_names_both_and_writes_nothing(root: Path, dense_tvs: list[Path]) -> None:
    other = build_tiny_model(root / "bert_other", "bert", seed=1)
    out = root / "fp_out"
    with pytest.raises(ValueError) as info:
        merge_task_vectors(dense_tvs, "task_arithmetic", out, base=str(other), progress=False)
    expected = read_meta(dense_tvs[0]).base_fingerprint
    message = str(info.value)
    assert "\n" not in message and expected in message and str(other) in message
    actual = message.split("has fingerprint ")[1].split(",")[0]
    assert actual.startswith("sampled1:") and len(actual) == len("sampled1:") + 64 and actual != expected
    assert _leftovers(out) == []

    # Task vectors of two different bases disagree among themselves: both folders are named.
    foreign = write_task_vectors(other, root / "foreign", 1, tasks=["foreign"])[0]
    with pytest.raises(ValueError, match="disagree on their base model") as info:
        merge_task_vectors([dense_tvs[0], foreign], "task_arithmetic", out, progress=False)
    assert str(dense_tvs[0]) in str(info.value) and str(foreign) in str(info.value)

    merged = merge_task_vectors(dense_tvs, "task_arithmetic", root / "fp_merged", progress=False).output
    with pytest.raises(ValueError, match="refusing to apply") as info:
        apply_merged_delta(merged, 1.0, base=str(other))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "no_such_method"}, "no_such_method"),
        ({"method": "ties", "params": {"density": 1.5}}, "density"),
        ({"method": "ties", "params": {"no_such_param": 1}}, "no_such_param"),
        ({"coefficients": [1.0, 2.0]}, r"coefficients=\[1.0, 2.0\]: expected 3 values"),
        ({"coefficients": [1.0, math.nan, 1.0]}, "not a finite number"),
        ({"device": "cuda:7" if not torch.cuda.is_available() else "bogus"}, "device="),
        ({"task_vectors": []}, r"task_vectors=\[\]"),
        ({"max_shard_bytes": 0}, "max_shard_bytes=0"),
    ],
)
def test_bad_arguments_fail_before_any_work(root: Path, dense_tvs: list[Path], kwargs: dict, match: str) -> None:
    args = {"task_vectors": dense_tvs, "method": "task_arithmetic", "output": root / "badarg_out", **kwargs}
    with pytest.raises(ValueError, match=match):
        merge_task_vectors(**args, progress=False)
    assert _leftovers(root / "badarg_out") == []


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(family="decoder"), r"disagree on family \['decoder', 'encoder'\]"),
        (lambda m: m.update(task="../escape"), r"task='\.\./escape' is not a usable folder name"),
    ],
)
def test_inconsistent_metas_are_refused(tmp_path: Path, dense_tvs: list[Path], edit, match: str) -> None:  # noqa: ANN001
    bad = _rewrite(dense_tvs[1], tmp_path / "task1", meta_edit=edit)
    with pytest.raises(ValueError, match=match):
        merge_task_vectors([dense_tvs[0], bad], "task_arithmetic", tmp_path / "out", progress=False)
    assert _leftovers(tmp_path / "out") == []


def test_outputs_that_would_clobber_something_are_refused(root: Path, dense_tvs: list[Path]) -> None:
    with pytest.raises(ValueError, match="overlaps the input"):
        merge_task_vectors(dense_tvs, "task_arithmetic", dense_tvs[0].parent, progress=False)
    precious = root / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no merge.json"):
        merge_task_vectors(dense_tvs, "task_arithmetic", precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    dup = _rewrite(dense_tvs[0], root / "dup" / "copy")
    with pytest.raises(ValueError, match="both for task 'task0'"):
        merge_task_vectors([dense_tvs[0], dup], "task_arithmetic", root / "dup_out", progress=False)
    # A previous merge output is replaced in one rename.
    out = root / "rerun"
    merge_task_vectors(dense_tvs[:2], "task_arithmetic", out, progress=False)
    merge_task_vectors(dense_tvs, "task_arithmetic", out, progress=False)
    assert len(json.loads((out / "merge.json").read_text())["inputs"]) == 3
    with pytest.raises(ValueError, match="lam=nan"):
        apply_merged_delta(out, math.nan)


def _break_index(folder: Path) -> None:
    index = folder / MERGED_DIR / INDEX_FILE
    data = json.loads(index.read_text())
    data["weight_map"][QUERY] = "delta-99999.safetensors"
    index.write_text(json.dumps(data))


DAMAGES = {
    "no merge.json": (lambda f: (f / "merge.json").unlink(), r"merge\.json: not found"),
    "bad merge.json": (lambda f: (f / "merge.json").write_text("{"), r"merge\.json: invalid JSON"),
    "no index": (lambda f: (f / MERGED_DIR / INDEX_FILE).unlink(), r"delta\.safetensors\.index\.json: not found"),
    "missing shard": (_break_index, r"delta-99999\.safetensors: not found"),
}


@pytest.mark.parametrize("row", sorted(DAMAGES))
def test_damaged_merged_folder_is_refused(root: Path, dense_tvs: list[Path], row: str) -> None:
    damage, match = DAMAGES[row]
    folder = root / f"damaged_{row.replace(' ', '_')}"
    merge_task_vectors(dense_tvs, "task_arithmetic", folder, progress=False)
    damage(folder)
    with pytest.raises(ValueError, match=match):
        apply_merged_delta(folder, 1.0)


def test_shard_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_shard_bytes=0"):
        ShardWriter(tmp_path / "w", max_shard_bytes=0)
    writer = ShardWriter(tmp_path / "w")
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 'a' added twice"):
        writer.add("a", torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["task_arithmetic", "drm_v"])
def test_cuda_merge_matches_cpu(root: Path, dense_tvs: list[Path], method: str) -> None:
    cpu = merge_task_vectors(dense_tvs, method, root / f"cpu_{method}", device="cpu", progress=False)
    gpu = merge_task_vectors(dense_tvs, method, root / f"gpu_{method}", progress=False)
    assert gpu.device.startswith("cuda")
    a, b = _merged(cpu.output), _merged(gpu.output)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
