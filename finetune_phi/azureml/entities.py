"""The azure-ai-ml entities finetune-phi creates, built in one place.

`--dry-run` dumps exactly these objects as YAML and the real run submits the same objects, so what
a user reviews is what Azure receives. The job runs `training/fine_tune.py`, the very entry the
local `finetune-phi train` uses; the deployment serves `deploy/score.py`, which speaks the local
endpoint's /score protocol through the same code (finetune_phi.serving.azure_protocol).
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
from pathlib import Path

from .. import project
from ..errors import UserError
from ..modeling import export
from ..serving.engines.base import DEFAULT_ENGINE
from .options import CPU_VM, ENDPOINT_NAME, GPU_VM, DeployOptions


# azure-ai-ml warns "experimental class" for schemas it uses internally on every dump: noise to a user
logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)

COMPUTE_PRESETS = {"gpu": GPU_VM, "cpu": CPU_VM}
TRAIN_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
SERVE_IMAGE_CPU = "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py39-cpu-inference:latest"
MODEL_NAME = ENDPOINT_NAME  # the registered model asset


def compute_size(size: str) -> str:
    """A preset name (gpu, cpu) or any VM size."""
    return COMPUTE_PRESETS.get(size, size)


def training_environment(image: str = TRAIN_IMAGE):
    from azure.ai.ml.entities import Environment

    return Environment(
        name="finetune-phi-train",
        image=image,
        conda_file=str(project.root() / "conda.yml"),
        description="finetune-phi training: torch, transformers, trl, peft, mlflow (conda.yml)",
    )


def serving_image(instance_type: str) -> str:
    """A CUDA base image for GPU VM sizes (NC/ND/NV families), the minimal CPU inference image otherwise."""
    family = instance_type.removeprefix("Standard_").upper()
    return TRAIN_IMAGE if family.startswith(("NC", "ND", "NV")) else SERVE_IMAGE_CPU


def serving_environment(image: str):
    from azure.ai.ml.entities import Environment

    return Environment(
        name="finetune-phi-serve",
        image=image,
        conda_file=str(project.root() / "deploy" / "conda.yml"),
        description="finetune-phi scoring: torch, transformers, azureml-inference-server-http",
    )


def compute(
    name: str,
    size: str = "gpu",
    max_nodes: int = 1,
    min_nodes: int = 0,
    idle_seconds: int = 1800,
    location: str | None = None,
):
    from azure.ai.ml.entities import AmlCompute

    if max_nodes < 1 or min_nodes < 0 or min_nodes > max_nodes:
        raise UserError(f"compute {name}: need 0 <= min nodes ({min_nodes}) <= max nodes ({max_nodes}), max >= 1")
    # min 0 + idle scale-down: an A100 node costs dollars an hour, so nothing runs while idle
    return AmlCompute(
        name=name,
        size=compute_size(size),
        min_instances=min_nodes,
        max_instances=max_nodes,
        idle_time_before_scale_down=idle_seconds,
        tier="dedicated",
        location=location,
    )


def data_input(path: str):
    """A uri_file input: a local file (uploaded at submit) or an azureml:/https:/abfss: URI as given."""
    from azure.ai.ml import Input

    if "://" in path or path.startswith("azureml:"):
        return Input(type="uri_file", path=path)
    local = Path(path)
    if not local.is_file():
        raise UserError(f"{path}: no such data file (make it with `finetune-phi data`)")
    return Input(type="uri_file", path=str(local.resolve()))


# settings the job's command binds to its inputs and output instead of passing them on
BOUND_BY_JOB = ("data", "train_file", "eval_file", "out")


def training_job(
    cfg,
    compute_name: str,
    environment,
    nodes: int = 1,
    gpus_per_node: int = 1,
    experiment: str = "finetune-phi",
    display_name: str | None = None,
    env_vars: dict | None = None,
):
    """A command job running training/fine_tune.py with the settings of `cfg` (a TrainConfig): its data
    files become the job's inputs, its output folder the job's output, everything else the flags
    `cfg.to_args()` writes. Several processes -> PyTorch distribution (DDP via torchrun)."""
    from azure.ai.ml import Output, PyTorchDistribution
    from azure.ai.ml.entities import CommandJob, JobResourceConfiguration

    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be at least 1")
    cfg = cfg.with_data_files()
    command = (
        "python training/fine_tune.py --train-file ${{inputs.train_file}} --eval-file ${{inputs.eval_file}} "
        "--model_output_dir ${{outputs.model}}"
    )
    train_args = cfg.to_args(exclude=BOUND_BY_JOB)
    if train_args:
        command += " " + shlex.join(train_args)
    distributed = nodes * gpus_per_node > 1
    return CommandJob(
        code=str(project.root()),  # the repo snapshot (minus .gitignore'd paths): the same code as local runs
        command=command,
        inputs={"train_file": data_input(cfg.train_file), "eval_file": data_input(cfg.eval_file)},
        outputs={"model": Output(type="uri_folder")},
        environment=environment,
        compute=compute_name,
        resources=JobResourceConfiguration(instance_count=nodes),
        distribution=PyTorchDistribution(process_count_per_instance=gpus_per_node) if distributed else None,
        experiment_name=experiment,
        display_name=display_name or "finetune-phi-sft",
        environment_variables={
            "MLFLOW_EXPERIMENT_NAME": experiment,
            "TOKENIZERS_PARALLELISM": "false",
            **(env_vars or {}),
        },
    )


def model_asset(source: str, name: str = MODEL_NAME, engine: str = DEFAULT_ENGINE):
    """The model to serve: a finished job's output (job:NAME), a local folder, or an azureml:/azureml:// path.
    For the openvino engine a local folder that is not an export is exported first (cached by its content)."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    if source.startswith("job:"):
        path = f"azureml://jobs/{source.removeprefix('job:')}/outputs/model"
    elif "://" in source or source.startswith("azureml:"):
        path = source
    else:
        local = Path(source)
        if not (local / "config.json").exists():
            raise UserError(f"{source}: not a Hugging Face model folder (no config.json)")
        if engine == "openvino" and not export.is_openvino(local):
            local = export.cached_export(str(local))  # exported on first use, kept in the cache (export.cached_export)
        path = str(local.resolve())
    return Model(
        name=name,
        path=path,
        type=AssetTypes.CUSTOM_MODEL,
        description="Phi-3 fine-tuned with finetune-phi (Hugging Face folder)",
    )


def endpoint(name: str, identity: str | None = None, traffic: dict[str, int] | None = None):
    from azure.ai.ml.entities import (
        IdentityConfiguration,
        ManagedIdentityConfiguration,
        ManagedOnlineEndpoint,
    )

    ident = None
    if identity:
        ident = IdentityConfiguration(
            type="user_assigned", user_assigned_identities=[ManagedIdentityConfiguration(resource_id=identity)]
        )
    return ManagedOnlineEndpoint(
        name=name,
        auth_mode="key",
        identity=ident,
        traffic=traffic or {},
        description="finetune-phi scoring endpoint (/score, Bearer key)",
    )


def deployment(options: DeployOptions, model, environment, env_vars: dict | None = None):
    """The managed online deployment `options` describes (deploy/score.py on its VM size, with its request settings)."""
    from azure.ai.ml.entities import (
        CodeConfiguration,
        ManagedOnlineDeployment,
        OnlineRequestSettings,
        ProbeSettings,
    )

    # loading a multi-GB model takes minutes: give the probes room before they restart the container
    liveness = ProbeSettings(initial_delay=600, period=30, timeout=10, failure_threshold=30, success_threshold=1)
    readiness = ProbeSettings(initial_delay=30, period=10, timeout=10, failure_threshold=60, success_threshold=1)
    return ManagedOnlineDeployment(
        name=options.deployment_name,
        endpoint_name=options.endpoint_name,
        model=model,
        environment=environment,
        code_configuration=CodeConfiguration(code=str(project.root()), scoring_script="deploy/score.py"),
        instance_type=options.vm_size,
        instance_count=options.instance_count,
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=options.max_concurrent_requests_per_instance,
            request_timeout_ms=options.request_timeout_ms,
            max_queue_wait_ms=options.max_queue_wait_ms,
        ),
        liveness_probe=liveness,
        readiness_probe=readiness,
        environment_variables={"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})},
    )


def dump_all(entities: dict[str, object], folder: Path) -> dict[str, Path]:
    """Write each entity as the YAML azure-ai-ml's own schema produces (and its load_* functions read)."""

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entity in entities.items():
        # a copy: azure-ai-ml's identity schema rewrites the entity while serialising it (and then fails
        # on a second pass), and the entity itself must stay as the real run would submit it
        doc = _drop_nulls(json.loads(json.dumps(copy.deepcopy(entity)._to_dict())))
        for key, item in (getattr(entity, "inputs", None) or {}).items():
            path = getattr(item, "path", None)
            if isinstance(path, str) and Path(path).is_absolute():
                # the schema writes a local input as an asset reference ("azureml:/abs/path"), which
                # load_job would then read as one; keep the local path that submit uploads
                doc["inputs"][key]["path"] = path
        paths[name] = folder / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def _drop_nulls(value):
    """Unset fields come out as null, which the schema then refuses to load (e.g. an identity's
    principal_id, known only once Azure has created it): leave them out, as a hand-written file would."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value
