"""The evaluation flow (flows/eval) as an Azure AI Evaluation evaluator: Microsoft's migration map takes an
evaluation flow to evaluators and `pf run create` to `azure.ai.evaluation.evaluate(data=, target=, evaluators=)`.

    flows/eval/flow.dag.yaml                       this file
    inputs: answer, ground_truth              ->   __call__(response, ground_truth) (evaluate()'s column mapping)
    line node `score` (score.py)              ->   AnswerScores: finetune_phi.evaluation.metrics.score_line per row
    node `aggregate` (aggregation: true)      ->   finetune_phi.evaluation.metrics.aggregate over evaluate()'s rows
                                                   (maf_runner show-metrics): the numbers `pf run show-metrics` shows
"""

from __future__ import annotations

from finetune_phi.evaluation.metrics import score_line


def _text(value) -> str | None:
    """evaluate() hands a missing value on as None or NaN (a float): both are no text."""
    return value if isinstance(value, str) else None


class AnswerScores:
    """Every metric of one answer against its reference, and `failed` for a line without a reference."""

    # evaluate() passes a parameter only when the data or the target has its column: defaults keep it optional
    def __call__(self, *, response: str | None = None, ground_truth: str | None = None) -> dict:
        return score_line(_text(response), _text(ground_truth))
