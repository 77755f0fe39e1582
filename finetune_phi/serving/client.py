"""A small client for the scoring endpoint (local server or Azure ML managed online endpoint).

Standard library only, so the chat flow's tool imports it in milliseconds.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator

from .generation import GenerationParams  # standard library only at import time


class EndpointError(RuntimeError):
    """The endpoint could not be reached or refused the request; the message names URL and status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def scoring_url(endpoint_url: str) -> str:
    """Accept the scoring URI (…/score, as Azure ML shows it) or the endpoint's base URL."""
    url = endpoint_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"endpoint_url {endpoint_url!r} must start with http:// or https://")
    return url if url.endswith("/score") else url + "/score"


def history_to_messages(chat_history: list | None, question: str) -> list[dict]:
    """Prompt flow's chat_history ([{"inputs": {"question"}, "outputs": {"answer"}}]) + question -> messages."""
    messages = []
    for i, turn in enumerate(chat_history or []):
        try:
            q, a = turn["inputs"]["question"], turn["outputs"]["answer"]
        except (KeyError, TypeError):
            raise EndpointError(f"chat_history[{i}] must look like "
                                '{"inputs": {"question": ...}, "outputs": {"answer": ...}}') from None
        messages += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
    messages.append({"role": "user", "content": question})
    return messages


def _post(url: str, api_key: str, payload: dict, deployment: str | None, timeout: float):
    """An open HTTP response for a JSON POST; every failure becomes an EndpointError naming URL and status."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise EndpointError(f"POST {url} failed with HTTP {e.code} {e.reason}: {detail}", e.code) from None
    except urllib.error.URLError as e:
        raise EndpointError(f"cannot reach endpoint {url}: {e.reason}. Is it running? "
                            "(start one with `finetune-phi serve`)") from None
    except TimeoutError:
        raise EndpointError(f"no answer from {url} within {timeout:.0f} s") from None


def score(endpoint_url: str, api_key: str, payload: dict, deployment: str | None = None, timeout: float = 120):
    """POST a /score payload and return the decoded JSON answer."""
    url = scoring_url(endpoint_url)
    with _post(url, api_key, payload, deployment, timeout) as response:
        try:
            return json.loads(response.read())
        except json.JSONDecodeError:
            raise EndpointError(f"{url} answered with something that is not JSON") from None
        except TimeoutError:
            raise EndpointError(f"no answer from {url} within {timeout:.0f} s") from None


def chat(endpoint_url: str, api_key: str, question: str, chat_history: list | None = None,
         deployment: str | None = None, parameters: dict | None = None, timeout: float = 120) -> str:
    """One assistant reply through the chat-completion shape of /score."""
    if not isinstance(question, str) or not question.strip():
        raise EndpointError("question is empty")
    payload = {"input_data": {"input_string": history_to_messages(chat_history, question),
                              "parameters": parameters or {}}}
    answer = score(endpoint_url, api_key, payload, deployment, timeout)
    if not isinstance(answer, dict) or "output" not in answer:
        raise EndpointError(f"{scoring_url(endpoint_url)} answered {str(answer)[:200]!r}, expected {{'output': ...}}")
    return answer["output"]


def chat_stream(endpoint_url: str, api_key: str, question: str, chat_history: list | None = None,
                deployment: str | None = None, parameters: dict | None = None, timeout: float = 120) -> Iterator[str]:
    """The assistant's reply as pieces of text while the model writes it.

    Uses the endpoint's OpenAI-compatible streaming API (/v1/chat/completions); an endpoint without
    it (an Azure ML scoring script answers 404) gets one /score call, yielded whole. Connection and
    HTTP errors are raised here, before the first piece, so callers can report them at once.
    """
    if not isinstance(question, str) or not question.strip():
        raise EndpointError("question is empty")
    url = scoring_url(endpoint_url).removesuffix("/score") + "/v1/chat/completions"
    # /score's temperature, not OpenAI's 1.0; max_tokens is left to the endpoint, whose default
    # follows its own --max-new-tokens-cap
    body = {"messages": history_to_messages(chat_history, question), "stream": True,
            "temperature": GenerationParams().temperature, **(parameters or {})}
    if deployment:
        body["model"] = deployment
    try:
        response = _post(url, api_key, body, deployment, timeout)
    except EndpointError as e:
        if e.status in (404, 405):
            return iter([chat(endpoint_url, api_key, question, chat_history, deployment, parameters, timeout)])
        raise
    return _sse_text(response, url)


def sse_events(response) -> Iterator[dict]:
    """The events of an OpenAI-style SSE stream (`data: {...}` lines) as they arrive, until `data: [DONE]`."""
    for line in response:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def _sse_text(response, url: str) -> Iterator[str]:
    with response:
        for event in sse_events(response):
            if "error" in event:
                raise EndpointError(f"{url} failed while streaming: {event['error'].get('message')}")
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]
