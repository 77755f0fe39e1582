"""What every protocol checks in a request: the error type it refuses with, the JSON body, chat messages.

Shared by the local server (app.py), the Azure ML scoring script (deploy/score.py) and both
protocols (azure_protocol.py, openai_api.py), so a bad body gets the same answer everywhere.
"""

from __future__ import annotations

import json


class RequestError(Exception):
    """A request the endpoint refuses; carries the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def parse_json(body: bytes | str) -> object:
    """A request body as JSON; RequestError 400 when it is not JSON or holds text that is not Unicode."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, "invalid_json", f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", "body is not valid JSON: nested too deeply") from None
    if where := invalid_text_at(payload):
        raise RequestError(
            400, "invalid_json", f"{where} is not valid Unicode text: it holds a lone surrogate such as \\ud800"
        )
    return payload


def check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "invalid_request", f"'{where}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise RequestError(
                400, "invalid_request", f"'{where}[{i}]' must be {{'role': system|user|assistant, 'content': str}}"
            )
    if messages[-1]["role"] != "user":
        raise RequestError(400, "invalid_request", f"the last message of '{where}' must come from the user")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def invalid_text_at(payload) -> str | None:
    """Where a parsed JSON body holds a string UTF-8 cannot encode (e.g. "messages[0].content"), else None.

    JSON may escape a lone surrogate ("\\ud800"); Python decodes it into a str that no tokenizer takes.
    A loop, not recursion: json.loads accepts bodies nested almost as deep as the recursion limit.
    """

    def valid(text: str) -> bool:
        try:
            text.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False

    stack = [(payload, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and not valid(value):
            return path or "the body"
        if isinstance(value, list):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            for key, v in value.items():
                if not valid(key):  # named by its parent: the key itself cannot go into a UTF-8 message
                    return f"a key of {path or 'the body'}"
                stack.append((v, f"{path}.{key}" if path else key))
    return None
