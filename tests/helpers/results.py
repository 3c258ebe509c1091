"""Synthetic evaluation results with exact decimal numbers: what the report tests render, no model trained."""

from __future__ import annotations

from drm_lightning.evaluation.results import EvaluationResults, LambdaPoint, MethodResult


def acc(value: float) -> dict[str, float]:
    return {"accuracy": value, "f1": value / 2}


def make_results() -> EvaluationResults:
    """Two tasks, two merged models; numbers chosen so every derived value is exact in decimal."""
    return EvaluationResults(
        tasks=["sst2", "cola"],
        expert={"sst2": acc(0.80), "cola": acc(0.50)},
        pretrained={"sst2": acc(0.40), "cola": acc(0.25)},
        methods=[
            MethodResult(
                label="ta",
                method="task_arithmetic",
                metrics={"sst2": acc(0.60), "cola": acc(0.45)},
                lam=0.3,
                merge_seconds=1.234,
                curve=[
                    LambdaPoint(0.5, 0.70, {"sst2": acc(0.56), "cola": acc(0.35)}),
                    LambdaPoint(0.3, 0.825, {"sst2": acc(0.60), "cola": acc(0.45)}),
                    LambdaPoint(0.1, 0.60, {"sst2": acc(0.48), "cola": acc(0.30)}),
                ],
            ),
            MethodResult(
                label="drm_v",
                method="drm",
                params={"direction": "vertical", "drop_rate": 0.8},
                metrics={"sst2": acc(0.72), "cola": acc(0.40)},
                lam=1.2,
                merge_seconds=10.0,
            ),
        ],
    )
