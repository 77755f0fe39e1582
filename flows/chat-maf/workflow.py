"""The chat flow (flows/chat) as a Microsoft Agent Framework workflow.

    flows/chat/flow.dag.yaml                 this file
    inputs: question, chat_history,   ->     InputsExecutor  (@handler on ChatInput)
            deployment, temperature,
            max_tokens
    python node `chat` (chat.py)      ->     ChatExecutor    (@handler: finetune_phi.serving.client.chat_stream)
    outputs: answer (is_chat_output)  ->     ctx.yield_output(answer), or one output per piece when streaming
    connection finetune_phi_endpoint  ->     endpoint_url / api_key given to create_workflow()
                                             (finetune_phi.twins.endpoint() reads them from the
                                             Prompt flow connection or FINETUNE_PHI_ENDPOINT_URL /
                                             FINETUNE_PHI_API_KEY; never from a file in the repo)

The call is the one the Prompt flow tool makes (same client, same /v1 streaming request, same
defaults), so both flows give the same answer from a greedy endpoint. Run it with
`python -m finetune_phi.evaluation.maf_runner test|run|serve --flow flows/chat-maf` (docs/agent-framework.md).
A workflow instance runs one input at a time: make one per row (create_workflow is cheap).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent_framework import Executor, Message, WorkflowBuilder, WorkflowContext, handler
from typing_extensions import Never

from finetune_phi.serving.client import EndpointError, chat_stream, flow_inputs


@dataclass
class ChatInput:
    """The chat flow's inputs; chat_history in Prompt flow's shape [{"inputs": {"question"}, "outputs": {"answer"}}]."""

    question: str
    chat_history: list = field(default_factory=list)
    deployment: str = ""  # empty or "*": the endpoint's traffic split; a name pins that deployment
    temperature: float = 0.7  # flows/chat's default; 0 = greedy
    max_tokens: int = 0  # 0 = the endpoint's default


class InputsExecutor(Executor):
    """The flow's inputs: the same defaults and rules (finetune_phi.serving.client.flow_inputs) as flows/chat."""

    def __init__(self, deployment: str = "", **kwargs):
        super().__init__(**kwargs)
        self._deployment = deployment  # what a conversation (converse) is answered by; a ChatInput names its own

    @handler
    async def receive(self, chat_input: ChatInput, ctx: WorkflowContext[ChatInput]) -> None:
        pinned, _ = flow_inputs(chat_input.deployment, None, None)
        await ctx.send_message(
            ChatInput(
                chat_input.question,
                list(chat_input.chat_history or []),
                pinned or "",
                chat_input.temperature,
                chat_input.max_tokens,
            )
        )

    @handler
    async def converse(self, messages: list[Message], ctx: WorkflowContext[ChatInput]) -> None:
        """A conversation as an agent is given one (`create_workflow(...).as_agent()`, Agent Framework's DevUI chat
        page): the last user turn is the question, the user/assistant pairs before it the chat history."""
        turns = [(m.role, m.text) for m in messages if m.role in ("user", "assistant") and m.text]
        question = turns.pop()[1] if turns and turns[-1][0] == "user" else ""
        history = [
            {"inputs": {"question": q}, "outputs": {"answer": a}}
            for (qr, q), (ar, a) in zip(turns[::2], turns[1::2], strict=False)
            if (qr, ar) == ("user", "assistant")
        ]
        await ctx.send_message(ChatInput(question, history, self._deployment))


class ChatExecutor(Executor):
    """The python node: the assistant's reply from the scoring endpoint (logic in finetune_phi.serving.client)."""

    def __init__(self, endpoint_url: str, api_key: str, stream: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._endpoint_url, self._api_key, self._stream = endpoint_url, api_key, stream

    @handler
    async def chat(self, chat_input: ChatInput, ctx: WorkflowContext[Never, str]) -> None:
        # The client is blocking (urllib): run it in a thread so rows of a batch overlap.
        pinned, parameters = flow_inputs(chat_input.deployment, chat_input.temperature, chat_input.max_tokens)
        pieces = await asyncio.to_thread(
            chat_stream,
            self._endpoint_url,
            self._api_key,
            chat_input.question,
            chat_input.chat_history,
            pinned,
            parameters,
        )
        answer = []
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            if self._stream:
                await ctx.yield_output(piece)
            answer.append(piece)
        if not self._stream:
            await ctx.yield_output("".join(answer))


def create_workflow(endpoint_url: str, api_key: str, stream: bool = False, deployment: str = ""):
    """A fresh workflow. Not streaming: one output, the answer. Streaming: one output per piece. `deployment`: the
    one a conversation given as messages (as_agent()) is answered by; empty = the traffic split."""
    inputs = InputsExecutor(deployment, id="inputs")
    chat = ChatExecutor(endpoint_url, api_key, stream=stream, id="chat")
    return WorkflowBuilder(name="finetune_phi_chat", start_executor=inputs).add_edge(inputs, chat).build()


__all__ = ["ChatInput", "create_workflow", "EndpointError"]
