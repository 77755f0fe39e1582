"""The /score request protocol, shared by the local server and the Azure ML scoring script.

Two request shapes (docs/serving.md, "Endpoint"):
  text generation (MLflow):  {"input_data": ["<prompt>", ...], "params": {...}}  -> ["<text>", ...]
  chat completion:           {"input_data": {"input_string": [messages], "parameters": {...}}}
                             -> {"output": "<assistant text>"}
"""

from __future__ import annotations

from .engines.base import Engine
from .generation import (
    MAX_NEW_TOKENS_CAP,
    ContextLengthError,
    DecodeRequest,
    GenerationParams,
    ParamError,
)
from .request import RequestError, check_messages


MAX_INPUTS = 16


def parse_score_request(payload: object, cap: int = MAX_NEW_TOKENS_CAP) -> tuple[str, object, GenerationParams]:
    """Validate a /score body; returns (shape, inputs, params) with shape 'text' or 'chat'."""
    if not isinstance(payload, dict) or "input_data" not in payload:
        raise RequestError(400, "invalid_request", "body must be a JSON object with 'input_data'")
    data = payload["input_data"]
    try:
        if isinstance(data, list):
            if not data or len(data) > MAX_INPUTS or not all(isinstance(p, str) and p for p in data):
                raise RequestError(
                    400,
                    "invalid_request",
                    f"'input_data' must be a list of 1 to {MAX_INPUTS} non-empty prompt strings",
                )
            return "text", data, GenerationParams.parse(payload.get("params"), cap=cap)
        if isinstance(data, dict) and "input_string" in data:
            messages = check_messages(data["input_string"], "input_data.input_string")
            return "chat", messages, GenerationParams.parse(data.get("parameters"), cap=cap, return_full_text=False)
    except ParamError as e:
        raise RequestError(400, "invalid_parameter", str(e)) from None
    raise RequestError(
        400,
        "invalid_request",
        "'input_data' must be a list of prompts or an object with 'input_string' (chat messages)",
    )


def prompts_of(shape: str, inputs) -> list:
    """What the engine encodes: the prompt strings (text shape), or the one list of chat messages."""
    return [inputs] if shape == "chat" else list(inputs)


def encode_all(engine: Engine, prompts: list, params: GenerationParams) -> list[list[int]]:
    """Token ids of each prompt (a string, or chat messages); one that does not fit the context is the caller's 400."""
    try:
        return [engine.encode(p, params) for p in prompts]
    except ContextLengthError as e:
        raise RequestError(400, "context_length_exceeded", str(e)) from None
    except ParamError as e:
        raise RequestError(400, "invalid_request", str(e)) from None


def response_body(shape: str, prompts: list, completions, params: GenerationParams):
    if shape == "chat":
        return {"output": completions[0].text.strip()}
    return [
        p + c.text if params.return_full_text else c.text.strip() for p, c in zip(prompts, completions, strict=True)
    ]


def score_rows(engine: Engine, shape: str, inputs, params: GenerationParams) -> tuple[list, list[DecodeRequest]]:
    """A parsed /score request as the engine decodes it: (the prompts, one DecodeRequest each). The local endpoint and the
    Azure ML scoring script both call this, then response_body with the completions."""
    prompts = prompts_of(shape, inputs)
    return prompts, [DecodeRequest(ids, params) for ids in encode_all(engine, prompts, params)]


def run_score(engine: Engine, shape: str, inputs, params: GenerationParams):
    """Answer a parsed request, waiting in this thread (the Azure ML scoring script)."""
    prompts, rows = score_rows(engine, shape, inputs, params)
    return response_body(shape, prompts, engine.run(rows), params)
