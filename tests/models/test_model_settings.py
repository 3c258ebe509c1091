"""``models.settings.datamodule_settings``: what an expert takes from its datamodule at setup, and what it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from drm_lightning.models.settings import DatamoduleSettings, datamodule_settings


def test_takes_metrics_templates_and_label_names_as_lists() -> None:
    dm = SimpleNamespace(metrics=("f1",), templates=("a {}.",), label_names=("neg", "pos"))
    taken = datamodule_settings(dm, task="t", family="clip", task_type="classification")
    assert taken == DatamoduleSettings(["f1"], ["a {}."], ["neg", "pos"])


def test_no_datamodule_or_silent_one_gives_nothing() -> None:
    nothing = DatamoduleSettings(None, None, None)
    assert datamodule_settings(None, task="t", family="encoder", task_type="multiple_choice") == nothing
    assert datamodule_settings(SimpleNamespace(), task="t", family="encoder", task_type="classification") == nothing


@pytest.mark.parametrize(
    ("dm", "family", "task_type", "match"),
    [
        (SimpleNamespace(task_type="multiple_choice"), "encoder", "classification", "'classification' differs"),
        (SimpleNamespace(), "encoder", "multiple_choice", "differs from the datamodule's 'classification'"),
        (SimpleNamespace(task_type="multiple_choice", choice_format="pairs"), "seq2seq", "multiple_choice",
         "choice_format='pairs' is not what a seq2seq model reads; set choice_format: targets"),
    ],
)  # fmt: skip
def test_refuses_a_datamodule_of_another_kind(dm: SimpleNamespace, family: str, task_type: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        datamodule_settings(dm, task="t", family=family, task_type=task_type)
