"""The judge flow (flows/judge) as an Azure AI Evaluation evaluator over the paired lines (evaluate(data=..., evaluators=)).

    flows/judge/flow.dag.yaml                        this file
    inputs: question, chat_history, ground_truth,   ->    __call__(...) (evaluate()'s column mapping)
            answer_base, answer_candidate, evaluators
    node `judge` (judge.py)                    ->    finetune_phi.evaluation.judge.judge_pair
    node `quality` (quality.py)                ->    ... and finetune_phi.evaluation.quality.score_pair (output "quality")
    node `aggregate` (aggregation: true)       ->    finetune_phi.evaluation.judge.summarize, over evaluate()'s rows (compare)
    connection (open_ai / azure_open_ai)       ->    PairJudge(judge): a finetune_phi.evaluation.judge.Judge

The verdicts the Prompt flow run gives for the same rows from a deterministic judge (the same prompts, the same
client, the same cache).
"""

from __future__ import annotations

from finetune_phi.evaluation.judge import Judge, judge_pair
from finetune_phi.evaluation.quality import score_pair


class PairJudge:
    def __init__(self, judge: Judge):
        self.judge = judge

    def __call__(
        self,
        *,
        question: str = "",
        answer_base: str = "",
        answer_candidate: str = "",
        chat_history: list | None = None,
        ground_truth: str | None = None,
        evaluators: str | None = None,
    ) -> dict:
        ground_truth = (
            ground_truth if isinstance(ground_truth, str) else ""
        )  # evaluate() passes a missing value as NaN
        try:
            verdicts = judge_pair(
                self.judge, question, chat_history or [], ground_truth, answer_base, answer_candidate
            )
            quality = score_pair(
                self.judge,
                evaluators if isinstance(evaluators, str) else "",
                question,
                ground_truth,
                answer_base,
                answer_candidate,
            )
        except Exception as e:  # the line fails (counted), the batch goes on, as in a pf run
            return {"error": f"{type(e).__name__}: {e}"}
        return {**verdicts, "quality": quality}
