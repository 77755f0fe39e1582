"""The real endpoint on 127.0.0.1: both /score shapes, auth, pinning, traffic, bad input, limits."""
import os
import stat
from collections import Counter

import pytest

from conftest import Server, concurrent_posts, http
from finetune_phi.keys import key_file

CHAT = {"input_data": {"input_string": [{"role": "user", "content": "What is the capital of Peru?"}],
                       "parameters": {"temperature": 0, "max_new_tokens": 24}}}


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
    status, hdrs, body = http("POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "ft"}))
    assert status == 200 and hdrs["azureml-model-deployment"] == "ft"
    assert body["output"].startswith("The capital of ")  # learnt the answer shape
    status, _, base = http("POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "base"}))
    assert status == 200 and not base["output"].startswith("The capital of ")


def test_text_generation_shape_as_the_tutorial_client_sends_it(endpoint):
    prompt = "<|user|>\nSay hello to Maya.<|end|>\n<|assistant|>\n"
    payload = {"input_data": [prompt, prompt], "params": {"temperature": 0.0, "max_new_tokens": 16,
                                                          "do_sample": False, "return_full_text": True}}
    status, _, body = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "ft"}))
    assert status == 200 and isinstance(body, list) and len(body) == 2
    assert body[0].startswith(prompt) and "Maya" in body[0][len(prompt):]
    payload["params"]["return_full_text"] = False
    _, _, short = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "ft"}))
    assert short[0] == body[0][len(prompt):].strip()  # greedy: the same continuation, without the prompt


def test_max_new_tokens_is_honoured(endpoint):
    payload = {"input_data": ["The"], "params": {"max_new_tokens": 3, "do_sample": False, "return_full_text": False}}
    _, _, three = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "base"}))
    payload["params"]["max_new_tokens"] = 30
    _, _, thirty = http("POST", endpoint.url + "/score", payload, endpoint.auth(**{"azureml-model-deployment": "base"}))
    assert 0 < len(three[0]) < len(thirty[0]) and thirty[0].startswith(three[0])


def test_traffic_split_follows_the_weights(endpoint):
    payload = {"input_data": ["x"], "params": {"max_new_tokens": 1}}
    seen = Counter(http("POST", endpoint.url + "/score", payload, endpoint.auth())[1]["azureml-model-deployment"]
                   for _ in range(200))
    assert set(seen) == {"base", "ft"}
    assert 0.58 <= seen["base"] / 200 <= 0.82  # 70% +- 3 standard deviations


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b'{"input_data": "a string"}', 400, "invalid_request"),
    (b'{"inputs": ["x"]}', 400, "invalid_request"),
    (b'{"input_data": ["x"], "params": {"max_new_tokens": "many"}}', 400, "invalid_parameter"),
    (b'{"input_data": ["x"], "params": {"max_new_tokens": 100000}}', 400, "invalid_parameter"),
    (b'{"input_data": ["x"], "params": {"temprature": 0.5}}', 400, "invalid_parameter"),
    (b'{"input_data": {"input_string": [{"role": "assistant", "content": "hi"}]}}', 400, "invalid_request"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(endpoint, body, status, code):
    got, _, answer = http("POST", endpoint.url + "/score", body, endpoint.auth())
    assert (got, answer["error"]["code"]) == (status, code)
    assert http("POST", endpoint.url + "/score", CHAT, endpoint.auth())[0] == 200


def test_unknown_pinned_deployment_is_404(endpoint):
    status, _, body = http("POST", endpoint.url + "/score", CHAT, endpoint.auth(**{"azureml-model-deployment": "nope"}))
    assert status == 404 and "nope" in body["error"]["message"]


def test_over_capacity_gets_429_with_retry_after(tiny_model, test_root):
    server = Server(["--deployment", f"only={tiny_model}", "--max-concurrent-requests", "1"],
                    test_root / "serve-limits.log", env={"FINETUNE_PHI_API_KEY": "a-test-key-for-limits"})
    try:
        slow = {"input_data": ["x"], "params": {"max_new_tokens": 400, "do_sample": False}}
        results = concurrent_posts(server.url + "/score", slow, server.auth(), 4)
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) >= 1 and 429 in statuses
        refused = next(r for r in results if r[0] == 429)
        assert refused[1]["retry-after"] == "1" and refused[2]["error"]["code"] == "too_many_requests"
        assert http("GET", server.url + "/ready", headers=server.auth())[0] == 200
    finally:
        server.stop()
