"""UltraChat rows: what a valid row is, and the eval row derived from one.

A row follows the HuggingFaceH4/ultrachat_200k schema:
    {"prompt": str, "prompt_id": str, "messages": [{"role": ..., "content": ...}, ...]}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UserError


ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """A bad input row or file; the message names the file and line."""


@dataclass
class SourceLine:
    """One record as read from a source (a file line, a parquet row, a hub row), with where it came from."""

    where: str  # "file:line" for error messages
    data: object
    error: str | None = None  # a line that could not be read at all (bad bytes, bad JSON)


def validate_row(row: object, where: str) -> dict:
    """Return the row if it is a valid UltraChat row, else raise DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "prompt_id", "messages"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(row["prompt_id"], str) or not row["prompt_id"].strip():
        raise DataError(f"{where}: 'prompt_id' must be a non-empty string")
    if not isinstance(row["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise DataError(f"{where}: messages[{i}] ({message['role']}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant reply in 'messages'")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user turn in 'messages'")
    return row


def load_valid(rows: Iterable[SourceLine], skip_invalid: bool = False, convert=None) -> tuple[list[dict], list[str]]:
    """Validate rows (converted to UltraChat rows by `convert` first, if given); raise on the first
    bad one, or skip them when asked and return the errors."""
    good, errors = [], []
    for row in rows:
        try:
            if row.error:
                raise DataError(row.error)
            data = convert(row.data, row.where) if convert else row.data
            good.append(validate_row(data, row.where))
        except DataError as e:
            if not skip_invalid:
                raise
            errors.append(str(e))
    return good, errors


def eval_row(row: dict) -> dict:
    """One batch-run row: the last user turn before the final assistant turn, and what came before.

    chat_history uses Prompt flow's shape: [{"inputs": {"question": u}, "outputs": {"answer": a}}].
    System turns have no place in that shape and are left out; consecutive turns of one role are
    joined so user/assistant pairs stay aligned.
    """
    turns = [m for m in row["messages"] if m["role"] != "system"]
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]  # a trailing user turn has no reference answer
    merged: list[dict] = []
    for m in turns:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(dict(m))
    if merged and merged[0]["role"] == "assistant":
        merged = merged[1:]  # an opening assistant turn answers no question
    if len(merged) < 2:
        raise DataError(f"prompt_id {row['prompt_id']}: no user turn followed by an assistant reply")
    pairs = [(merged[i]["content"], merged[i + 1]["content"]) for i in range(0, len(merged) - 1, 2)]
    history = [{"inputs": {"question": q}, "outputs": {"answer": a}} for q, a in pairs[:-1]]
    question, answer = pairs[-1]
    return {"prompt_id": row["prompt_id"], "question": question, "chat_history": history, "ground_truth": answer}
