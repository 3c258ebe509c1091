"""Backbone loading per family, weight fingerprints, heads and LoRA settings (no training here: fast)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from drm_lightning.models.backbone import FAMILIES, load_backbone
from drm_lightning.models.heads import DecoderHead, EncoderHead, VisionHead, build_head, last_token_index
from drm_lightning.models.lora import LoraSettings, add_lora, backbone_name, split_lora_state
from drm_lightning.task_vectors.fingerprint import fingerprint, fingerprint_state

# peft 0.21 calls a transformers 5 method that is deprecated; nothing we can change.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

EXPECTED_CLASS = {
    "encoder": "BertModel",
    "decoder": "LlamaModel",
    "decoder_lm": "LlamaForCausalLM",
    "seq2seq": "T5ForConditionalGeneration",
    "vision": "ViTModel",
    "clip": "CLIPVisionModelWithProjection",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_backbone_per_family(tiny, family):
    model = load_backbone(tiny[family], family)
    assert type(model).__name__ == EXPECTED_CLASS[family]
    assert not model.training  # from_pretrained leaves eval mode; the expert switches it on for training
    # Heads pool last_hidden_state themselves: no pooler whose weights would never get a gradient.
    assert not [k for k in model.state_dict() if "pooler" in k]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_backbone_dtype(tiny, dtype):
    model = load_backbone(tiny["encoder"], "encoder", torch_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize(
    ("name", "family", "match"),
    [
        ("x", "audio", "family='audio'"),
        ("package://no_such_package_xyz/model", "encoder", "no_such_package_xyz"),
        ("package://drm_lightning/no_such_folder", "encoder", "no_such_folder"),
    ],
)
def test_load_backbone_bad_input(name, family, match):
    with pytest.raises(ValueError, match=match):
        load_backbone(name, family)


def test_fingerprint_stable_across_loads(tiny):
    assert fingerprint(load_backbone(tiny["encoder"])) == fingerprint(load_backbone(tiny["encoder"]))


def _nudge_one_entry(state):
    name = sorted(state)[3]
    state[name].view(-1)[0] = torch.nextafter(state[name].view(-1)[0], torch.tensor(1e9))


def _rename_one(state):
    name = sorted(state)[0]
    state[name + "_renamed"] = state.pop(name)


def _cast_one(state):
    name = sorted(state)[0]
    state[name] = state[name].double()


def _reshape_one(state):
    name = next(k for k in sorted(state) if state[k].ndim == 2)
    state[name] = state[name].reshape(-1)


@pytest.mark.parametrize("change", [_nudge_one_entry, _rename_one, _cast_one, _reshape_one])
def test_fingerprint_changes_with_any_weight_detail(tiny, change):
    model = load_backbone(tiny["encoder"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = fingerprint_state(state)
    assert before == fingerprint(model)
    change(state)
    assert fingerprint_state(state) != before


def test_fingerprint_of_bfloat16_and_noncontiguous():
    a = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert fingerprint_state({"w": a.t()}) == fingerprint_state({"w": a.t().contiguous()})
    assert fingerprint_state({"w": a}) != fingerprint_state({"w": a.float()})


# ---- heads ------------------------------------------------------------------------------------------------------


def test_encoder_head_cls_and_mean_pooling():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cls_head = EncoderHead(8, 3, pooling="cls", dropout=0.0).eval()
    mean_head = EncoderHead(8, 3, pooling="mean", dropout=0.0).eval()
    mean_head.load_state_dict(cls_head.state_dict())
    expected_cls = cls_head.out_proj(torch.tanh(cls_head.dense(hidden[:, 0])))
    torch.testing.assert_close(cls_head(hidden, mask), expected_cls)
    pooled = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(mean_head(hidden, mask), cls_head.out_proj(torch.tanh(cls_head.dense(pooled))))
    changed = hidden.clone()
    changed[0, 3:] = 100.0  # padding must not leak into the mean
    torch.testing.assert_close(mean_head(changed, mask), mean_head(hidden, mask))


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], [2, 3, 0]),  # right padding
        ([[0, 1, 1, 1], [0, 0, 1, 1]], [3, 3]),  # left padding
    ],
)
def test_last_token_index(mask, expected):
    assert last_token_index(torch.tensor(mask)).tolist() == expected


def test_decoder_head_reads_last_non_pad_token():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 8)
    head = DecoderHead(8, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = head.score(torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(head(hidden, mask), expected)


def test_vision_head_reads_cls_token_and_keeps_float32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    head = VisionHead(8, 4)
    out = head(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head.classifier(hidden[:, 0].float()))


@pytest.mark.parametrize(
    "head",
    [EncoderHead(8, 3, pooling="mean", dropout=0.2), DecoderHead(8, 2), VisionHead(8, 5)],
    ids=["encoder", "decoder", "vision"],
)
def test_build_head_round_trip(head):
    rebuilt = build_head(head.config())
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.config() == head.config()
    hidden, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long)
    torch.testing.assert_close(rebuilt.eval()(hidden, mask), head.eval()(hidden, mask))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"type": "mlp", "hidden_size": 8, "num_labels": 2}, "type='mlp'"),
        ({"hidden_size": 8, "num_labels": 2}, "type=None"),
        ({"type": "encoder", "hidden_size": 0, "num_labels": 2}, "hidden_size=0"),
        ({"type": "decoder", "hidden_size": 8, "num_labels": 1}, "num_labels=1"),
        ({"type": "encoder", "hidden_size": 8, "num_labels": 2, "pooling": "max"}, "pooling='max'"),
        ({"type": "encoder", "hidden_size": 8, "num_labels": 2, "dropout": 1.0}, "dropout=1.0"),
        ({"type": "vision", "hidden_size": 8, "num_labels": 2, "pooling": "cls"}, "pooling"),
    ],
)
def test_build_head_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        build_head(config)


# ---- LoRA -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "lora.r=0"),
        ({"r": 2.5}, "lora.r=2.5"),
        ({"r": True}, "lora.r=True"),
        ({"alpha": 0}, "lora.alpha=0"),
        ({"alpha": float("nan")}, "lora.alpha=nan"),
        ({"dropout": 1.0}, "lora.dropout=1.0"),
        ({"dropout": -0.1}, "lora.dropout=-0.1"),
        ({"target_modules": []}, r"lora.target_modules=\[\]"),
        ({"target_modules": "query"}, "lora.target_modules='query'"),
        ({"target_modules": ["query", ""]}, "lora.target_modules="),
    ],
)
def test_lora_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "scale"), [(8, 16, False, 2.0), (4, 8, True, 4.0), (16, 8, False, 0.5)]
)
def test_lora_scale(r, alpha, rslora, scale):
    assert LoraSettings(r=r, alpha=alpha, use_rslora=rslora).scale == scale


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_default_targets_exist_and_match_peft_scaling(tiny, family):
    settings = LoraSettings(r=4, alpha=8, use_rslora=True)
    model = add_lora(load_backbone(tiny[family], family), settings, family)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scalings == {settings.scale}


def test_lora_unknown_target_names_the_setting(tiny):
    with pytest.raises(ValueError, match=r"lora.target_modules=\['nope'\]"):
        add_lora(load_backbone(tiny["encoder"]), LoraSettings(target_modules=["nope"]), "encoder")


def test_lora_names_map_back_to_the_backbone(tiny):
    base = load_backbone(tiny["encoder"])
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    base_names = set(shapes)
    model = add_lora(base, LoraSettings(r=2), "encoder")
    factors, rest = split_lora_state(model.state_dict())
    assert set(rest) == base_names
    weights = {k.rsplit(".lora_", 1)[0] for k in factors}
    assert weights and weights <= base_names
    for name in weights:
        out_features, in_features = shapes[name]
        assert factors[name + ".lora_A"].shape == (2, in_features)
        assert factors[name + ".lora_B"].shape == (out_features, 2)
    assert backbone_name("base_model.model.a.b.base_layer.weight") == "a.b.weight"
    assert backbone_name("head.out_proj.weight") == "head.out_proj.weight"


def test_split_lora_state_rejects_other_adapter_kinds():
    with pytest.raises(ValueError, match="lora_embedding_A"):
        split_lora_state({"base_model.model.emb.lora_embedding_A.default": torch.zeros(2, 3)})
