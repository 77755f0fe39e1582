"""The Azure ML path, offline: --dry-run YAML read back by azure-ai-ml's own loaders, named errors for
missing settings, the job's command run locally, and the scoring script's protocol."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from azure.ai.ml import (
    load_compute,
    load_environment,
    load_job,
    load_model,
    load_online_deployment,
    load_online_endpoint,
)
from support import BIN, REPO, run_cli


AZURE_ENV = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZUREML_WORKSPACE_NAME",
    "AZURE_LOCATION",
    "AZUREML_IDENTITY_ID",
)
IDENTITY = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/phi"


@pytest.fixture
def cli(capsys, monkeypatch):
    """`finetune-phi ARGS` in this process (support.run_cli), with no Azure setting from the shell."""

    def run(*args, cwd=None, env=None):
        for var in AZURE_ENV:
            monkeypatch.delenv(var, raising=False)
        for var, value in (env or {}).items():
            monkeypatch.setenv(var, value)
        if cwd:
            monkeypatch.chdir(cwd)
        return run_cli(capsys, *args)

    return run


@pytest.fixture(scope="module")
def train_dry_run(sample_data, tmp_path_factory):
    """The Azure training job's dry run, by the console script in a process of its own, as a user runs it."""
    out = tmp_path_factory.mktemp("dry") / "train"
    clean = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
    done = subprocess.run(
        [
            str(BIN / "finetune-phi"),
            "train",
            "--target",
            "azure",
            "--dry-run",
            "--dry-run-dir",
            str(out),
            "--data",
            str(sample_data),
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--epochs",
            "2",
            "--lora",
            "--base-model",
            "microsoft/Phi-3-mini-4k-instruct",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
        cwd=tmp_path_factory.mktemp("cwd"),
    )  # no settings, no credentials
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_training_job_yaml_round_trips_with_distribution_and_data(train_dry_run, sample_data):
    out, printed = train_dry_run
    job = load_job(out / "job.yml")
    assert job.type == "command" and job.resources.instance_count == 2
    assert job.distribution.type == "pytorch" and job.distribution.process_count_per_instance == 4
    assert job.compute == "finetune-phi-gpu"
    assert {k: (i.type, i.path) for k, i in job.inputs.items()} == {
        "train_file": ("uri_file", str(sample_data / "train.jsonl")),
        "eval_file": ("uri_file", str(sample_data / "test.jsonl")),
    }
    assert job.outputs["model"].type == "uri_folder"
    assert job.command.startswith(
        "python training/fine_tune.py --train-file ${{inputs.train_file}} "
        "--eval-file ${{inputs.eval_file}} --model_output_dir ${{outputs.model}}"
    )
    assert "--base-model microsoft/Phi-3-mini-4k-instruct" in job.command and "--lora" in job.command
    assert str(job.code) == str(REPO) and job.environment.image.startswith("mcr.microsoft.com/azureml/")
    assert "job.yml" in printed and "instance_count: 2" in printed


@pytest.mark.slow
def test_environment_and_compute_yaml_round_trip(train_dry_run):
    out, _ = train_dry_run
    env = load_environment(out / "environment.yml")
    pins = env.conda_file["dependencies"][-1]["pip"]
    assert "trl==1.16.0" in pins and any(p.startswith("azureml-mlflow==") for p in pins)
    compute = load_compute(out / "compute.yml")
    assert compute.size == "Standard_NC24ads_A100_v4" and compute.max_instances == 2 and compute.min_instances == 0


def test_blue_green_deployment_yaml_round_trips(cli, tiny_model, tmp_path):
    out = tmp_path / "deploy"
    done = cli(
        "deploy",
        "--target",
        "azure",
        "--dry-run",
        "--dry-run-dir",
        str(out),
        "--model",
        str(tiny_model),
        "--endpoint-name",
        "phi-ep",
        "--deployment-name",
        "green",
        "--traffic",
        "green=10",
        "--traffic",
        "blue=90",
        "--instance-type",
        "Standard_NC24ads_A100_v4",
        "--instance-count",
        "2",
        "--max-concurrent-requests",
        "4",
        "--request-timeout-ms",
        "60000",
        "--max-queue-wait-ms",
        "1000",
        "--identity",
        IDENTITY,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    endpoint = load_online_endpoint(out / "endpoint.yml")
    assert endpoint.name == "phi-ep" and endpoint.auth_mode == "key" and endpoint.traffic == {"green": 10, "blue": 90}
    assert endpoint.identity.type == "user_assigned"
    assert endpoint.identity.user_assigned_identities[0].resource_id == IDENTITY
    dep = load_online_deployment(out / "deployment.yml")
    assert (dep.name, dep.endpoint_name, dep.instance_type, dep.instance_count) == (
        "green",
        "phi-ep",
        "Standard_NC24ads_A100_v4",
        2,
    )
    rs = dep.request_settings
    assert (rs.max_concurrent_requests_per_instance, rs.request_timeout_ms, rs.max_queue_wait_ms) == (4, 60000, 1000)
    assert dep.liveness_probe.initial_delay >= 300 and dep.readiness_probe.period > 0
    assert dep.code_configuration.scoring_script == "deploy/score.py"
    assert "cuda" in dep.environment.image  # a GPU VM size gets a CUDA base image
    model = load_model(out / "model.yml")
    assert model.type == "custom_model" and model.path == str(tiny_model)


def test_deploy_defaults_send_all_traffic_to_the_new_deployment(cli, tmp_path):
    done = cli(
        "deploy",
        "--dry-run",
        "--dry-run-dir",
        str(tmp_path),
        "--model",
        "job:sharp_boat_123",
        "--instance-type",
        "Standard_E4s_v3",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_online_endpoint(tmp_path / "endpoint.yml").traffic == {"ft": 100}
    assert load_model(tmp_path / "model.yml").path == "azureml://jobs/sharp_boat_123/outputs/model"
    assert "cpu-inference" in load_online_deployment(tmp_path / "deployment.yml").environment.image


def test_deploy_with_the_quantized_engine_takes_an_export_and_a_cpu_vm(cli, tiny_model, tmp_path, monkeypatch):
    # a folder that is not an export is exported first; with the exporter named and missing, one line says so
    monkeypatch.setenv("FINETUNE_PHI_OPENVINO_EXPORTER", str(tmp_path / "no-exporter"))
    done = cli(
        "deploy",
        "--dry-run",
        "--dry-run-dir",
        str(tmp_path / "refused"),
        "--model",
        str(tiny_model),
        "--engine",
        "openvino",
    )
    assert done.returncode == 2 and "needs optimum-intel's exporter" in done.stderr, done.stderr
    export = tmp_path / "export"  # what the deploy command checks of an export; serving it: test_azure_server.py
    export.mkdir()
    for name in ("config.json", "openvino_model.xml", "openvino_model.bin"):
        (export / name).write_text("{}")
    done = cli(
        "deploy", "--dry-run", "--dry-run-dir", str(tmp_path / "yaml"), "--model", str(export), "--engine", "openvino"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dep = load_online_deployment(tmp_path / "yaml" / "deployment.yml")
    assert dep.environment_variables["FINETUNE_PHI_ENGINE"] == "openvino"
    assert dep.instance_type == "Standard_E4s_v3" and "cpu-inference" in dep.environment.image
    assert "openvino-genai" in (REPO / "deploy" / "conda.yml").read_text()  # the scoring environment has the engine


@pytest.mark.parametrize(
    "args, message",
    [
        (["--traffic", "ft=10", "--traffic", "blue=80"], "must add up to 100"),
        (["--traffic", "ft=ten", "--traffic", "blue=90"], "integer from 0 to 100"),
        (["--instance-count", "0"], "--instance-count: 0 is too small: give at least 1"),
    ],
)
def test_bad_deploy_flags_are_named(cli, tiny_model, tmp_path, args, message):
    done = cli("deploy", "--dry-run", "--dry-run-dir", str(tmp_path), "--model", str(tiny_model), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--target", "azure"],
        ["deploy", "--target", "azure", "--model", "job:x"],
        ["delete", "--target", "azure", "--yes"],
        ["connect", "--target", "azure", "--endpoint-name", "phi-ep"],
    ],
)
def test_missing_settings_are_named_with_how_to_set_them(cli, command, sample_data, tmp_path):
    if command[0] == "train":
        command = command + ["--data", str(sample_data)]
    done = cli(*command, cwd=tmp_path, env={"AZURE_SUBSCRIPTION_ID": "0000"})
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert "resource_group" in err and "--resource-group" in err and "AZURE_RESOURCE_GROUP" in err
    assert "missing Azure setting(s) resource_group, workspace (" in err and "AZUREML_WORKSPACE_NAME" in err
    assert "Traceback" not in err


def test_settings_come_from_a_dotenv_file_but_the_shell_wins(tmp_path, monkeypatch):
    from finetune_phi.azureml.settings import AzureSettings

    for var in AZURE_ENV:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / ".env").write_text("AZURE_SUBSCRIPTION_ID=from-dotenv\nAZURE_RESOURCE_GROUP=rg-dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "rg-shell")
    s = AzureSettings.load(workspace="ws-flag")
    assert (s.subscription_id, s.resource_group, s.workspace) == ("from-dotenv", "rg-shell", "ws-flag")


def test_delete_needs_confirmation(cli):
    done = cli("delete", "--target", "azure", "--endpoint-name", "phi-ep")
    assert done.returncode == 2 and "--yes" in done.stderr


@pytest.mark.slow
def test_the_jobs_command_line_runs_locally_on_the_tiny_model(train_dry_run, sample_data, tmp_path):
    """The very command the Azure job runs (training/fine_tune.py, the tutorial's entry point), with its
    inputs/outputs bound to local paths and no MLFLOW_TRACKING_URI: SQLite in the working directory."""
    out, _ = train_dry_run
    command = load_job(out / "job.yml").command
    # 64 conversations to train on (4 steps) and 16 held out: enough to show the job trains, registers and saves
    for name, n in (("train", 64), ("test", 16)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join((sample_data / f"{name}.jsonl").read_text().splitlines(keepends=True)[:n])
        )
    bound = (
        command.replace("${{inputs.train_file}}", shlex.quote(str(tmp_path / "train.jsonl")))
        .replace("${{inputs.eval_file}}", shlex.quote(str(tmp_path / "test.jsonl")))
        .replace("${{outputs.model}}", shlex.quote(str(tmp_path / "model")))
    )
    # the dry run asked for Phi-3-mini from the hub; locally the job's flags run on the tiny model
    bound = bound.replace("microsoft/Phi-3-mini-4k-instruct", "tiny").replace("--epochs 2.0", "--epochs 1")
    assert bound.startswith("python training/fine_tune.py ")
    script = shlex.quote(str(REPO / "training" / "fine_tune.py"))
    # mlflow.set_tracking_uri/set_registry_uri in this process export MLFLOW_* to children: drop them all
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        f"{shlex.quote(sys.executable)} {script} {bound.removeprefix('python training/fine_tune.py ')}",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "adapter").is_dir()  # --lora
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    assert "registered:   models:/finetune-phi/1" in done.stdout


@pytest.mark.slow
def test_scoring_script_speaks_the_endpoint_protocol(trained, monkeypatch):
    import importlib.util

    monkeypatch.setenv("AZUREML_MODEL_DIR", str(trained.out.parent))  # Azure mounts the registered folder below
    spec = importlib.util.spec_from_file_location("score", REPO / "deploy" / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    score.init()
    status, body = score.handle(
        json.dumps(
            {
                "input_data": {
                    "input_string": [{"role": "user", "content": "Say hello to Maya."}],
                    "parameters": {"temperature": 0},
                }
            }
        )
    )
    assert status == 200 and body["output"].startswith("Hello Maya")
    status, body = score.handle(
        json.dumps(
            {
                "input_data": ["<|user|>\nHi<|end|>\n<|assistant|>\n"],
                "params": {"max_new_tokens": 4, "return_full_text": False},
            }
        )
    )
    assert status == 200 and isinstance(body, list) and len(body) == 1
    assert score.handle("{oops")[0] == 400
    status, body = score.handle(json.dumps({"input_data": ["x"], "params": {"max_new_tokens": 0}}))
    assert status == 400 and body["error"]["code"] == "invalid_parameter"


def test_the_job_and_deployment_code_snapshot_leaves_every_venv_out(tmp_path):
    """azure-ai-ml uploads `code:` (the repo) minus what its root ignore file names: the venvs next to the
    code (.venv 2.5 GB, .venv-openvino-export 2.4 GB, .venv-azml, .venv-maf) must never travel with a job."""
    import shutil

    from azure.ai.ml._utils._asset_utils import get_directory_size, get_ignore_file

    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    for venv in (".venv", ".venv-maf", ".venv-azml", ".venv-openvino-export"):
        (tmp_path / venv / "lib").mkdir(parents=True)
        (tmp_path / venv / "lib" / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / "finetune_phi").mkdir()
    (tmp_path / "finetune_phi" / "cli.py").write_text("code")
    size, files = get_directory_size(tmp_path, get_ignore_file(tmp_path))
    assert sorted(os.path.relpath(f, tmp_path) for f in files) == [".gitignore", "finetune_phi/cli.py"]
