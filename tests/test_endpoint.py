"""The real endpoint on 127.0.0.1: both /score shapes, auth, pinning, traffic, bad input, limits."""

import math
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import Server, has_content, http, sse_events, stream_request

from finetune_phi.serving.keys import key_file


pytestmark = pytest.mark.slow  # every test here trains, serves or runs pf

CHAT = {
    "input_data": {
        "input_string": [{"role": "user", "content": "What is the capital of Peru?"}],
        "parameters": {"temperature": 0, "max_new_tokens": 24},
    }
}


def test_health_needs_no_key_but_everything_else_does(endpoint):
    assert http("GET", endpoint.url + "/health")[0] == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": endpoint.key}):
        status, hdrs, body = http("POST", endpoint.url + "/score", CHAT, headers)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert hdrs.get("www-authenticate") == "Bearer"
        assert http("GET", endpoint.url + "/ready", headers=headers)[0] == 401


def test_key_is_stored_0600_outside_the_repo_and_never_logged(endpoint):
    path = key_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert endpoint.key not in endpoint.log.read_text()


def test_chat_shape_answers_with_the_fine_tuned_model(endpoint):
    status, hdrs, body = http(
        "POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "ft"})
    )
    assert status == 200 and hdrs["azureml-model-deployment"] == "ft"
    assert body["output"].startswith("The capital of ")  # learnt the answer shape
    status, _, base = http(
        "POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "base"})
    )
    assert status == 200 and not base["output"].startswith("The capital of ")


def test_text_generation_shape_as_the_tutorial_client_sends_it(endpoint):
    prompt = "<|user|>\nSay hello to Maya.<|end|>\n<|assistant|>\n"
    payload = {
        "input_data": [prompt, prompt],
        "params": {"temperature": 0.0, "max_new_tokens": 16, "do_sample": False, "return_full_text": True},
    }
    status, _, body = http(
        "POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "ft"})
    )
    assert status == 200 and isinstance(body, list) and len(body) == 2
    assert body[0].startswith(prompt) and "Maya" in body[0][len(prompt) :]
    payload["params"]["return_full_text"] = False
    _, _, short = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "ft"}))
    assert short[0] == body[0][len(prompt) :].strip()  # greedy: the same continuation, without the prompt


def test_max_new_tokens_is_honoured(endpoint):
    payload = {"input_data": ["The"], "params": {"max_new_tokens": 3, "do_sample": False, "return_full_text": False}}
    _, _, three = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "base"}))
    payload["params"]["max_new_tokens"] = 30
    _, _, thirty = http(
        "POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "base"})
    )
    assert 0 < len(three[0]) < len(thirty[0]) and thirty[0].startswith(three[0])


def binomial_bounds(n: int, p: float, alpha: float) -> tuple[int, int]:
    """[lo, hi] holding Binomial(n, p) but for a probability of at most alpha (alpha/2 in each tail)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, 0.0
    while below + pmf[lo] <= alpha / 2:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while above + pmf[hi] <= alpha / 2:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def test_traffic_split_follows_the_weights(endpoint):
    """The server draws each request's deployment with an unseeded random.choices, which a test in
    another process cannot seed; so the bound is exact instead: with the 70/30 weights working, the
    count of `base` among 400 requests falls outside [lo, hi] with probability <= 1e-6 (binomial
    tails, no normal approximation). An even split would pass it with probability 4e-4, swapped weights never."""
    n = 400
    lo, hi = binomial_bounds(n, 0.7, 1e-6)  # [234, 323] of 400: 58.5% to 80.75%
    assert not lo <= n * 0.5 <= hi and not lo <= n * 0.3 <= hi  # the bound tells 70/30 from 50/50 and 30/70
    payload = {"input_data": ["x"], "params": {"max_new_tokens": 1}}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: http("POST", endpoint.url + "/score", payload, endpoint.auth()), range(n)))
    assert all(status == 200 for status, _, _ in answers)
    seen = Counter(headers["azureml-model-deployment"] for _, headers, _ in answers)
    assert set(seen) == {"base", "ft"}
    assert lo <= seen["base"] <= hi, seen


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"input_data": "a string"}', 400, "invalid_request"),
        (b'{"inputs": ["x"]}', 400, "invalid_request"),
        (b'{"input_data": ["x"], "params": {"max_new_tokens": "many"}}', 400, "invalid_parameter"),
        (b'{"input_data": ["x"], "params": {"max_new_tokens": 100000}}', 400, "invalid_parameter"),
        (b'{"input_data": ["x"], "params": {"temprature": 0.5}}', 400, "invalid_parameter"),
        (b'{"input_data": {"input_string": [{"role": "assistant", "content": "hi"}]}}', 400, "invalid_request"),
    ],
)
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(endpoint, body, status, code):
    got, _, answer = http("POST", endpoint.url + "/score", body, endpoint.auth())
    assert (got, answer["error"]["code"]) == (status, code)
    assert http("POST", endpoint.url + "/score", CHAT, endpoint.auth())[0] == 200


def test_unknown_pinned_deployment_is_404(endpoint):
    status, _, body = http(
        "POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "nope"})
    )
    assert status == 404 and "nope" in body["error"]["message"]


def test_over_capacity_gets_429_with_retry_after(tiny_model, test_root):
    """--max-concurrent-requests 1, taken by a stream seen decoding: the next request is a 429 at once.
    (No racing threads: the slot is known to be taken when the second request goes.)"""
    server = Server(
        ["--deployment", f"only={tiny_model}", "--max-concurrent-requests", "1"],
        test_root / "serve-limits.log",
        env={"FINETUNE_PHI_API_KEY": "a-test-key-for-limits"},
    )
    conn = None
    try:
        conn, response = stream_request(
            server.url,
            server.key,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1024, "temperature": 0},
        )
        assert response.status == 200
        assert next(e for e in sse_events(response) if has_content(e))  # decoding: the one slot is taken
        status, headers, body = http(
            "POST", server.url + "/score", {"input_data": ["x"], "params": {"max_new_tokens": 2}}, server.auth()
        )
        assert (status, body["error"]["code"]) == (429, "too_many_requests"), body
        assert headers["retry-after"] == "1" and "1 requests already in flight" in body["error"]["message"]
        assert http("GET", server.url + "/ready", headers=server.auth())[0] == 200  # refusing is not being unready
    finally:
        if conn is not None:
            conn.close()
        server.stop()
