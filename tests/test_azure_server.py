"""deploy/score.py under Azure's own inference server (`azmlinfsrv`, azureml-inference-server-http from
deploy/conda.yml's pins, in .venv-azml: `make azmlinfsrv`), as a managed online deployment runs it.

AZUREML_MODEL_DIR is laid out as Azure mounts a registered model: azureml-models/NAME/VERSION, with the
registered folder below it (the server reads NAME:VERSION from that path for its telemetry).
"""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import REPO, Process, free_port, http
from test_real_model import (
    plain_generate,  # what transformers alone makes of the folder, greedy
)


AZMLINFSRV = REPO / ".venv-azml" / "bin" / "azmlinfsrv"
QUESTION = "Write one sentence about the sea."
NEW_TOKENS = 24
JSON = {"Content-Type": "application/json"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not AZMLINFSRV.exists(), reason=f"{AZMLINFSRV.relative_to(REPO)} is absent: `make azmlinfsrv` builds it"
    ),
]


@contextmanager
def azmlinfsrv(model_folder, root, engine: str | None = None):
    """deploy/score.py under azmlinfsrv with model_folder mounted as Azure mounts a registered model."""
    model_dir = root / "azureml-models" / "finetune-phi" / "1"
    model_dir.mkdir(parents=True)
    (model_dir / Path(model_folder).name).symlink_to(model_folder, target_is_directory=True)
    port = free_port()
    log = root / "azmlinfsrv.log"
    env = {**os.environ, "AZUREML_MODEL_DIR": str(model_dir), **({"FINETUNE_PHI_ENGINE": engine} if engine else {})}
    server = Process(
        [AZMLINFSRV, "--entry_script", REPO / "deploy" / "score.py", "--port", port], log, cwd=root, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for_url(
            url + "/", timeout=120
        )  # GET / is the server's health probe; init() has run once it answers
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
        yield url, log
    finally:
        server.stop(timeout=60)  # as Azure stops a deployment; gunicorn kills a worker still there after 30 s


@pytest.fixture(scope="module")
def azml(tiny_model, tmp_path_factory):
    with azmlinfsrv(tiny_model, tmp_path_factory.mktemp("azml")) as served:
        yield served


def test_both_score_shapes_answer_greedy_generate_text(azml, tiny_model):
    url, _ = azml
    expected, _ = plain_generate(tiny_model, QUESTION, NEW_TOKENS)
    messages = [{"role": "user", "content": QUESTION}]
    status, headers, chat = http(
        "POST",
        url + "/score",
        {"input_data": {"input_string": messages, "parameters": {"temperature": 0, "max_new_tokens": NEW_TOKENS}}},
        JSON,
    )
    assert status == 200 and headers["Content-Type"] == "application/json", chat
    assert chat == {"output": expected.strip()}

    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    status, headers, text = http(
        "POST",
        url + "/score",
        {
            "input_data": [prompt, prompt],
            "params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "return_full_text": False},
        },
        JSON,
    )
    assert status == 200 and headers["Content-Type"] == "application/json", text
    assert text == [expected.strip(), expected.strip()]
    status, _, full = http(
        "POST",
        url + "/score",
        {"input_data": [prompt], "params": {"temperature": 0, "max_new_tokens": NEW_TOKENS}},
        JSON,
    )
    assert status == 200 and isinstance(full, list) and full[0].startswith(prompt)  # return_full_text by default


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{oops", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"input_data": ["\\ud800 lone surrogate"]}', "invalid_json"),
        ({"input_data": ["Hi"], "params": {"temprature": 0.5}}, "invalid_parameter"),
        ({"input_data": ["Hi"], "params": {"max_new_tokens": 0}}, "invalid_parameter"),
        (
            {
                "input_data": {
                    "input_string": [{"role": "user", "content": "Hi"}],
                    "parameters": {"max_new_tokens": 100000},
                }
            },
            "invalid_parameter",
        ),
        ({"inputs": ["Hi"]}, "invalid_request"),
    ],
    ids=[
        "invalid-json",
        "nested-too-deeply",
        "lone-surrogate",
        "unknown-parameter",
        "max-new-tokens-0",
        "max-new-tokens-too-big",
        "no-input-data",
    ],
)
def test_refusals_are_the_local_servers_error_object(azml, body, code):
    """The object `finetune-phi serve` sends, not a JSON string holding it, and no traceback in the log."""
    url, log = azml
    before = log.read_text()
    status, headers, got = http("POST", url + "/score", body, JSON)
    assert status == 400 and headers["Content-Type"] == "application/json", got
    assert isinstance(got, dict) and set(got) == {"error"} and set(got["error"]) == {"code", "message"}, got
    assert got["error"]["code"] == code and isinstance(got["error"]["message"], str) and got["error"]["message"]
    if not isinstance(body, bytes):  # the same RequestError the local server turns into its body
        from finetune_phi.serving.azure_protocol import parse_score_request
        from finetune_phi.serving.request import RequestError

        with pytest.raises(RequestError) as refused:
            parse_score_request(body)
        assert got == refused.value.body()
    assert "Traceback" not in log.read_text()[len(before) :]
    assert headers.get("x-ms-run-function-failed") == "False"  # Azure counts it as the client's, not a failed run


def test_the_quantized_engine_serves_an_export_as_an_azure_deployment_would(tiny_export, tmp_path):
    """`finetune-phi deploy --engine openvino`: the deployment's FINETUNE_PHI_ENGINE and an exported folder,
    with deploy/conda.yml's openvino-genai; greedy answers as the openvino engine gives them locally."""
    from finetune_phi.serving.engines import load_engine
    from finetune_phi.serving.generation import DecodeRequest, GenerationParams

    engine = load_engine("openvino", str(tiny_export))
    try:
        messages = [{"role": "user", "content": QUESTION}]
        params = GenerationParams(max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = engine.run([DecodeRequest(engine.encode(engine.chat_prompt(messages), params), params)])[
            0
        ].text.strip()
    finally:
        engine.close()
    with azmlinfsrv(tiny_export, tmp_path, engine="openvino") as (url, log):
        status, _, chat = http(
            "POST",
            url + "/score",
            {"input_data": {"input_string": messages, "parameters": {"temperature": 0, "max_new_tokens": NEW_TOKENS}}},
            JSON,
        )
        # the export holds no PyTorch weights: only the openvino engine can have answered
        assert status == 200 and chat == {"output": expected}, chat
