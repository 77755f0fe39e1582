"""Judge node: both games of one paired line (logic in finetune_phi.evaluation.judge)."""

from typing import Union

from promptflow.connections import AzureOpenAIConnection, OpenAIConnection
from promptflow.core import tool

from finetune_phi.evaluation.judge import Judge, judge_pair


@tool
def judge(
    connection: Union[OpenAIConnection, AzureOpenAIConnection],  # noqa: UP007 - pf reads typing.Union only
    question: str,
    answer_base: str,
    answer_candidate: str,
    chat_history: list = None,
    ground_truth: str = "",
    model: str = "",
) -> dict:
    return judge_pair(
        Judge.from_connection(connection, model or None),
        question,
        chat_history or [],
        ground_truth,
        answer_base,
        answer_candidate,
    )
