"""The flows' endpoint client against a stand-in for a remote Azure ML endpoint (tests/standin.py: an
HTTP server on 127.0.0.1, since Azure cannot be reached here) that injects the faults an overloaded or
restarting endpoint serves: transient ones are retried (Retry-After honoured), the rest fail at once,
and a stream cut off before its end is an error, never a finished-looking answer."""

import time

import pytest
from standin import StandInEndpoint

from finetune_phi.serving.client import (
    EndpointError,
    RetryPolicy,
    chat,
    chat_stream,
    flow_inputs,
    retry_after_seconds,
)


KEY = "k" * 32
FAST = RetryPolicy(attempts=4, max_seconds=30, backoff=0.01, max_backoff=0.05)


@pytest.fixture
def standin(request):
    faults = getattr(request, "param", {})
    server = StandInEndpoint({"ft": lambda q: f"An answer to {q}, in four pieces."}, faults, KEY)
    yield server
    server.close()


def ask(standin, question="q", retry=FAST, **kw):
    return "".join(chat_stream(standin.url + "/score", KEY, question, [], "ft", retry=retry, **kw))


@pytest.mark.parametrize(
    "standin",
    [
        {
            ("ft", "q"): [
                "503:1",
                "429:0",
                "502",
                "504",
            ]
        }
    ],
    indirect=True,
)
def test_transient_statuses_are_retried_and_retry_after_is_honoured(standin):
    t = time.monotonic()
    assert (
        ask(standin, retry=RetryPolicy(attempts=5, backoff=0.01, max_backoff=0.05))
        == "An answer to q, in four pieces."
    )
    assert time.monotonic() - t >= 1.0  # the 503's Retry-After: 1, not the 10 ms backoff
    assert [o for _, _, o in standin.log] == ["503:1", "429:0", "502", "504", "ok"]


@pytest.mark.parametrize("standin", [{("ft", "q"): ["503:date"]}], indirect=True)
def test_retry_after_as_an_http_date_is_read(standin):
    t = time.monotonic()
    assert ask(standin).startswith("An answer")
    assert time.monotonic() - t >= 1.0  # two seconds ahead, to the second


def test_retry_after_forms():
    assert retry_after_seconds("7") == 7 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: at once


@pytest.mark.parametrize("standin", [{("ft", "q"): ["reset", "reset"], ("ft", "s"): ["408", "reset"]}], indirect=True)
def test_reset_connections_are_retried_for_streams_and_for_score(standin):
    assert ask(standin) == "An answer to q, in four pieces."
    assert chat(standin.url, KEY, "s", deployment="ft", retry=FAST) == "An answer to s, in four pieces."
    assert standin.count("reset") == 3 and standin.count("ok") == 2


@pytest.mark.parametrize("standin", [{("ft", "q"): ["400"], ("ft", "s"): ["500"]}], indirect=True)
def test_mistakes_and_server_errors_are_not_retried(standin):
    for question, status in (("q", 400), ("s", 500)):
        with pytest.raises(EndpointError) as e:
            ask(standin, question)
        assert e.value.status == status and e.value.attempts == 1 and "planned fault" in str(e.value)
    assert len(standin.log) == 2


@pytest.mark.parametrize("standin", [{("ft", "q"): ["always", "503:0"]}], indirect=True)
def test_a_line_that_keeps_failing_gives_up_within_bounds_and_says_how_often_it_tried(standin):
    with pytest.raises(EndpointError) as e:
        ask(standin)
    assert e.value.status == 503 and e.value.attempts == 4 and "HTTP 503" in str(e.value)
    assert "gave up after 4 attempts" in str(e.value) and len(standin.log) == 4
    t = time.monotonic()  # the time bound: a Retry-After longer than what is left is not waited for
    standin.faults[("ft", "q")] = ["always", "503:60"]
    with pytest.raises(EndpointError, match="HTTP 503"):
        ask(standin, retry=RetryPolicy(attempts=10, max_seconds=5))
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("standin", [{("ft", "q"): ["always", "cut"]}], indirect=True)
def test_a_stream_cut_after_its_first_piece_is_an_error_not_an_answer(standin):
    pieces = chat_stream(standin.url, KEY, "q", [], "ft", retry=FAST)
    assert next(pieces) == "An "  # the first piece came: from here on nothing is retried
    with pytest.raises(EndpointError, match="before the answer was complete"):
        list(pieces)
    assert len(standin.log) == 1


def test_retry_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_PHI_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("FINETUNE_PHI_RETRY_SECONDS", "9")
    assert (RetryPolicy.from_env().attempts, RetryPolicy.from_env().max_seconds) == (2, 9)
    monkeypatch.setenv("FINETUNE_PHI_RETRY_ATTEMPTS", "0")
    with pytest.raises(EndpointError, match="FINETUNE_PHI_RETRY_ATTEMPTS"):
        RetryPolicy.from_env()


def test_the_flows_send_temperature_and_max_tokens_and_pin_deployments(standin):
    assert flow_inputs("*", 0.7, 0) == (None, {"temperature": 0.7})
    assert flow_inputs(" ft ", 0, 64) == ("ft", {"temperature": 0.0, "max_tokens": 64})
    pinned, parameters = flow_inputs("ft", 0, 32)
    ask(standin, parameters=parameters)
    assert standin.bodies[-1]["temperature"] == 0 and standin.bodies[-1]["max_tokens"] == 32
