"""Aggregation node: the candidate's win rate and how far to trust it, logged as run metrics."""

from promptflow.core import log_metric, tool

from finetune_phi.evaluation.judge import summarize


@tool
def aggregate(results: list, model: list) -> dict:
    summary = summarize([r for r in results if r], [r["length_delta"] for r in results if r], (model or [""])[0])
    for name, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            log_metric(key=name, value=value)
    return summary
