"""A small client for the scoring endpoint (local server or Azure ML managed online endpoint).

Standard library and tenacity only, so the chat flow's tool imports it in milliseconds. Transient
failures (408, 429, 502, 503, 504, a refused or reset connection) are retried with exponential
backoff and jitter, honouring `Retry-After`, within a bound on attempts and on time (RetryPolicy);
a stream is retried only before its first piece, and a stream cut before its end is an error, never
a finished answer.
"""

from __future__ import annotations

import email.utils
import http.client
import itertools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from .generation import GenerationParams  # standard library only at import time


TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
# what the endpoint refuses in the caller's own input (a prompt over the context, an unknown deployment, a
# body too large, bad parameters); every other failure (unreachable, a wrong key, 5xx) is the service's
CALLERS_FAULT_STATUSES = frozenset({400, 404, 413, 422})
RETRY_ATTEMPTS_ENV = "FINETUNE_PHI_RETRY_ATTEMPTS"
RETRY_SECONDS_ENV = "FINETUNE_PHI_RETRY_SECONDS"


class EndpointError(RuntimeError):
    """The endpoint could not be reached or refused the request; the message names URL and status.

    `transient` is true for what a retry may cure (TRANSIENT_STATUSES, a refused or reset connection);
    `attempts` is how many tries were made before giving up."""

    def __init__(
        self, message: str, status: int | None = None, transient: bool | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.transient = status in TRANSIENT_STATUSES if transient is None else transient
        self.retry_after = retry_after
        self.attempts = 1

    @property
    def callers_fault(self) -> bool:
        """True when the request itself was refused (CALLERS_FAULT_STATUSES): a 4xx for whoever sent it;
        else the endpoint failed, a 5xx for a service in front of it (a bad gateway)."""
        return self.status in CALLERS_FAULT_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before a call counts as failed. The defaults suit an Azure ML managed online
    endpoint, whose 429s (over max_concurrent_requests_per_instance) and 503s (scaling, a deployment
    restarting) pass within seconds to a minute: waits of about 1, 2, 4, 8, 16 s (each with up to 1 s
    of jitter, capped at 30 s, or what `Retry-After` asks), at most `attempts` tries, and no wait that
    would end more than `max_seconds` after the first try began."""

    attempts: int = 6
    max_seconds: float = 300.0
    backoff: float = 1.0  # the first wait; it doubles on each retry
    max_backoff: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The defaults, or FINETUNE_PHI_RETRY_ATTEMPTS / FINETUNE_PHI_RETRY_SECONDS (attempts 1 = no retry)."""
        policy = cls()
        try:
            attempts = int(os.environ.get(RETRY_ATTEMPTS_ENV) or policy.attempts)
            seconds = float(os.environ.get(RETRY_SECONDS_ENV) or policy.max_seconds)
        except ValueError:
            raise EndpointError(
                f"{RETRY_ATTEMPTS_ENV} must be an integer and {RETRY_SECONDS_ENV} a number of seconds"
            ) from None
        if attempts < 1 or seconds < 0:
            raise EndpointError(f"{RETRY_ATTEMPTS_ENV} must be >= 1 and {RETRY_SECONDS_ENV} >= 0")
        return cls(attempts=attempts, max_seconds=seconds, backoff=policy.backoff, max_backoff=policy.max_backoff)

    def call(self, fn, sleep=time.sleep):
        """fn() until it succeeds, fails for good, or the policy's bounds are reached; the EndpointError
        raised at the end carries the number of attempts in `attempts` and in its message."""
        import tenacity

        backoff = tenacity.wait_exponential_jitter(multiplier=self.backoff, max=self.max_backoff, jitter=self.backoff)

        def wait(state):  # the server's Retry-After when it gives one, else exponential backoff with jitter
            retry_after = getattr(state.outcome.exception(), "retry_after", None)
            return retry_after if retry_after is not None else backoff(state)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, EndpointError) and e.transient),
            stop=tenacity.stop_after_attempt(self.attempts) | tenacity.stop_before_delay(self.max_seconds),
            wait=wait,
            sleep=sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except EndpointError as e:
            e.attempts = retrying.statistics.get("attempt_number", 1)
            if e.attempts > 1:
                e.args = (f"{e.args[0]} (gave up after {e.attempts} attempts)",)
            raise


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date (RFC 9110); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def scoring_url(endpoint_url: str) -> str:
    """Accept the scoring URI (…/score, as Azure ML shows it) or the endpoint's base URL."""
    url = endpoint_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"endpoint_url {endpoint_url!r} must start with http:// or https://")
    return url if url.endswith("/score") else url + "/score"


def openai_url(endpoint_url: str, path: str) -> str:
    """The endpoint's OpenAI-compatible route `path` (/models, /chat/completions), beside its scoring URI."""
    return scoring_url(endpoint_url).removesuffix("/score") + "/v1" + path


def check_question(question) -> str:
    """The chat flows' question: a non-empty string (EndpointError with status 400 otherwise)."""
    if not isinstance(question, str) or not question.strip():
        raise EndpointError(f"question must be a non-empty string, got {question!r}", 400)
    return question


def history_to_messages(chat_history: list | None, question: str) -> list[dict]:
    """Prompt flow's chat_history ([{"inputs": {"question"}, "outputs": {"answer"}}]) + question -> messages."""
    messages = []
    for i, turn in enumerate(chat_history or []):
        try:
            q, a = turn["inputs"]["question"], turn["outputs"]["answer"]
        except (KeyError, TypeError):
            raise EndpointError(
                f'chat_history[{i}] must look like {{"inputs": {{"question": ...}}, "outputs": {{"answer": ...}}}}',
                400,
            ) from None
        messages += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
    messages.append({"role": "user", "content": question})
    return messages


def flow_inputs(deployment: str | None, temperature: float | None, max_tokens: int | None) -> tuple[str | None, dict]:
    """The chat flows' rule for their inputs (flows/chat and flows/chat-maf alike): (deployment to pin, parameters).

    An empty deployment or "*" (what the served chat page sends: it insists on a value) leaves the
    choice to the endpoint's traffic split; max_tokens 0 or empty leaves the answer's length to the
    endpoint's default."""
    pinned = (deployment or "").strip()
    parameters = {} if temperature is None else {"temperature": float(temperature)}
    if max_tokens:
        parameters["max_tokens"] = int(max_tokens)
    return (None if pinned in ("", "*") else pinned), parameters


def post_json(
    url: str,
    api_key: str,
    payload: dict,
    deployment: str | None,
    timeout: float,
    read,
    retry: RetryPolicy | None = None,
    headers: dict | None = None,
):
    """read(response) of a JSON POST, both retried together on transient failures (RetryPolicy.from_env()
    unless `retry` says otherwise); every failure becomes an EndpointError naming URL and status.
    `headers` replace the bearer key (Azure OpenAI's api-key header, an Entra ID token)."""
    headers = {"Content-Type": "application/json", **(headers or {"Authorization": f"Bearer {api_key}"})}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    data = json.dumps(payload).encode()
    return (retry or RetryPolicy.from_env()).call(lambda: read(_post_once(url, data, headers, timeout)))


def _post_once(url: str, data: bytes, headers: dict, timeout: float):
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise EndpointError(
            f"POST {url} failed with HTTP {e.code} {e.reason}: {detail}",
            e.code,
            retry_after=retry_after_seconds(e.headers.get("Retry-After")),
        ) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, BrokenPipeError):  # it answered (and hung up) before reading the whole body
            raise EndpointError(
                f"{url} closed the connection before the request was sent whole: a request body "
                "over the endpoint's limit is refused (HTTP 413, --max-body-bytes)",
                413,
            ) from None
        # refused, reset, timed out: worth another try; a host name that does not resolve is not
        transient = isinstance(
            e.reason, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
        )
        raise EndpointError(
            f"cannot reach endpoint {url}: {e.reason}. Is it running? (start one with `finetune-phi serve`)",
            transient=transient,
        ) from None
    except (ConnectionError, http.client.HTTPException) as e:  # the connection dropped before the status line
        raise EndpointError(
            f"the connection to {url} was lost before an answer: {type(e).__name__}: {e}", transient=True
        ) from None
    except TimeoutError:
        raise EndpointError(f"no answer from {url} within {timeout:.0f} s") from None


def score(
    endpoint_url: str,
    api_key: str,
    payload: dict,
    deployment: str | None = None,
    timeout: float = 120,
    retry: RetryPolicy | None = None,
):
    """POST a /score payload and return the decoded JSON answer."""
    url = scoring_url(endpoint_url)

    def read(response):
        with response:
            try:
                return json.loads(response.read())
            except json.JSONDecodeError:
                raise EndpointError(f"{url} answered with something that is not JSON") from None
            except TimeoutError:
                raise EndpointError(f"no answer from {url} within {timeout:.0f} s") from None
            except (ConnectionError, http.client.HTTPException) as e:
                raise EndpointError(
                    f"the answer from {url} was cut off: {type(e).__name__}: {e}", transient=True
                ) from None

    return post_json(url, api_key, payload, deployment, timeout, read, retry)


def chat(
    endpoint_url: str,
    api_key: str,
    question: str,
    chat_history: list | None = None,
    deployment: str | None = None,
    parameters: dict | None = None,
    timeout: float = 120,
    retry: RetryPolicy | None = None,
) -> str:
    """One assistant reply through the chat-completion shape of /score."""
    check_question(question)
    payload = {
        "input_data": {"input_string": history_to_messages(chat_history, question), "parameters": parameters or {}}
    }
    answer = score(endpoint_url, api_key, payload, deployment, timeout, retry)
    if not isinstance(answer, dict) or "output" not in answer:
        raise EndpointError(f"{scoring_url(endpoint_url)} answered {str(answer)[:200]!r}, expected {{'output': ...}}")
    return answer["output"]


def chat_stream(
    endpoint_url: str,
    api_key: str,
    question: str,
    chat_history: list | None = None,
    deployment: str | None = None,
    parameters: dict | None = None,
    timeout: float = 120,
    retry: RetryPolicy | None = None,
) -> Iterator[str]:
    """The assistant's reply as pieces of text while the model writes it.

    Uses the endpoint's OpenAI-compatible streaming API (/v1/chat/completions); an endpoint without
    it (an Azure ML scoring script answers 404) gets one /score call, yielded whole. `parameters`
    (temperature, max_tokens, top_p, ...) go to the endpoint as they are. Connection and HTTP
    errors are raised here, before the first piece, so callers can report them at once; they are
    retried up to the first piece, never after (a piece already shown cannot be taken back), and a
    stream cut off before its end raises EndpointError.
    """
    check_question(question)
    url = openai_url(endpoint_url, "/chat/completions")
    # /score's temperature, not OpenAI's 1.0; max_tokens is left to the endpoint, whose default
    # follows its own --max-new-tokens-cap
    body = {
        "messages": history_to_messages(chat_history, question),
        "stream": True,
        "temperature": GenerationParams().temperature,
        **(parameters or {}),
    }
    if deployment:
        body["model"] = deployment

    def first_piece(response):
        pieces = _sse_text(response, url)
        try:
            return itertools.chain([next(pieces)], pieces)
        except StopIteration:  # a complete, empty answer
            return iter(())

    try:
        return post_json(url, api_key, body, deployment, timeout, first_piece, retry)
    except EndpointError as e:
        if e.status in (404, 405):
            return iter([chat(endpoint_url, api_key, question, chat_history, deployment, parameters, timeout, retry)])
        raise


def sse_events(response, url: str | None = None) -> Iterator[dict]:
    """The events of an OpenAI-style SSE stream (`data: {...}` lines) as they arrive, until `data: [DONE]`.

    With `url` (the client's own reading), a stream that ends or breaks before `data: [DONE]` (the
    endpoint killed mid-answer, a proxy cutting the connection) raises EndpointError instead of
    passing for a finished answer."""
    try:
        for line in response:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, a chunk cut short
        if url is None:
            raise
        raise EndpointError(
            f"the stream from {url} broke before the answer was complete: {type(e).__name__}: {e}", transient=True
        ) from None
    if url is not None:
        raise EndpointError(
            f"the stream from {url} ended before the answer was complete (no data: [DONE])", transient=True
        )


def _sse_text(response, url: str) -> Iterator[str]:
    with response:
        for event in sse_events(response, url):
            if "error" in event:
                raise EndpointError(f"{url} failed while streaming: {event['error'].get('message')}")
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]
