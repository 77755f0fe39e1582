"""MLflow tracking and the model registry: a local SQLite store by default.

MLflow's own variables are read when a run starts, never at import: MLFLOW_TRACKING_URI overrides
the store (an Azure ML workspace's URI, a server; otherwise runs go to sqlite:///mlflow.db and
artifacts to ./mlruns in the working directory), MLFLOW_REGISTRY_URI the registry,
MLFLOW_EXPERIMENT_NAME the experiment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..files import follow_umask
from .cache import cache_dir


REGISTERED_MODEL = "finetune-phi"  # `train --registered-model NAME` registers elsewhere
EXPERIMENT = "finetune-phi"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def setup(experiment: str | None = None):
    """Point MLflow at the store and the experiment (created with an explicit artifact folder)."""

    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    try:  # a store that cannot be used is found here, before a training run spends its hours
        if mlflow.get_experiment_by_name(experiment) is None:
            location = None
            if uri.startswith("sqlite:"):
                # without this, artifacts land in ./mlruns of whichever folder a later run starts from
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    except (MlflowException, SQLAlchemyError, sqlite3.Error) as e:
        raise UserError(
            f"the MLflow store {uri} cannot be used ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "move the damaged file away or set MLFLOW_TRACKING_URI to another store"
        ) from None
    return mlflow


def log_model(model_dir: str | Path, registered_name: str = REGISTERED_MODEL):
    """Log a saved HF folder as an MLflow transformers model and register a new version of it."""
    mlflow = setup()
    import transformers

    pipe = {
        "model": transformers.AutoModelForCausalLM.from_pretrained(model_dir),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(model_dir),
    }
    params = {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "return_full_text": True}
    signature = mlflow.models.infer_signature(["Hello"], ["Hello there"], params=params)
    info = mlflow.transformers.log_model(
        transformers_model=pipe,
        name="model",
        task="text-generation",
        signature=signature,
        registered_model_name=registered_name,
        # the default requirements import torchvision, which we do not install
        pip_requirements=[
            f"torch=={_version('torch')}",
            f"transformers=={transformers.__version__}",
            f"finetune-phi=={__version__}",
        ],
    )
    return info


def _version(package: str) -> str:
    return metadata.version(package).split("+")[0]


def download_model(uri: str) -> Path:
    """A registered model (models:/NAME/VERSION or models:/NAME@ALIAS) as a local HF folder.

    Downloads are cached per tracking store, name, version and what the version *is* (its run, its
    source and when it was registered): a store deleted and made again numbers its versions from 1
    again, and its new version 1 must never be served from the old one's cache entry. An alias is
    resolved first, so moving it (e.g. @champion) is seen at the next load.
    """

    mlflow = setup()

    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name, _, ref = uri.removeprefix("models:/").partition("/")
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        elif ref.isdigit():
            found = client.get_model_version(name, ref)  # raises if it does not exist
        else:
            raise UserError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    except MlflowException as e:  # no such model, version or alias in this store
        raise UserError(
            f"{uri}: not in the registry at {tracking_uri()} ({e.message.splitlines()[0][:200]}); "
            "list its versions with `mlflow ui` or set MLFLOW_TRACKING_URI to the store that has it"
        ) from None
    version = found.version
    store = hashlib.sha256(tracking_uri().encode()).hexdigest()[:10]
    identity = hashlib.sha256(f"{found.run_id}|{found.source}|{found.creation_timestamp}".encode()).hexdigest()[:10]
    target = cache_dir() / "registry" / store / name / f"{version}-{identity}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            src = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
            gone = (
                None if (src / "model").is_dir() and (src / "components" / "tokenizer").is_dir() else "no model files"
            )
        except (MlflowException, OSError) as e:
            gone = str(e)
        if gone:  # the version is registered, its files are gone (a local store downloads nothing, no error)
            raise UserError(
                f"{uri}: registered, but its files cannot be read from {found.source} ({gone}); "
                "the artifacts were deleted or moved: train again or register another version"
            )
        folder = Path(tmp) / "hf"
        shutil.copytree(src / "model", folder)  # the transformers flavour keeps weights here ...
        for f in (src / "components" / "tokenizer").iterdir():  # ... and the tokenizer here
            shutil.copy2(f, folder / f.name)
        follow_umask(folder)
        if not target.exists():
            folder.rename(target)
    return target
