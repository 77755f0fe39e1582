"""Aggregation node: means of every metric and counts of scored / failed lines, logged as run metrics."""

from promptflow.core import log_metric, tool

from finetune_phi.evaluation.metrics import aggregate as aggregate_scores


@tool
def aggregate(scores: list) -> dict:
    summary = aggregate_scores(scores)
    for name, value in summary.items():
        log_metric(key=name, value=value)
    return summary
