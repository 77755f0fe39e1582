"""The evaluation flow (flows/eval) as a Microsoft Agent Framework workflow over a batch of rows.

    flows/eval/flow.dag.yaml                       this file
    inputs: question, answer, ground_truth   ->    EvalRow (one per line of the batch)
    line node `score` (score.py)             ->    ScoreExecutor: finetune_phi.evaluation.metrics.score per row
    node `aggregate` (aggregation: true,     ->    AggregateExecutor: finetune_phi.evaluation.metrics.aggregate,
      log_metric per value)                         yielded as the run's metrics

Prompt flow runs the line node once per row and then the aggregation node over all of them; an Agent
Framework workflow has no batch mode, so its input is the whole batch and the two executors are the
two nodes. Output: {"lines": [per-row scores + "failed"], "metrics": {means and counts}} — the same
numbers `pf run show-metrics` shows for flows/eval over the same rows.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agent_framework import Executor, WorkflowBuilder, WorkflowContext, handler
from typing_extensions import Never

from finetune_phi.evaluation.metrics import aggregate, score_line


@dataclass
class EvalRow:
    answer: str | None
    ground_truth: str
    question: str = ""


def score_row(row: EvalRow) -> dict:
    return score_line(row.answer, row.ground_truth)  # flows/eval/score.py's node, the same function


class ScoreExecutor(Executor):
    """The line node, applied to every row of the batch."""

    @handler
    async def score(self, rows: list[EvalRow], ctx: WorkflowContext[list[dict]]) -> None:
        # metrics are plain CPU work (and azure-ai-evaluation's F1 runs its own event loop): off this loop
        await ctx.send_message(await asyncio.to_thread(lambda: [score_row(row) for row in rows]))


class AggregateExecutor(Executor):
    """The aggregation node: means of every metric and counts of scored / failed lines."""

    @handler
    async def aggregate(self, lines: list[dict], ctx: WorkflowContext[Never, dict]) -> None:
        await ctx.yield_output({"lines": lines, "metrics": aggregate(lines)})


def create_workflow():
    score_node, aggregate_node = ScoreExecutor(id="score"), AggregateExecutor(id="aggregate")
    return (WorkflowBuilder(name="finetune_phi_eval", start_executor=score_node)
            .add_edge(score_node, aggregate_node).build())
