"""Chat data as people have it, turned into UltraChat rows.

Four forms, told apart by the keys of a file's first row:
  ultrachat   {"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}   (HuggingFaceH4/ultrachat_200k)
  messages    {"messages": [{"role", "content"}, ...]}                        (OpenAI chat fine-tuning)
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
  ultrachat-original  {"id", "data": ["<user>", "<assistant>", ...]}          (stingning/ultrachat)
Where a row has no prompt_id, it is derived as UltraChat does: the first user turn and its sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from .rows import DataError


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _with_ids(messages: list, where: str) -> dict:
    first_user = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if not isinstance(first_user, str) or not first_user.strip():
        raise DataError(f"{where}: no user turn to take the prompt from")
    return {"prompt": first_user, "prompt_id": hashlib.sha256(first_user.encode()).hexdigest(), "messages": messages}


def _require(row: object, key: str, where: str, kind: type = list):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(row[key], kind) or not row[key]:
        raise DataError(f"{where}: {key!r} must be a non-empty {kind.__name__}")
    return row[key]


def from_ultrachat(row: object, where: str) -> object:
    return row  # validate_row checks it


def from_messages(row: object, where: str) -> dict:
    return _with_ids(_require(row, "messages", where), where)


def from_sharegpt(row: object, where: str) -> dict:
    messages = []
    for i, turn in enumerate(_require(row, "conversations", where)):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] has unknown 'from' {turn['from']!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": role, "content": turn["value"]})
    return _with_ids(messages, where)


def from_ultrachat_original(row: object, where: str) -> dict:
    turns = _require(row, "data", where)  # user and assistant alternate, the user first
    return _with_ids(
        [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)], where
    )


CONVERTERS: dict[str, Callable[[object, str], object]] = {
    "ultrachat": from_ultrachat,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "ultrachat-original": from_ultrachat_original,
}


def detect(first: object, where: str) -> str:
    """The form of a file, from its first row."""
    if isinstance(first, dict):
        if "prompt_id" in first or "prompt" in first:
            return "ultrachat"
        if "messages" in first:
            return "messages"
        if "conversations" in first:
            return "sharegpt"
        if "data" in first and "id" in first:
            return "ultrachat-original"
        raise DataError(
            f"{where}: not a chat row I know (keys {sorted(first)}); expected UltraChat "
            "(prompt, prompt_id, messages), OpenAI 'messages', ShareGPT 'conversations' "
            "or original UltraChat (id, data)"
        )
    raise DataError(f"{where}: expected a JSON object, got {type(first).__name__}")
