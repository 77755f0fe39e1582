"""The endpoint under real traffic: batching, limits, the OpenAI API, streaming, fuzzing and load."""
import http.client as httpclient
import json
import subprocess
import threading
import time
from collections import Counter

import pytest

from conftest import BIN, REPO, Server, concurrent_posts, http

KEY = {"FINETUNE_PHI_API_KEY": "serving-test-key"}


# --- the decoding loop and the batcher, in process ----------------------------------------------

@pytest.fixture(scope="module")
def generator(trained):
    from finetune_phi import models
    from finetune_phi.generation import Generator

    return Generator(*models.load(str(trained.out)))


def rows_for(gen, questions, **params):
    from finetune_phi.generation import GenerationParams, Row

    p = GenerationParams.parse({"temperature": 0, **params}, return_full_text=False)
    return [Row(gen.encode(gen.chat_prompt([{"role": "user", "content": q}]), p), p) for q in questions]


QUESTIONS = ["Say hello to Maya.", "What is the capital of Peru?", "Hi", "Which noise does a cow make?",
             "What is 12 plus 30? Please answer in a full sentence, thank you very much."]


def test_batched_greedy_decoding_equals_one_request_at_a_time(generator):
    alone = [generator.run(rows_for(generator, [q]))[0].text for q in QUESTIONS]
    together = [c.text for c in generator.run(rows_for(generator, QUESTIONS))]  # prompts of different lengths
    assert together == alone
    assert alone[0].startswith("Hello Maya")


def test_each_row_keeps_its_own_settings_inside_a_batch(generator):
    from finetune_phi.generation import GenerationParams

    short, stopped, free = rows_for(generator, QUESTIONS[:3])
    short.params = GenerationParams.parse({"temperature": 0, "max_new_tokens": 2})
    stopped.params = GenerationParams.parse({"temperature": 0, "stop": [" of"]})
    out = generator.run([short, stopped, free])
    assert out[0].finish_reason == "length" and out[0].completion_tokens == 2
    assert out[1].text == "The capital" and out[1].finish_reason == "stop"  # cut before the stop string
    assert out[2].finish_reason == "stop" and out[2].completion_tokens > 2


def test_batcher_groups_concurrent_requests(generator):
    from finetune_phi.batching import Batcher

    batcher = Batcher(generator, max_batch_size=8, window_ms=200)
    try:
        futures = [batcher.submit(r) for r in rows_for(generator, QUESTIONS * 2)]
        results = [f.result(timeout=60) for f in futures]
        assert batcher.rows == 10 and batcher.batches <= 3  # 10 requests in at most 3 decoding passes
        assert results[0].text == results[5].text  # the same question in two batches, the same answer
    finally:
        batcher.close()


def test_streamed_pieces_add_up_to_the_answer(generator):
    pieces = []
    (row,) = rows_for(generator, ["Say hello to Maya."], stop=["meet"])
    row.on_text = pieces.append
    (done,) = generator.run([row])
    assert len(pieces) > 3 and "".join(pieces) == done.text == "Hello Maya! It is great to "


# --- the server: OpenAI API, streaming, auth, limits --------------------------------------------

@pytest.fixture(scope="module")
def server(trained, tiny_model, test_root):
    s = Server(["--deployment", f"ft={trained.out}", "--deployment", f"base={tiny_model}", "--max-new-tokens-cap", "64",
                "--max-body-bytes", "28000"], test_root / "serve-serving.log", env=KEY)
    yield s
    s.stop()
    assert s.key not in s.log.read_text()  # keys never reach the log


def test_openai_client_chat_completion(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key)
    reply = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Say hello to Maya."}],
                                           temperature=0)
    assert reply.choices[0].message.content == "Hello Maya! It is great to meet you."
    assert reply.choices[0].finish_reason == "stop" and reply.model == "ft"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    cut = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Say hello to Maya."}],
                                         temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == ["ft", "base"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()


def test_openai_client_streams(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key)
    stream = client.chat.completions.create(model="ft", messages=[{"role": "user", "content": "Say hello to Maya."}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello Maya! It is great to meet you."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # token by token, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 3


def test_prompt_flow_llm_tool_through_an_openai_connection(server, pf_home, tmp_path):
    from promptflow.client import PFClient
    from promptflow.entities import OpenAIConnection

    PFClient().connections.create_or_update(OpenAIConnection(name="finetune_phi_openai", api_key=server.key,
                                                             base_url=server.url + "/v1"))
    done = subprocess.run([str(BIN / "pf"), "flow", "test", "--flow", str(REPO / "tests" / "flows" / "llm_chat"),
                           "--inputs", "question=Say hello to Maya."], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"answer": "Hello Maya! It is great to meet you."' in done.stdout


def test_every_route_but_health_needs_the_key(server):
    for method, path in (("GET", "/ready"), ("GET", "/v1/models"), ("POST", "/score"), ("POST", "/v1/chat/completions")):
        status, _, body = http(method, server.url + path, {} if method == "POST" else None)
        assert status == 401 and server.key not in json.dumps(body), path
    assert http("GET", server.url + "/health")[0] == 200


@pytest.mark.parametrize("body, status, code, words", [
    ({"input_data": ["x" * 30000]}, 413, "body_too_large", ["limit is 28000"]),
    ({"input_data": ["x"], "params": {"max_new_tokens": 65}}, 400, "invalid_parameter", ["from 1 to 64"]),
    ({"input_data": ["word " * 5000]}, 400, "context_length_exceeded", ["prompt has 5002 tokens", "context of 4096 tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "unsupported_parameter", ["n=2"]),
])
def test_limits_answer_with_clear_json_errors(server, body, status, code, words):
    path = "/v1/chat/completions" if "messages" in body else "/score"
    got, _, answer = http("POST", server.url + path, body, server.auth())
    assert (got, answer["error"]["code"]) == (status, code)
    assert all(w in answer["error"]["message"] for w in words)


def stream_request(url: str, key: str, body: dict):
    host, port = url.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_queue_wait_over_the_limit_is_408(tiny_model, test_root):
    s = Server(["--deployment", f"only={tiny_model}", "--max-batch-size", "1", "--max-queue-wait-ms", "100"],
               test_root / "serve-queue.log", env=KEY)
    try:
        long = {"input_data": ["x"], "params": {"max_new_tokens": 400, "do_sample": False}}
        results = concurrent_posts(s.url + "/score", long, s.auth(), 3)
        codes = Counter(r[0] for r in results)
        assert codes[200] >= 1 and codes[408] >= 1, codes
        assert all(r[2]["error"]["code"] == "queue_timeout" for r in results if r[0] == 408)
    finally:
        s.stop()


def test_timeouts_and_disconnects_never_hang_or_leak_capacity(tiny_model, test_root):
    s = Server(["--deployment", f"only={tiny_model}", "--request-timeout-ms", "800", "--max-concurrent-requests", "1"],
               test_root / "serve-timeout.log", env=KEY)
    try:
        t = time.time()
        status, _, body = http("POST", s.url + "/score", {"input_data": ["x"], "params": {"max_new_tokens": 1024, "do_sample": False}},
                               s.auth())
        assert (status, body["error"]["code"]) == (503, "request_timeout") and time.time() - t < 5

        # a client that hangs up mid-stream: its slot must come back (max 1 in flight here)
        conn, response = stream_request(s.url, s.key, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000})
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.sock.close()
        conn.close()
        deadline, status = time.time() + 10, None
        while time.time() < deadline and status != 200:
            status = http("POST", s.url + "/score", {"input_data": ["x"], "params": {"max_new_tokens": 2}}, s.auth())[0]
            time.sleep(0.2)
        assert status == 200
        assert http("GET", s.url + "/ready", headers=s.auth())[0] == 200
    finally:
        s.stop()


def test_chat_flow_streams_through_pf_flow_serve(connected, test_root):
    from conftest import free_port

    port = free_port()
    flow = subprocess.Popen([str(BIN / "pf"), "flow", "serve", "--source", str(REPO / "flows" / "chat"), "--host",
                             "127.0.0.1", "--port", str(port), "--skip-open-browser"],
                            stdout=(test_root / "pf-stream.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/score", json.dumps({"question": "Say hello to Maya.", "deployment": "ft"}),
                     {"Content-Type": "application/json", "Accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for line in response:
            if line.startswith(b"data: "):
                events.append((time.perf_counter(), json.loads(line[6:])["answer"]))
        assert len(events) > 3  # incrementally, not one event
        assert "".join(e[1] for e in events).startswith("Hello Maya")
        assert events[-1][0] - events[0][0] > 0  # the first piece arrived before the last
    finally:
        flow.terminate()
        flow.wait(timeout=30)


# --- abuse: fuzzing and load ---------------------------------------------------------------------

def test_fuzzed_requests_never_get_a_5xx(tiny_model, test_root):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s = Server(["--deployment", f"only={tiny_model}", "--max-new-tokens-cap", "4"], test_root / "serve-fuzz.log", env=KEY)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                               max_leaves=10)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot", 3]),
                                     "content": st.text(max_size=40) | json_values})
    params = st.dictionaries(st.sampled_from(["max_new_tokens", "max_tokens", "temperature", "top_p", "do_sample",
                                              "return_full_text", "stop", "bogus"]),
                             st.integers(-5, 10) | st.floats(-1, 3, allow_nan=False) | st.booleans() | st.text(max_size=5)
                             | st.lists(st.text(max_size=3), max_size=5), max_size=4)
    score_bodies = (json_values
                    | st.fixed_dictionaries({"input_data": st.lists(st.text(max_size=30), max_size=3) | json_values,
                                             "params": params})
                    | st.fixed_dictionaries({"input_data": st.fixed_dictionaries({"input_string": st.lists(message, max_size=3),
                                                                                  "parameters": params})}))
    chat_bodies = json_values | st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3) | json_values, "model": st.sampled_from(["only", "x", None, 5]),
         "stream": st.booleans() | st.integers(), "max_tokens": st.integers(-2, 8) | st.text(max_size=3),
         "temperature": st.floats(-1, 3, allow_nan=False) | st.text(max_size=3)})
    seen = Counter()

    def check(path, body, raw=False):
        status, _, answer = http("POST", s.url + path, body if raw else json.dumps(body).encode(), s.auth(), timeout=30)
        seen[status] += 1
        assert status < 500, (path, body, answer)

    run = settings(max_examples=550, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    try:
        run(given(score_bodies)(lambda body: check("/score", body)))()
        run(given(chat_bodies)(lambda body: check("/v1/chat/completions", body)))()
        settings(max_examples=100, deadline=None, database=None)(given(st.binary(max_size=200))(
            lambda raw: check("/score", raw, raw=True)))()
        assert sum(seen.values()) >= 1000 and seen[200] > 0 and seen[400] > 0
        assert http("GET", s.url + "/ready", headers=s.auth())[0] == 200
    finally:
        s.stop()


def test_64_clients_for_30_seconds_get_200_or_429_and_the_server_stays_ready(server):
    statuses = Counter()
    lock = threading.Lock()
    stop = time.time() + 30

    def client(i):
        while time.time() < stop:
            if i % 2:
                body, path = {"input_data": {"input_string": [{"role": "user", "content": f"Say hello to {i}."}],
                                             "parameters": {"max_new_tokens": 8}}}, "/score"
            else:
                body, path = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": i % 4 == 0}, "/v1/chat/completions"
            try:
                status = http("POST", server.url + path, body, server.auth(), timeout=60)[0]
            except OSError as e:  # a refused or dropped connection is a failure too
                status = type(e).__name__
            with lock:
                statuses[status] += 1
            if status == 429:
                time.sleep(0.1)  # retry soon, but not in a hot loop that only measures the test's own CPU use

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 100
    assert http("GET", server.url + "/ready", headers=server.auth())[0] == 200
