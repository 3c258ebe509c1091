"""What converting experts left out is said once for all of them, and the missing heads only where they matter
(a run that evaluates): ``interop.write.import_notes``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from drm_lightning.interop.write import import_notes

POOLER = ["pooler.dense.bias", "pooler.dense.weight"]


def _import(task: str, dropped: list[str], head: bool, family: str = "encoder"):
    plan = SimpleNamespace(source={"dropped": dropped}, head=SimpleNamespace(config={"x": 1} if head else {},
                                                                              reason="no classifier"))  # fmt: skip
    return task, plan, SimpleNamespace(family=family)


@pytest.mark.parametrize(
    ("imports", "evaluates", "expected"),
    [
        # plain BertModel fine-tunes, merged without evaluation: one line each, no word of evaluation
        ([_import(f"t{i}", POOLER, False) for i in range(3)], False,
         ["left out 2 tensor(s) outside the backbone and head of 3 tasks (t0, t1, t2): pooler.dense.bias, "
          "pooler.dense.weight",
          "tasks 't0', 't1', 't2' have no head (no classifier): merged into the backbone, with no classifier"]),
        # the same with an evaluation: the heads' absence matters, said once
        ([_import("a", POOLER, False), _import("b", POOLER, False)], True,
         ["left out 2 tensor(s) outside the backbone and head of 2 tasks (a, b): pooler.dense.bias, "
          "pooler.dense.weight", "tasks 'a', 'b' have no head (no classifier): they merge, but are not evaluated"]),
        # classifiers with heads: nothing to say
        ([_import("a", [], True), _import("b", [], True)], True, []),
        # different left-out sets: one line each
        ([_import("a", ["lm_head.weight"], True), _import("b", POOLER, True)], True,
         ["left out 1 tensor(s) outside the backbone and head of task 'a': lm_head.weight",
          "left out 2 tensor(s) outside the backbone and head of task 'b': pooler.dense.bias, pooler.dense.weight"]),
    ],
)  # fmt: skip
def test_import_notes(imports, evaluates: bool, expected: list[str]) -> None:
    assert import_notes(imports, evaluates) == expected
