"""Line node: score one answer against its reference (finetune_phi.evaluation.metrics.score_line)."""

from promptflow.core import tool

from finetune_phi.evaluation.metrics import score_line


@tool
def score(answer: str, ground_truth: str) -> dict:
    return score_line(answer, ground_truth)
