"""Quality node: Azure AI Evaluation's AI-assisted evaluators on both answers (logic in
finetune_phi.evaluation.quality); nothing is asked when `evaluators` is empty."""

from typing import Union

from promptflow.connections import AzureOpenAIConnection, OpenAIConnection
from promptflow.core import tool

from finetune_phi.evaluation.judge import Judge
from finetune_phi.evaluation.quality import score_pair


@tool
def quality(
    connection: Union[OpenAIConnection, AzureOpenAIConnection],  # noqa: UP007 - pf reads typing.Union only
    question: str,
    answer_base: str,
    answer_candidate: str,
    ground_truth: str = "",
    model: str = "",
    evaluators: str = "",
) -> dict:
    if not evaluators.strip():
        return {}
    return score_pair(
        Judge.from_connection(connection, model or None),
        evaluators,
        question,
        ground_truth,
        answer_base,
        answer_candidate,
    )
