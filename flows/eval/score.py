"""Line node: score one answer against its reference (logic in finetune_phi.metrics)."""
from promptflow.core import tool

from finetune_phi.metrics import score as score_answer


@tool
def score(answer: str, ground_truth: str) -> dict:
    # pf passes no answer when the chat line it comes from failed; count it, score it 0
    return score_answer(answer, ground_truth) | {"failed": answer is None or answer == ""}
