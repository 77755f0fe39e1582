"""Azure ML online-deployment scoring script: the local endpoint's /score protocol, same code.

Azure ML's inference server calls init() once and run(raw_body) per request. Parsing, parameters
and generation come from finetune_phi (serving/: request.py, azure_protocol.py, engines/), exactly as `finetune-phi serve`.
Authentication, traffic and the azureml-model-deployment header are handled by Azure ML itself.
"""

import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the deployment's code snapshot is the repo

from finetune_phi.serving.azure_protocol import parse_score_request, run_score
from finetune_phi.serving.request import RequestError, parse_json


engine = None


def find_model_dir(root: Path) -> Path:
    """AZUREML_MODEL_DIR holds the registered folder one or two levels down; find its config.json."""
    for candidate in [
        root,
        *sorted(p.parent for p in root.glob("*/config.json")),
        *sorted(p.parent for p in root.glob("*/*/config.json")),
    ]:
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no Hugging Face model folder (config.json) under {root}")


def init():
    global engine
    from finetune_phi.serving.engines.base import DEFAULT_ENGINE, load_engine

    model_dir = find_model_dir(Path(os.environ["AZUREML_MODEL_DIR"]))
    # FINETUNE_PHI_ENGINE picks the engine as `finetune-phi serve --engine` does (set it in the deployment's environment_variables)
    engine = load_engine(os.environ.get("FINETUNE_PHI_ENGINE", DEFAULT_ENGINE), str(model_dir))


def handle(raw_data) -> tuple[int, object]:
    """(HTTP status, JSON body) for one request body."""
    try:
        # the local server's checks: bad JSON, nesting too deep, lone surrogates -> 400, not the inference server's 500
        payload = parse_json(raw_data) if isinstance(raw_data, (str, bytes)) else raw_data
        shape, inputs, params = parse_score_request(payload)
        return 200, run_score(engine, shape, inputs, params)
    except RequestError as e:
        return e.status, e.body()


def run(raw_data):
    """The server JSON-encodes what run() returns as the 200 body; a refusal needs its own status, so it
    goes back as an AMLResponse. json_str=True means "json.dumps this object" (aml_response.py), so the
    body goes in as the dict itself: the same {"error": {"code", "message"}} object `finetune-phi serve` sends."""
    from azureml_inference_server_http.api.aml_response import AMLResponse  # the inference server provides it

    status, body = handle(raw_data)
    return body if status == 200 else AMLResponse(body, status, json_str=True)
