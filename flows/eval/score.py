"""Line node: score one answer against its reference (logic in finetune_phi.evaluation.metrics)."""
from promptflow.core import tool

from finetune_phi.evaluation.metrics import score as score_answer


@tool
def score(answer: str, ground_truth: str) -> dict:
    # A line that cannot be scored is marked failed rather than raised: pf leaves failed lines out of
    # the aggregation node, which would then undercount them.
    if not ground_truth or not ground_truth.strip():
        return score_answer("", "") | {"failed": True}
    return score_answer(answer, ground_truth) | {"failed": False}
