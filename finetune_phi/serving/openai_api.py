"""The OpenAI-compatible chat API (/v1/chat/completions, /v1/models): request parsing and response bodies.

Enough of the API for the openai SDK, Prompt flow's LLM tool and azure-ai-evaluation's AI-assisted
evaluators: messages, temperature, top_p, max_tokens, stop, response_format (json_object and
json_schema: grammar-constrained decoding on engines that can), stream (SSE chunks, then
`data: [DONE]`), usage and finish_reason. Model = the
deployment name; no model (or "default") lets the traffic split choose.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from .generation import GenerationParams, ParamError
from .request import RequestError, check_messages


# accepted and ignored when left at OpenAI's neutral values (clients send them by default)
NEUTRAL = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "user": None,
    "seed": None,
    "logprobs": False,
    "parallel_tool_calls": None,
}


@dataclass
class ChatRequest:
    """A /v1/chat/completions body, checked: what the route needs from it."""

    model: str | None  # a deployment name; None lets the traffic split choose
    messages: list[dict]
    params: GenerationParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage

    @classmethod
    def parse(cls, payload: object, cap: int) -> ChatRequest:
        if not isinstance(payload, dict):
            raise RequestError(400, "invalid_request", "body must be a JSON object")
        messages = check_messages(payload.get("messages"), "messages")
        for key, neutral in NEUTRAL.items():
            value = payload.get(key)
            if value in (None, "", {}, []) or value == neutral:
                continue
            raise RequestError(400, "unsupported_parameter", f"{key}={value!r} is not supported by this endpoint")
        if payload.get("tools") or payload.get("functions"):
            raise RequestError(400, "unsupported_parameter", "tool/function calling is not supported by this endpoint")
        # absent or null: the default (OpenAI's temperature is 1.0, not /score's 0.7)
        max_tokens = payload.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = payload.get("max_tokens")
        raw = {
            "temperature": payload.get("temperature"),
            "top_p": payload.get("top_p"),
            "stop": payload.get("stop") or None,
            "max_new_tokens": max_tokens,
            "response_format": payload.get("response_format"),
        }  # json_object / json_schema: constrained decoding
        try:
            params = GenerationParams.parse(raw, cap=cap, return_full_text=False, temperature=1.0)
        except ParamError as e:
            raise RequestError(400, "invalid_parameter", str(e)) from None
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "invalid_request", "model must be a string (a deployment name)")
        stream = payload.get("stream")
        stream = False if stream is None else stream  # null: the default
        if not isinstance(stream, bool):
            raise RequestError(400, "invalid_request", "stream must be true or false")
        options = payload.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return cls(None if model in (None, "", "default") else model, messages, params, stream, include_usage)


def completion_body(model: str, completion) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text.strip()},
                "finish_reason": _finish(completion.finish_reason),
            }
        ],
        "usage": usage(completion),
    }


def usage(completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class ChunkWriter:
    """Server-sent events for one streamed completion."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def chunk(
        self, delta: dict | None = None, finish_reason: str | None = None, usage_body: dict | None = None
    ) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if usage_body
            else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason and _finish(finish_reason)}],
        }
        if usage_body:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


def models_body(deployments: list[str]) -> dict:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "finetune-phi"} for name in deployments],
    }
