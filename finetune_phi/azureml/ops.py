"""`--target azure`: submit training, deploy, delete and connect through azure-ai-ml.

Each command builds its entities (entities.py) first; `--dry-run` writes and prints their YAML
and stops there, needing no credentials. Otherwise the same objects are submitted.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import entities
from .options import DeployOptions
from .settings import AzureSettings


def _show(paths: dict[str, Path]):
    for name, path in paths.items():
        print(f"--- {name}: {path}")
        print(path.read_text().rstrip())
    print("\n(dry run: nothing was created; the YAML above loads with azure-ai-ml's load_* functions)")


def _get_or_none(getter, name):
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return getter(name)
    except ResourceNotFoundError:
        return None


def train(settings: AzureSettings, cfg, job):
    """Submit the training run `cfg` (a TrainConfig) as an Azure ML command job, as `job` (AzureJobOptions) says."""
    env = entities.training_environment(job.image or entities.TRAIN_IMAGE)
    cluster = entities.compute(job.compute, job.compute_size, max_nodes=job.nodes, location=settings.location)
    command_job = entities.training_job(cfg, job.compute, env, job.nodes, job.gpus_per_node, job.experiment)
    if job.dry_run:
        _show(entities.dump_all({"environment": env, "compute": cluster, "job": command_job}, Path(job.dry_run_dir)))
        return None
    ml = settings.ml_client()
    existing = _get_or_none(ml.compute.get, job.compute)
    if existing is None:
        print(f"creating compute {job.compute} ({cluster.size}, 0-{job.nodes} nodes)...", flush=True)
        ml.compute.begin_create_or_update(cluster).result()
    elif existing.max_instances < job.nodes:
        raise UserError(f"compute {job.compute} scales to {existing.max_instances} nodes; the job needs {job.nodes}")
    submitted = ml.jobs.create_or_update(command_job)
    print(f"submitted job {submitted.name}\nstudio: {submitted.studio_url}")
    print(f"next: finetune-phi deploy --target azure --model job:{submitted.name}")
    if job.stream:
        ml.jobs.stream(submitted.name)
    return submitted


def deploy(settings: AzureSettings, options: DeployOptions):
    """Register the model, create the endpoint if missing, create or update the deployment, then move traffic."""
    endpoint_name, deployment_name, traffic = options.endpoint_name, options.deployment_name, options.traffic_split()
    model = entities.model_asset(options.model, engine=options.engine)
    env = entities.serving_environment(options.image or entities.serving_image(options.vm_size))
    ep = entities.endpoint(endpoint_name, settings.identity, traffic)
    dep = entities.deployment(options, model, env, env_vars={"FINETUNE_PHI_ENGINE": options.engine})
    if options.dry_run:
        _show(
            entities.dump_all(
                {"model": model, "environment": env, "endpoint": ep, "deployment": dep}, Path(options.dry_run_dir)
            )
        )
        return None
    ml = settings.ml_client()
    registered = ml.models.create_or_update(model)
    print(f"registered model {registered.name}:{registered.version}", flush=True)
    dep.model = registered.id
    current = _get_or_none(ml.online_endpoints.get, endpoint_name)
    if current is None:
        print(f"creating endpoint {endpoint_name}...", flush=True)
        ep.traffic = {}  # traffic moves only once the deployment exists
        ml.online_endpoints.begin_create_or_update(ep).result()
        current = ml.online_endpoints.get(endpoint_name)
    unknown = set(traffic) - set(current.traffic or {}) - {deployment_name}
    if unknown:
        raise UserError(f"--traffic names deployments that endpoint {endpoint_name} does not have: {sorted(unknown)}")
    print(
        f"creating deployment {deployment_name} ({options.instance_count} x {options.vm_size}); this takes minutes...",
        flush=True,
    )
    ml.online_deployments.begin_create_or_update(dep).result()
    current.traffic = traffic
    ml.online_endpoints.begin_create_or_update(current).result()
    print(f"traffic now {traffic}; scoring URI {current.scoring_uri}")
    print(f"next: finetune-phi connect --target azure --endpoint-name {endpoint_name}")
    return current


def delete(settings: AzureSettings, endpoint_name: str, deployment_name: str | None, dry_run: bool):
    what = (
        f"deployment {deployment_name} of endpoint {endpoint_name}"
        if deployment_name
        else f"endpoint {endpoint_name} and all its deployments"
    )
    if dry_run:
        print(f"(dry run) would delete {what}")
        return
    ml = settings.ml_client()
    if deployment_name:
        ep = ml.online_endpoints.get(endpoint_name)
        if (ep.traffic or {}).get(deployment_name, 0) > 0:
            raise UserError(
                f"deployment {deployment_name} still takes {ep.traffic[deployment_name]}% of traffic; "
                "move it first (finetune-phi deploy ... --traffic)"
            )
        ml.online_deployments.begin_delete(name=deployment_name, endpoint_name=endpoint_name).result()
    else:
        ml.online_endpoints.begin_delete(name=endpoint_name).result()
    print(f"deleted {what}")


def endpoint_url_and_key(settings: AzureSettings, endpoint_name: str) -> tuple[str, str]:
    """The endpoint's scoring URI and primary key (the key stays in memory, for the connection's secret)."""
    ml = settings.ml_client()
    return ml.online_endpoints.get(endpoint_name).scoring_uri, ml.online_endpoints.get_keys(endpoint_name).primary_key
