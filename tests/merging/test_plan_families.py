"""The merge plan's defaults on every shipped architecture, as a table: which parameter gets which rule.

Why a table: the plan is a list of name patterns, and a new architecture names its position tables, norms and
projections its own way (DeBERTa's ``encoder.rel_embeddings`` once got the SVD rule although the plan's own policy
excludes position embeddings). Every parameter of each tiny model (``tiny_models.ARCHITECTURES``; layer indices
written ``N``) must appear below with its rule, so a new architecture, or a new kind of parameter in an old one,
fails here until someone has said which rule it gets.
"""

from __future__ import annotations

import re

import pytest

from drm_lightning.merging.engine.plan import MergePlan
from drm_lightning.models.backbone import FAMILIES, load_backbone
from tests.helpers.tiny_models import ARCHITECTURES, make_tiny_model

M, E = "matrix", "elementwise"
_BERT_LAYER = {
    "attention.self.query.weight": M, "attention.self.query.bias": E,
    "attention.self.key.weight": M, "attention.self.key.bias": E,
    "attention.self.value.weight": M, "attention.self.value.bias": E,
    "attention.output.dense.weight": M, "attention.output.dense.bias": E,
    "attention.output.LayerNorm.weight": E, "attention.output.LayerNorm.bias": E,
    "intermediate.dense.weight": M, "intermediate.dense.bias": E,
    "output.dense.weight": M, "output.dense.bias": E,
    "output.LayerNorm.weight": E, "output.LayerNorm.bias": E,
}  # fmt: skip
_DEBERTA_PROJ = re.compile(r"self\.(query|key|value)")  # DeBERTa's names for BERT's projections
_T5_ATTENTION = {f"{part}.weight": M for part in "qkvo"}
_T5_STACK = {
    "embed_tokens.weight": E,
    **{f"block.N.layer.N.SelfAttention.{k}": v for k, v in _T5_ATTENTION.items()},
    "block.N.layer.N.SelfAttention.relative_attention_bias.weight": E,  # position buckets: an embedding table
    "block.N.layer.N.layer_norm.weight": E,
    "block.N.layer.N.DenseReluDense.wi.weight": M,
    "block.N.layer.N.DenseReluDense.wo.weight": M,
    "final_layer_norm.weight": E,
}

_LLAMA = {
    "embed_tokens.weight": E,
    **{f"layers.N.self_attn.{p}_proj.weight": M for p in "qkvo"},
    **{f"layers.N.mlp.{p}_proj.weight": M for p in ("gate", "up", "down")},
    "layers.N.input_layernorm.weight": E,
    "layers.N.post_attention_layernorm.weight": E,
    "norm.weight": E,
}

EXPECTED: dict[tuple[str, str | None], dict[str, str]] = {
    ("encoder", None): {  # BERT
        "embeddings.word_embeddings.weight": E,
        "embeddings.position_embeddings.weight": E,
        "embeddings.token_type_embeddings.weight": E,
        "embeddings.LayerNorm.weight": E,
        "embeddings.LayerNorm.bias": E,
        **{f"encoder.layer.N.{k}": v for k, v in _BERT_LAYER.items()},
    },
    ("encoder", "deberta_v2"): {
        "embeddings.word_embeddings.weight": E,
        "embeddings.LayerNorm.weight": E,
        "embeddings.LayerNorm.bias": E,
        **{"encoder.layer.N." + _DEBERTA_PROJ.sub(r"self.\1_proj", k): v for k, v in _BERT_LAYER.items()},
        "encoder.rel_embeddings.weight": E,  # the relative position table: an embedding, not a linear map
        "encoder.LayerNorm.weight": E,
        "encoder.LayerNorm.bias": E,
    },
    ("decoder", None): _LLAMA,  # AutoModel: no lm_head
    ("decoder_lm", None): {**{f"model.{k}": v for k, v in _LLAMA.items()}, "lm_head.weight": E},
    ("seq2seq", None): {  # T5 (the whole model: the LM head is the task head)
        "shared.weight": E,
        **{f"encoder.{k}": v for k, v in _T5_STACK.items()},
        **{f"decoder.{k}": v for k, v in _T5_STACK.items()},
        **{f"decoder.block.N.layer.N.EncDecAttention.{k}": v for k, v in _T5_ATTENTION.items()},
        "lm_head.weight": E,
    },
    ("vision", None): {  # ViT
        "embeddings.cls_token": E,
        "embeddings.position_embeddings": E,
        "embeddings.patch_embeddings.projection.weight": E,  # a 4-D convolution
        "embeddings.patch_embeddings.projection.bias": E,
        **{f"layers.N.attention.{p}_proj.{w}": M if w == "weight" else E for p in "qkvo" for w in ("weight", "bias")},
        **{f"layers.N.{n}.{w}": E for n in ("layernorm_before", "layernorm_after") for w in ("weight", "bias")},
        **{f"layers.N.mlp.{fc}.{w}": M if w == "weight" else E for fc in ("fc1", "fc2") for w in ("weight", "bias")},
        "layernorm.weight": E,
        "layernorm.bias": E,
    },
    ("clip", None): {  # CLIPVisionModelWithProjection: the image encoder the CLIP merging papers merge
        "vision_model.embeddings.class_embedding": E,
        "vision_model.embeddings.patch_embedding.weight": E,  # a 4-D convolution
        "vision_model.embeddings.position_embedding.weight": E,
        **{f"vision_model.{n}.{w}": E for n in ("pre_layrnorm", "post_layernorm") for w in ("weight", "bias")},
        **{
            f"vision_model.encoder.layers.N.self_attn.{p}_proj.{w}": M if w == "weight" else E
            for p in ("q", "k", "v", "out")
            for w in ("weight", "bias")
        },
        **{
            f"vision_model.encoder.layers.N.{n}.{w}": E
            for n in ("layer_norm1", "layer_norm2")
            for w in ("weight", "bias")
        },
        **{
            f"vision_model.encoder.layers.N.mlp.{fc}.{w}": M if w == "weight" else E
            for fc in ("fc1", "fc2")
            for w in ("weight", "bias")
        },
        "visual_projection.weight": M,  # a linear map into the joint image-text space
    },  # fmt: skip
}

#: The plan's policy in words, checked independently of its regexes: these kinds of 2-D parameter are never
#: decomposed (embeddings and position tables, heads).
NEVER_MATRIX = re.compile(r"embed|position|relative|rel_|shared|lm_head|classifier|score|token_type|cls_token")


def _plan(family: str, architecture: str | None, tmp_path) -> dict[str, str]:
    folder = make_tiny_model(family, tmp_path / "model", architecture=architecture)
    shapes = {k: tuple(v.shape) for k, v in load_backbone(folder, family).state_dict().items()}
    table: dict[str, str] = {}
    for entry in MergePlan().entries(shapes, True):
        name = re.sub(r"\.\d+(?=\.)", ".N", entry.name)
        assert table.setdefault(name, entry.rule) == entry.rule, f"{entry.name}: layers disagree on the rule"
        assert entry.rule != M or not NEVER_MATRIX.search(entry.name), f"{entry.name}: decomposed against policy"
    return table


def test_every_family_and_architecture_has_a_table() -> None:
    assert set(EXPECTED) == set(ARCHITECTURES)
    assert {family for family, _ in ARCHITECTURES} == set(FAMILIES), "a new family needs a tiny model and a table"


@pytest.mark.parametrize(
    ("family", "architecture"), ARCHITECTURES, ids=[f"{f}-{a or 'default'}" for f, a in ARCHITECTURES]
)
def test_plan_defaults_per_architecture(family: str, architecture: str | None, tmp_path) -> None:
    table = _plan(family, architecture, tmp_path)
    expected = EXPECTED[(family, architecture)]
    unclassified = sorted(set(table) - set(expected))
    assert not unclassified, f"parameters with no rule in this table (say which rule they get): {unclassified}"
    assert sorted(set(expected) - set(table)) == []
    assert table == expected
