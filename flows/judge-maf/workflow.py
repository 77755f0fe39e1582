"""The judge flow (flows/judge) as a Microsoft Agent Framework workflow over a batch of paired lines.

    flows/judge/flow.dag.yaml                        this file
    inputs: question, chat_history, ground_truth,   ->    JudgeRow (one per paired line of the batch)
            answer_base, answer_candidate, model,
            evaluators
    node `judge` (judge.py)                    ->    JudgeExecutor: finetune_phi.evaluation.judge.judge_pair per row
    node `quality` (quality.py)                ->    ... and finetune_phi.evaluation.quality.score_pair (output "quality")
    node `aggregate` (aggregation: true)       ->    AggregateExecutor: finetune_phi.evaluation.judge.summarize
    connection (open_ai / azure_open_ai)       ->    create_workflow(judge): a finetune_phi.evaluation.judge.Judge

Output: {"lines": [judge_pair per row], "metrics": summarize(...)} — the verdicts the Prompt flow run gives
for the same rows from a deterministic judge (the same prompts, the same client, the same cache).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent_framework import Executor, WorkflowBuilder, WorkflowContext, handler
from typing_extensions import Never

from finetune_phi.evaluation.judge import Judge, judge_pair, summarize
from finetune_phi.evaluation.quality import score_pair


@dataclass
class JudgeRow:
    question: str
    answer_base: str
    answer_candidate: str
    chat_history: list = field(default_factory=list)
    ground_truth: str = ""
    evaluators: str = ""  # Azure AI Evaluation evaluators for both answers, e.g. "coherence,fluency"


def _judge_row(judge: Judge, row: JudgeRow) -> dict:
    verdicts = judge_pair(judge, row.question, row.chat_history, row.ground_truth, row.answer_base, row.answer_candidate)
    return {**verdicts, "quality": score_pair(judge, row.evaluators, row.question, row.ground_truth, row.answer_base,
                                              row.answer_candidate)}


class JudgeExecutor(Executor):
    """The judge and quality nodes, applied to every row of the batch, `workers` rows at a time (judge calls are I/O)."""

    def __init__(self, judge: Judge, workers: int = 4, **kwargs):
        super().__init__(**kwargs)
        self._judge, self._gate = judge, asyncio.Semaphore(workers)

    @handler
    async def judge(self, rows: list[JudgeRow], ctx: WorkflowContext[list[dict]]) -> None:
        async def one(row: JudgeRow) -> dict:
            async with self._gate:
                try:
                    return await asyncio.to_thread(_judge_row, self._judge, row)
                except Exception as e:  # the line fails (counted), the batch goes on, as in a pf run
                    return {"error": f"{type(e).__name__}: {e}"}

        await ctx.send_message(list(await asyncio.gather(*(one(r) for r in rows))))


class AggregateExecutor(Executor):
    def __init__(self, model: str, **kwargs):
        super().__init__(**kwargs)
        self._model = model

    @handler
    async def aggregate(self, lines: list[dict], ctx: WorkflowContext[Never, dict]) -> None:
        judged = [line for line in lines if "error" not in line]
        await ctx.yield_output({"lines": lines, "metrics": summarize(judged, [j["length_delta"] for j in judged], self._model)})


def create_workflow(judge: Judge, workers: int = 4):
    judge_node, aggregate_node = JudgeExecutor(judge, workers, id="judge"), AggregateExecutor(judge.model, id="aggregate")
    return (WorkflowBuilder(name="finetune_phi_judge", start_executor=judge_node)
            .add_edge(judge_node, aggregate_node).build())
